#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests, the operator's in-memory API
# tests, and the kernel tests (which really load and attach eBPF programs: run as root).
# .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"
cargo test --workspace
