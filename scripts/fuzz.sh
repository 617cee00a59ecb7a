#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ with cargo-fuzz (libFuzzer) on the pinned nightly, each for
# SECONDS (default 600: RELIABILITY S3's ten minutes; the test command runs 30), and fails on
# the first crash, panic, overflow, leak or timeout, naming the input that caused it.
#   scripts/fuzz.sh [SECONDS] [TARGET...]      run (building first)
#   scripts/fuzz.sh --build-only                build only
# FATHOM_FUZZ_MODE=full (default): release build with AddressSanitizer, in fuzz/target.
# FATHOM_FUZZ_MODE=quick: debug build with overflow checks and no sanitizer, in
# target/fuzz-quick: it builds in about half the time (the test command builds it beside the
# e2e suite).
# Targets: spec (TraceJob YAML/JSON: validation, tenant rules, plans), elf (binaries: symbols,
# USDT notes), report (the collector's protobuf reports), events (event batches, ring-buffer
# records), kernel_text (tracepoint formats, BTF, kallsyms). Corpora grow in fuzz/corpus/
# (not committed), seeded from examples/ and small system files; a summary line per target
# gives its executions.
set -euo pipefail
cd "$(dirname "$0")/.."
NIGHTLY=nightly-2026-05-19   # scripts/setup.sh installs it (the eBPF build's toolchain)
BUILD_ONLY=false
if [ "${1:-}" = "--build-only" ]; then
  BUILD_ONLY=true
  shift
fi
SECONDS_EACH=${1:-600}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(spec elf report events kernel_text)
case ${FATHOM_FUZZ_MODE:-full} in
  full) FLAGS=(-O -s address --target-dir "$PWD/fuzz/target") ;;
  quick) FLAGS=(-D -s none --target-dir "$PWD/target/fuzz-quick") ;;
  *) echo "FATHOM_FUZZ_MODE is full or quick" >&2; exit 2 ;;
esac

log() { echo "[fuzz] $*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "cargo install cargo-fuzz (once)"
  cargo install --locked cargo-fuzz >&2
fi

seed() {
  local dir=fuzz/corpus/$1
  mkdir -p "$dir"
  case $1 in
    spec)
      for f in examples/*.yaml; do
        # The spec part of each example, as YAML.
        awk '/^spec:/{on=1; next} on && /^[^ ]/{on=0} on{sub(/^  /, ""); print}' "$f" >"$dir/example-$(basename "$f")"
      done
      printf 'probe: { rawTracepoint: sys_enter }\naggregate: { by: [arg5] }\n' >"$dir/arg5"
      printf '{"probe": {"tracepoint": "skb/kfree_skb"}, "aggregate": {"by": ["location", "reason"]}}' >"$dir/json"
      ;;
    elf) cp /bin/true "$dir/true" ;;
    kernel_text)
      { printf '\0'; cat /sys/kernel/tracing/events/skb/kfree_skb/format 2>/dev/null || true; } >"$dir/format"
      { printf '\2'; head -c 20000 /proc/kallsyms; } >"$dir/kallsyms"
      ;;
    *) : ;;
  esac
}

log "building the targets (${FATHOM_FUZZ_MODE:-full}: ${FLAGS[*]})"
cargo +"$NIGHTLY" fuzz build --fuzz-dir fuzz "${FLAGS[@]}" >&2
if $BUILD_ONLY; then
  exit 0
fi
status=0
for t in "${TARGETS[@]}"; do
  seed "$t"
  log "$t: ${SECONDS_EACH}s"
  out=$(mktemp)
  if cargo +"$NIGHTLY" fuzz run --fuzz-dir fuzz "${FLAGS[@]}" "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
      >"$out" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    log "$t: ok, ${runs:-?} executions in ${SECONDS_EACH}s, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs"
  else
    status=1
    log "$t: FAILED"
    grep -E "panicked|ERROR: |SUMMARY|Test unit written|artifact_prefix|Running:" "$out" | head -20 >&2 || true
    tail -40 "$out" >&2
  fi
  rm -f "$out"
done
exit $status
