#!/usr/bin/env bash
# The kernel matrix: Fathom's kernel tests on this machine's kernel and inside QEMU VMs booted
# from distribution kernels, with the results side by side.
#
#   scripts/kernel-matrix.sh [--only NAME]... [-- TEST-ARGS...]
#   scripts/kernel-matrix.sh --fetch          # fetch and cache the VM kernels only (setup.sh)
#
# Builds the kernel test binaries once (every integration test target of fathom-node), runs
# them directly on the host kernel, packs them with busybox, their shared libraries, the test
# workload, bpftool, bpftrace and setpriv into an initramfs, boots each VM kernel with QEMU
# (TCG), runs them there, streams all output and keeps it under target/kernel-matrix/.
# TEST-ARGS go to every test binary (libtest filters, e.g. `-- kprobe`).
# Exit status: 0 when every test of every kernel passed or was skipped with a reason; 1 on a
# test failure, a kernel panic, a VM that hangs past FATHOM_VM_TIMEOUT, a binary that
# crashes; 2 on a usage or setup error. Needs root and scripts/setup.sh.
#
# Environment: CARGO_TARGET_DIR (as for cargo), FATHOM_KERNEL_CACHE (default
# /var/cache/fathom/kernels), FATHOM_VM_TIMEOUT (seconds per VM, default 2400),
# FATHOM_BINARY_TIMEOUT (seconds per test binary in a VM, default 900),
# FATHOM_VM_MEMORY (MiB, default 2048), FATHOM_VM_CPUS (default 2),
# FATHOM_HOST_EXPECT (overrides the host row's expectations).
set -euo pipefail

# The matrix: one kernel per line.
#   name | kernel | extra kernel command line ("-": none) | FATHOM_KERNEL_EXPECT [| test args]
# kernel:  host                 this machine's running kernel, no VM
#          deb:PACKAGE[@PREFIX][/SUITE]
#                               a Debian kernel package (a meta package such as linux-image-amd64
#                               resolves to the image it depends on, which must start with
#                               linux-image-PREFIX), from this machine's apt sources or from
#                               Debian's suite SUITE (an apt state of its own under the cache);
#                               fetched with apt-get by --fetch
#          file:/path/vmlinuz   a kernel image you provide (no modules: no block device)
# FATHOM_KERNEL_EXPECT tells node-runner/tests/kernel_functions.rs what this kernel offers:
# `full`, or kprobes=available|absent, fentry=available|refused, lsm=available|refused|disabled
# (see docs/kernel-matrix.md); `probe` (host only): found by probing the running kernel
# (probe_host_expect). Test args, when given, are libtest arguments for that row only (a filter
# there limits the row to the matching tests).
KERNELS=(
  "host              | host                               | -                                                  | probe"
  "debian-6.1        | deb:linux-image-amd64@6.1.         | lsm=lockdown,capability,landlock,yama,apparmor,bpf | full"
  "debian-6.1-no-lsm | deb:linux-image-amd64@6.1.         | lsm=lockdown,capability,landlock,yama,apparmor     | kprobes=available,fentry=available,lsm=disabled | lsm_"
  "debian-6.12       | deb:linux-image-amd64@6.12./trixie | lsm=lockdown,capability,landlock,yama,apparmor,bpf | full"
  "debian-6.12-lockdown | deb:linux-image-amd64@6.12./trixie | lsm=lockdown,capability,landlock,yama,apparmor,bpf lockdown=confidentiality | full | lockdown_"
)

# Host tools the tests run, copied into the initramfs with their libraries.
# iproute2's ip: the network tests make veth pairs (busybox's ip cannot); libbpf-tools for
# the parity tests (tests/parity.rs).
VM_TOOLS=(bpftool bpftrace setpriv ip execsnoop opensnoop syscount runqlat biolatency funclatency
  tcpconnect oomkill tcplife)
# Kernel modules loaded in the VM, in order: a loop device with an ext2 file system (through
# the ext4 driver) gives the block-I/O tests a real block device; veth, the network tests
# their veth pairs.
VM_MODULES=(drivers/block/loop crypto/crc32c_generic lib/crc16 fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4 drivers/net/veth)

