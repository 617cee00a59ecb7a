#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests, the operator against an
# in-memory API, the kernel matrix — the kernel tests, which really load and attach eBPF
# programs, on this machine's kernel and in VMs booted from Debian's kernel — the e2e suite
# against a real local Kubernetes cluster (scripts/cluster.sh), run as root, and 30 s of each
# fuzz target (scripts/fuzz.sh).
# .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$SECONDS
stamp() { echo "   ($1: $((SECONDS - t_start)) s since start)"; }

bash scripts/setup.sh

# The cluster's binaries and Helm build (Go, cached under /var/cache/fathom) beside the Rust
# build; the chart tests and the kernel matrix wait for them, so that the matrix's emulated VMs
# do not share the cores with them.
mkdir -p target
{ bash scripts/cluster.sh build && bash scripts/helm.sh --build; } >target/cluster-build.log 2>&1 &
cluster_build=$!

echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd node-ebpf && cargo fmt -- --check)
rustfmt --edition 2024 --check fuzz/fuzz_targets/*.rs
(cd e2e/cluster/launcher && test -z "$(gofmt -l .)") || { echo "gofmt: $(cd e2e/cluster/launcher && gofmt -l .)"; exit 1; }
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== unit and API tests"
cargo test --workspace --exclude fathom-node --exclude fathom-e2e
cargo test -p fathom-node --lib --bins
# The kernel matrix's report (its skip list), on made-up console logs.
python3 -m unittest discover -s scripts/tests
# The runner's transport (T3–T5: gRPC on loopback, iptables): kernel-independent, host only.
cargo test -p fathom-node --test transport -- --test-threads=1
stamp "unit tests done"
if ! wait "$cluster_build"; then
  cat target/cluster-build.log
  exit 1
fi
cat target/cluster-build.log
stamp "cluster binaries and helm built"
# The Helm chart without a cluster: helm lint/template with that Helm, the schema's messages,
# deploy/ drift (fails, never skips, without helm).
cargo test -p fathom-e2e --test chart
echo "== kernel tests: host kernel and VMs (scripts/kernel-matrix.sh)"
bash scripts/kernel-matrix.sh
stamp "kernel matrix done"

echo "== e2e: a real cluster on this machine (scripts/cluster.sh)"
# The components the tests run as processes, built once here (the tests would build them).
cargo build -p fathom-operator --bin fathom-operator -p fathom-node --bin fathom-node-runner
# The images the chart deploys (tests/install.rs), from those debug binaries (stripped): a
# release build of the workspace would not fit CI's budget; `scripts/images.sh` alone packs
# the release binaries.
FATHOM_IMAGE_PROFILE=debug bash scripts/images.sh build
export FATHOM_E2E_OPERATOR_BIN=$PWD/target/debug/fathom-operator
export FATHOM_E2E_RUNNER_BIN=$PWD/target/debug/fathom-node-runner
cargo test -p fathom-e2e --no-run
# The fuzz targets (RELIABILITY S3), built beside the e2e suite, which mostly waits on the
# cluster: one job, lowest priority, its own target directory.
nice -n 19 env CARGO_BUILD_JOBS=1 FATHOM_FUZZ_MODE=quick bash scripts/fuzz.sh --build-only \
  >target/fuzz-build.log 2>&1 &
fuzz_build=$!
trap 'bash scripts/cluster.sh down' EXIT
bash scripts/cluster.sh up
eval "$(bash scripts/cluster.sh env)"
bash scripts/images.sh load
kubectl version
kubectl get nodes -o wide
cargo test -p fathom-e2e -- --test-threads=1
trap - EXIT
bash scripts/cluster.sh down
stamp "e2e done"

echo "== fuzz: 30 s per target (scripts/fuzz.sh; 600 s each by hand)"
if ! wait "$fuzz_build"; then
  cat target/fuzz-build.log
  exit 1
fi
FATHOM_FUZZ_MODE=quick bash scripts/fuzz.sh 30
stamp "all tests passed"
