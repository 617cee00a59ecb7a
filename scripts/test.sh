#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests, the operator against an
# in-memory API, and the kernel matrix — the kernel tests, which really load and attach eBPF
# programs, on this machine's kernel and in VMs booted from Debian's kernel (run as root).
# .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd node-ebpf && cargo fmt -- --check)
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== unit and API tests"
cargo test --workspace --exclude fathom-node
cargo test -p fathom-node --lib --bins
echo "== kernel tests: host kernel and VMs (scripts/kernel-matrix.sh)"
bash scripts/kernel-matrix.sh