# Tests that do not run in the VMs, each with its reason (printed in the summary as skipped);
# they still run on the host.
#   binary::test | reason
VM_SKIP=()

# The written skip list: a test that reports itself skipped (a `fathom-skip: <test>: <why>`
# line) or ignored in a row fails that row unless it is here, with its reason.
#   row (a shell glob) | binary::test | reason
MAY_SKIP=(
  "host | parity::funclatency_and_a_kretprobe_latency_time_the_same_kernel_calls | the tool attaches kprobes; a host kernel without them (CONFIG_KPROBES unset, as on this project's VM) cannot run it, and the Debian rows compare it"
  "host | parity::tcpconnect_and_the_tcp_connect_entry_see_the_same_connects | the tool attaches kprobes; a host kernel without them cannot run it, and the Debian rows compare it"
  "host | parity::oomkill_and_the_oom_kill_entry_name_the_same_victim | the tool attaches kprobes; a host kernel without them cannot run it, and the Debian rows compare it"
)

# Under TCG emulation (no KVM here) 1000 load/attach/detach cycles of E2 take over 9 minutes;
# the VMs run 100 of them (the test prints how many it ran). The host runs all 1000.
VM_E2_CYCLES=100

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
OUT=$TARGET_DIR/kernel-matrix
CACHE=${FATHOM_KERNEL_CACHE:-/var/cache/fathom/kernels}
VM_TIMEOUT=${FATHOM_VM_TIMEOUT:-2400}
# Seconds one test binary may run inside a VM before it is killed (the slowest, reliability,
# takes ~100 s in the 6.1 VM and ~450 s in the 6.12 one on a busy host).
BINARY_TIMEOUT=${FATHOM_BINARY_TIMEOUT:-900}
VM_MEMORY=${FATHOM_VM_MEMORY:-2048}
VM_CPUS=${FATHOM_VM_CPUS:-2}

log() { printf '[kernel-matrix] %s\n' "$*" >&2; }
die() {
  printf '[kernel-matrix] error: %s\n' "$*" >&2
  exit 2
}

