#!/usr/bin/env bash
# RELIABILITY S4 by hand: the chaos soak of e2e/tests/soak.rs: at least CYCLES create/delete
# cycles (default 1,000) for at least SECONDS (default 3600), on the local cluster (brought up if it is not,
# taken down after if this script brought it up). The test command runs the same test with
# 60 cycles. Prints the soak's summary line: cycles, bursts, opens counted, faults, seconds.
#   scripts/soak.sh [CYCLES [SECONDS]]
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${1:-1000}
SECS=${2:-3600}
[ "$CYCLES" -ge 30 ] 2>/dev/null || { echo "soak.sh: CYCLES must be a number >= 30" >&2; exit 2; }
[ "$SECS" -ge 0 ] 2>/dev/null || { echo "soak.sh: SECONDS must be a number" >&2; exit 2; }
cargo build -p fathom-operator --bin fathom-operator -p fathom-node --bin fathom-node-runner
export FATHOM_E2E_OPERATOR_BIN=$PWD/target/debug/fathom-operator
export FATHOM_E2E_RUNNER_BIN=$PWD/target/debug/fathom-node-runner
ours=false
if ! bash scripts/cluster.sh status >/dev/null 2>&1; then
  ours=true
  trap 'bash scripts/cluster.sh down' EXIT
  bash scripts/cluster.sh up
fi
eval "$(bash scripts/cluster.sh env)"
FATHOM_SOAK_CYCLES=$CYCLES FATHOM_SOAK_SECONDS=$SECS cargo test -p fathom-e2e --test soak -- --nocapture --test-threads=1
if $ours; then
  trap - EXIT
  bash scripts/cluster.sh down
fi