trim() {
  local s=$1
  s=${s#"${s%%[![:space:]]*}"}
  printf '%s' "${s%"${s##*[![:space:]]}"}"
}

# row_field LINE N: the N-th |-separated field of a matrix line, trimmed.
row_field() {
  local IFS='|'
  # shellcheck disable=SC2206
  local f=($1)
  trim "${f[$2]:-}"
}

# --- kernels -------------------------------------------------------------------------------

# apt_opts SUITE: apt options for Debian's suite SUITE, in an apt state of its own under the
# cache (the machine's sources and state are left alone); nothing for the machine's suites.
apt_opts() {
  local suite=$1 dir
  [ -n "$suite" ] || return 0
  dir=$CACHE/apt-$suite
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  [ -f "$dir/$suite.sources" ] || printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$suite" >"$dir/$suite.sources"
  printf '%s\n' -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$dir" \
    -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o Dir::State::status=/dev/null
}

# deb_suite SPEC / deb_spec SPEC: the suite and the package@prefix of a deb: spec.
deb_suite() { [[ $1 == */* ]] && printf '%s' "${1#*/}"; return 0; }
deb_spec() { printf '%s' "${1%%/*}"; }

# resolve_deb SPEC: the concrete package a deb: spec names.
resolve_deb() {
  local spec pkg prefix dep opts=()
  mapfile -t opts < <(apt_opts "$(deb_suite "$1")")
  spec=$(deb_spec "$1")
  pkg=${spec%@*}
  prefix=
  [[ $spec == *@* ]] && prefix=${spec#*@}
  dep=$(apt-cache "${opts[@]}" depends --important "$pkg" 2>/dev/null |
    awk '/^ *Depends: linux-image-/ { print $2; exit }')
  [ -n "$dep" ] || dep=$pkg
  if ! apt-cache "${opts[@]}" show "$dep" >/dev/null 2>&1; then
    return 1
  fi
  if [ -n "$prefix" ] && [[ $dep != linux-image-$prefix* ]]; then
    die "$spec resolves to $dep, not linux-image-$prefix*; fix the row in KERNELS"
  fi
  printf '%s\n' "$dep"
}

# cached DIR: the kernel and every module the VM loads are in the cache.
cached() {
  local m
  [ -f "$1/vmlinuz" ] || return 1
  for m in "${VM_MODULES[@]}"; do
    [ -f "$1/modules/$m.ko" ] || return 1
  done
}

# fetch_row LINE: makes $CACHE/<name> point at the row's extracted kernel (idempotent).
fetch_row() {
  local line=$1 name kernel spec pkg dir tmp
  name=$(row_field "$line" 0)
  kernel=$(row_field "$line" 1)
  case $kernel in
    host | file:*) return 0 ;;
    deb:*) spec=${kernel#deb:} ;;
    *) die "row $name: unknown kernel kind $kernel" ;;
  esac
  local opts=()
  mapfile -t opts < <(apt_opts "$(deb_suite "$spec")")
  if ! pkg=$(resolve_deb "$spec"); then
    log "apt-get update (to find $spec)"
    apt-get "${opts[@]}" update -qq >&2
    pkg=$(resolve_deb "$spec") || die "row $name: no package $spec in the apt sources"
  fi
  dir=$CACHE/$pkg
  if ! cached "$dir"; then
    log "fetching $pkg for $name into $dir"
    mkdir -p "$CACHE"
    tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
    (cd "$tmp" && apt-get "${opts[@]}" download -q "$pkg" >/dev/null 2>&1) ||
      { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    mkdir -p "$tmp/k"
    cp "$tmp"/x/boot/vmlinuz-* "$tmp/k/vmlinuz"
    cp "$tmp"/x/boot/config-* "$tmp/k/config"
    local rel mods
    # /lib/modules (Debian 12), /usr/lib/modules (13, merged /usr).
    mods=$(echo "$tmp"/x/lib/modules "$tmp"/x/usr/lib/modules | tr ' ' '\n' | while read -r d; do [ -d "$d" ] && echo "$d"; done | head -1)
    [ -n "$mods" ] || { rm -rf "$tmp"; die "$pkg has no lib/modules"; }
    rel=$(basename "$(echo "$mods"/*)")
    echo "$rel" >"$tmp/k/release"
    # Only the modules the VM loads are kept (the package has ~400 MB of them), uncompressed
    # (Debian 13 ships them as .ko.xz; busybox insmod loads plain ELF).
    for m in "${VM_MODULES[@]}"; do
      mkdir -p "$tmp/k/modules/$(dirname "$m")"
      if [ -f "$mods/$rel/kernel/$m.ko" ]; then
        cp "$mods/$rel/kernel/$m.ko" "$tmp/k/modules/$m.ko"
      elif [ -f "$mods/$rel/kernel/$m.ko.xz" ]; then
        xz -dc "$mods/$rel/kernel/$m.ko.xz" >"$tmp/k/modules/$m.ko"
      else
        rm -rf "$tmp"
        die "$pkg has no module $m"
      fi
    done
    rm -rf "$dir"
    mv "$tmp/k" "$dir"
    rm -rf "$tmp"
  fi
  ln -sfn "$pkg" "$CACHE/$name"
}

# kernel_dir LINE: the cached kernel directory of a VM row (fetching it when missing).
kernel_dir() {
  local line=$1 name kernel
  name=$(row_field "$line" 0)
  kernel=$(row_field "$line" 1)
  case $kernel in
    file:*)
      local d=$OUT/$name/kernel
      mkdir -p "$d"
      cp "${kernel#file:}" "$d/vmlinuz"
      echo "$d"
      return
      ;;
  esac
  cached "$CACHE/$name" || fetch_row "$line"
  readlink -f "$CACHE/$name"
}

# --- build ---------------------------------------------------------------------------------

# Builds the test binaries; writes $OUT/tests.tsv (name, path) and $OUT/extra.tsv (host paths
# baked into the tests: the fathom binary, the workload).
build_tests() {
  log "building the kernel test binaries (cargo test -p fathom-node --no-run)"
  mkdir -p "$OUT"
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo test -p fathom-node --no-run \
    --message-format=json-render-diagnostics) >"$OUT/cargo.json" ||
    die "building the tests failed"
  python3 - "$OUT/cargo.json" "$OUT/tests.tsv" "$OUT/extra.tsv" <<'EOF'
import json, re, sys
tests, extra = [], []
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if not re.search(r"[#/]fathom-node[@#]", m.get("package_id", "")):
        continue
    r = m.get("reason")
    if r == "compiler-artifact" and m.get("executable"):
        kinds = m["target"]["kind"]
        # transport: gRPC over loopback (backoff, keepalive with iptables, spool), no BPF;
        # scripts/test.sh runs it once on the host instead of in every VM.
        if m["profile"]["test"] and kinds == ["test"] and m["target"]["name"] != "transport":
            tests.append((m["target"]["name"], m["executable"]))
        elif kinds == ["bin"] and not m["profile"]["test"]:
            extra.append(("bin", m["executable"]))
    elif r == "build-script-executed" and m.get("out_dir"):
        # The workload keeps its debug info: the profile test symbolizes its stacks.
        extra.append(("workload", m["out_dir"] + "/fathom-workload"))
if not tests:
    sys.exit("no integration test targets found in cargo's output")
with open(sys.argv[2], "w") as f:
    for name, path in sorted(set(tests)):
        f.write(f"{name}\t{path}\n")
with open(sys.argv[3], "w") as f:
    for kind, p in sorted(set(extra)):
        f.write(f"{kind}\t{p}\n")
EOF
  log "test binaries: $(cut -f1 "$OUT/tests.tsv" | tr '\n' ' ')"
}

# row_args LINE: the libtest arguments of a row, one per line: the command line's, then the
# row's own (fifth column).
row_args() {
  local extra
  [ ${#TEST_ARGS[@]} -gt 0 ] && printf '%s\n' "${TEST_ARGS[@]}"
  extra=$(row_field "$1" 4)
  # shellcheck disable=SC2086
  [ -n "$extra" ] && printf '%s\n' $extra
  return 0
}

# row_lists LINE: the tests each binary runs with the row's arguments, what the row must
# report on, in $OUT/<name>/lists/<binary>.
row_lists() {
  local line=$1 name b path args=()
  name=$(row_field "$line" 0)
  mapfile -t args < <(row_args "$line")
  rm -rf "$OUT/$name/lists"
  mkdir -p "$OUT/$name/lists"
  while IFS=$'\t' read -r b path; do
    "$path" --list --format terse "${args[@]}" | sed -n 's/: test$//p' >"$OUT/$name/lists/$b"
  done <"$OUT/tests.tsv"
}

# --- initramfs -----------------------------------------------------------------------------

# copy_elf STAGE PATH [DEST]: an executable and the shared libraries ldd lists.
copy_elf() {
  local stage=$1 src=$2 dest=${3:-$2} lib
  mkdir -p "$stage$(dirname "$dest")"
  cp -L "$src" "$stage$dest"
  ldd "$src" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    if [ ! -e "$stage$lib" ]; then
      mkdir -p "$stage$(dirname "$lib")"
      cp -L "$lib" "$stage$lib"
    fi
  done
}

# The shared part of every VM's initramfs: busybox, tools, tests, workload, /init.
build_base_initramfs() {
  local stage=$OUT/initramfs base=$OUT/base.cpio name path tool
  log "packing the initramfs"
  rm -rf "$stage"
  mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root,run,mnt,fathom/tests}
  chmod 1777 "$stage/tmp"
  cp /bin/busybox "$stage/bin/busybox"
  for tool in "${VM_TOOLS[@]}"; do
    path=$(command -v "$tool") || die "$tool is missing; run scripts/setup.sh"
    copy_elf "$stage" "$(readlink -f "$path")" "$path"
  done
  while IFS=$'\t' read -r name path; do
    copy_elf "$stage" "$path" "/fathom/tests/$name"
    strip --strip-debug "$stage/fathom/tests/$name"
    echo "$name" >>"$stage/fathom/tests.list"
  done <"$OUT/tests.tsv"
  # Paths baked into the tests at build time exist at the same place in the VM.
  while IFS=$'\t' read -r kind path; do
    [ -e "$path" ] || continue
    copy_elf "$stage" "$path"
    if [ "$kind" = bin ]; then strip --strip-debug "$stage$path"; fi
  done <"$OUT/extra.tsv"
  mkdir -p "$stage/fathom/skip"
  for entry in "${VM_SKIP[@]}"; do
    name=$(row_field "$entry" 0)
    printf -- '--skip\n%s\n' "${name#*::}" >>"$stage/fathom/skip/${name%%::*}"
  done
  echo fathom-vm >"$stage/etc/hostname"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
  printf 'root:x:0:\n' >"$stage/etc/group"
  printf '127.0.0.1 localhost fathom-vm\n' >"$stage/etc/hosts"
  write_init >"$stage/init"
  chmod 755 "$stage/init"
  (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$base"
  log "initramfs: $(du -h "$base" | cut -f1)"
}

# The VM's /init: mounts, a block device, the tests, a result line, power off.
write_init() {
  cat <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security
mount -t cgroup2 cgroup2 /sys/fs/cgroup
hostname fathom-vm
ip link set lo up
say() { echo "=== fathom-matrix $*"; }
say "kernel $(uname -r)"
say "cmdline $(cat /proc/cmdline)"
# A block device: ext2 on a loop device over a file in RAM, the tests' TMPDIR.
if [ -d /lib/modules/fathom ]; then
  for m in $(cat /lib/modules/fathom/order); do
    insmod "/lib/modules/fathom/$m.ko" || say "warning: insmod $m failed"
  done
  dd if=/dev/zero of=/disk.img bs=1M count=96 2>/dev/null
  mknod -m 660 /dev/loop0 b 7 0 2>/dev/null
  if losetup /dev/loop0 /disk.img && mke2fs -q /dev/loop0 >/dev/null && mount -t ext2 /dev/loop0 /mnt; then
    mkdir -p /mnt/tmp && chmod 1777 /mnt/tmp
    export TMPDIR=/mnt/tmp
    say "block device: /dev/loop0 (ext2) at /mnt, TMPDIR=$TMPDIR"
  else
    say "warning: no block device; block I/O tests will fail"
  fi
fi
cd /fathom
for t in $(cat /fathom/tests.list); do
  say "begin $t"
  start=$(date +%s)
  # A binary that hangs is killed after its own timeout, so the others still run and the
  # summary names it (unfinished) instead of the VM timing out with it.
  timeout -s KILL $(cat /fathom/binary-timeout) /fathom/tests/$t --test-threads=1 $(cat /fathom/test-args) $(cat /fathom/skip/$t 2>/dev/null) 2>&1
  rc=$?
  say "end $t rc=$rc seconds=$(( $(date +%s) - start ))"
done
say "done"
sync
poweroff -f
INIT
}

# row_initramfs LINE KDIR: the base plus the row's kernel modules.
row_initramfs() {
  local line=$1 kdir=$2 name stage img m
  name=$(row_field "$line" 0)
  img=$OUT/$name/initrd.cpio
  stage=$OUT/$name/initramfs
  rm -rf "$stage"
  mkdir -p "$stage/fathom"
  row_args "$line" >"$stage/fathom/test-args"
  echo "$BINARY_TIMEOUT" >"$stage/fathom/binary-timeout"
  if [ -d "$kdir/modules" ]; then
    mkdir -p "$stage/lib/modules/fathom"
    (cd "$kdir/modules" && cp -r . "$stage/lib/modules/fathom/")
    for m in "${VM_MODULES[@]}"; do echo "$m"; done >"$stage/lib/modules/fathom/order"
  fi
  (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$img.row"
  cat "$OUT/base.cpio" "$img.row" >"$img"
  rm -f "$img.row"
  echo "$img"
}

# --- runs ----------------------------------------------------------------------------------

# probe_host_expect: FATHOM_KERNEL_EXPECT for the running kernel, found without Fathom's engine
# (whose verdicts the tests check): kprobes are there when tracefs offers kprobe_events;
# trampolines (fentry/fexit, and so BPF LSM) work when bpftrace can run a kfunc probe; BPF LSM
# is available when trampolines work and `bpf` is in the active LSM list, else disabled.
probe_host_expect() {
  local kprobes=absent fentry=refused lsm=refused tracefs
  for tracefs in /sys/kernel/tracing /sys/kernel/debug/tracing; do
    [ -e "$tracefs/kprobe_events" ] && kprobes=available
  done
  (sleep 2; cat /proc/version >/dev/null) &
  if timeout 30 bpftrace -e 'kfunc:vfs_read { exit(); }' >"$OUT/host-kfunc-probe.log" 2>&1; then
    fentry=available
  fi
  wait
  if [ "$fentry" = available ]; then
    if grep -qw bpf /sys/kernel/security/lsm 2>/dev/null; then lsm=available; else lsm=disabled; fi
  fi
  printf 'kprobes=%s,fentry=%s,lsm=%s' "$kprobes" "$fentry" "$lsm"
}

# run_host LINE: the tests on the running kernel, output in the same shape as a VM's console.
run_host() {
  local line=$1 name expect logf t path rc start args=()
  name=$(row_field "$line" 0)
  mapfile -t args < <(row_args "$line")
  expect=${FATHOM_HOST_EXPECT:-$(row_field "$line" 3)}
  mkdir -p "$OUT/$name"
  if [ "$expect" = probe ]; then
    expect=$(probe_host_expect)
    log "== $name: probed the running kernel: $expect (bpftrace's kfunc probe: $OUT/host-kfunc-probe.log)"
  fi
  logf=$OUT/$name/console.log
  log "== $name: kernel $(uname -r), FATHOM_KERNEL_EXPECT=$expect"
  {
    echo "=== fathom-matrix kernel $(uname -r)"
    while IFS=$'\t' read -r t path; do
      echo "=== fathom-matrix begin $t"
      start=$(date +%s)
      set +e
      FATHOM_KERNEL_EXPECT=$expect FATHOM_MATRIX_ROW=$name RUST_BACKTRACE=1 \
        timeout -k 10 "$VM_TIMEOUT" "$path" --test-threads=1 "${args[@]}" 2>&1
      rc=$?
      set -e
      echo "=== fathom-matrix end $t rc=$rc seconds=$(($(date +%s) - start))"
    done <"$OUT/tests.tsv"
    echo "=== fathom-matrix done"
  } 2>&1 | tee "$logf"
  echo 0 >"$OUT/$name/qemu.rc"
}

# run_vm LINE: boots the row's kernel with the initramfs and streams its console.
run_vm() {
  local line=$1 name cmdline expect kdir img logf rc start
  name=$(row_field "$line" 0)
  cmdline=$(row_field "$line" 2)
  [ "$cmdline" = - ] && cmdline=
  expect=$(row_field "$line" 3)
  kdir=$(kernel_dir "$line")
  mkdir -p "$OUT/$name"
  img=$(row_initramfs "$line" "$kdir")
  logf=$OUT/$name/console.log
  rm -f "$OUT/$name/console.first-boot.log"
  for boot in 1 2; do
    log "== $name: booting $(cat "$kdir/release" 2>/dev/null || echo "$kdir/vmlinuz") under QEMU (TCG), timeout ${VM_TIMEOUT}s"
    start=$(date +%s)
    set +e
    timeout -k 10 "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg,thread=single -cpu max -smp "$VM_CPUS" \
      -m "$VM_MEMORY" -nographic -no-reboot -monitor none -serial stdio \
      -kernel "$kdir/vmlinuz" -initrd "$img" \
      -append "console=ttyS0 quiet panic=-1 $cmdline FATHOM_KERNEL_EXPECT=$expect FATHOM_MATRIX_ROW=$name FATHOM_E2_CYCLES=$VM_E2_CYCLES" \
      </dev/null 2>&1 | tee "$logf"
    rc=${PIPESTATUS[0]}
    set -e
    # One more boot, with the whole row run again, for two crashes of the emulator rather
    # than of the kernel under test: a crash while booting, before /init began any test
    # (CI saw one, 9 s in), and an `Oops: int3` — a CPU meeting the int3 of a finished
    # text_poke, which multi-threaded TCG does not keep coherent across vCPUs (seen once in
    # the 6.12 row, in bpf_trace_run2 under bpftool). The report quotes the first crash.
    # Any other crash once tests have begun is never retried.
    if [ "$boot" = 1 ] && grep -qE 'Kernel panic|BUG: |Oops: ' "$logf" &&
      { ! grep -q '=== fathom-matrix begin' "$logf" || grep -q 'Oops: int3' "$logf"; }; then
      mv "$logf" "$OUT/$name/console.first-boot.log"
      log "== $name: the emulated kernel crashed (before any test, or an int3 of text patching); booting once more ($OUT/$name/console.first-boot.log)"
      continue
    fi
    break
  done
  echo "$rc" >"$OUT/$name/qemu.rc"
  echo "$(($(date +%s) - start))" >"$OUT/$name/seconds"
  log "== $name: QEMU exited with $rc after $(cat "$OUT/$name/seconds") s"
}

# --- report --------------------------------------------------------------------------------

report() {
  FATHOM_VM_TIMEOUT=$VM_TIMEOUT python3 "$ROOT/scripts/kernel_matrix_report.py" "$OUT" "$@"
}

# --- main ----------------------------------------------------------------------------------

ONLY=()
FETCH_ONLY=0
TEST_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --fetch) FETCH_ONLY=1 ;;
    --only) ONLY+=("$2"); shift ;;
    --) shift; TEST_ARGS=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "must run as root (loads eBPF programs)"

selected=()
for line in "${KERNELS[@]}"; do
  name=$(row_field "$line" 0)
  if [ ${#ONLY[@]} -eq 0 ] || printf '%s\n' "${ONLY[@]}" | grep -qx "$name"; then
    selected+=("$line")
  fi
done
[ ${#selected[@]} -gt 0 ] || die "no kernel row matches ${ONLY[*]}"

if [ "$FETCH_ONLY" = 1 ]; then
  for line in "${selected[@]}"; do fetch_row "$line"; done
  exit 0
fi

for t in qemu-system-x86_64 cpio python3 strip; do
  command -v "$t" >/dev/null || die "$t is missing; run scripts/setup.sh"
done
total_start=$(date +%s)
build_tests
vms=0
for line in "${selected[@]}"; do
  [ "$(row_field "$line" 1)" = host ] || vms=1
done
if [ "$vms" = 1 ]; then build_base_initramfs; fi
for entry in "${VM_SKIP[@]}"; do
  printf '%s\t%s\n' "$(row_field "$entry" 0)" "$(row_field "$entry" 1)"
done >"$OUT/vm-skip.tsv"
for entry in "${MAY_SKIP[@]}"; do
  printf '%s\t%s\t%s\n' "$(row_field "$entry" 0)" "$(row_field "$entry" 1)" "$(row_field "$entry" 2)"
done >"$OUT/may-skip.tsv"
names=()
for line in "${selected[@]}"; do
  name=$(row_field "$line" 0)
  if [ "$(row_field "$line" 1)" = host ]; then names+=("$name=host"); else names+=("$name=vm"); fi
  rm -f "$OUT/$name/console.log" "$OUT/$name/qemu.rc" "$OUT/$name/seconds"
  row_lists "$line"
  if [ "$(row_field "$line" 1)" = host ]; then
    run_host "$line"
  else
    run_vm "$line"
  fi
done
set +e
report "${names[@]}"
rc=$?
set -e
log "total $(($(date +%s) - total_start)) s"
exit $rc
