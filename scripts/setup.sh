#!/usr/bin/env bash
# Makes a fresh machine ready to build and test Fathom; quick when it already is.
# Idempotent: every step checks before it acts. Run as root.
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }

# The eBPF build's toolchain, pinned: its LLVM (22) must match bpf-linker's `llvm-22`, and a
# newer "nightly" drifts to another LLVM. node-runner/build.rs names the same toolchain.
NIGHTLY=nightly-2026-05-19

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "[setup] must run as root (installs packages, mounts tracefs/bpffs)" >&2
    exit 1
  fi
}

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    if [ ! -f /var/lib/apt/periodic/fathom-updated ]; then
      apt-get update -qq
      mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/fathom-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

mount_fs() {
  local fstype=$1 dir=$2
  if ! mountpoint -q "$dir"; then
    mkdir -p "$dir"
    log "mount -t $fstype $dir"
    mount -t "$fstype" "$fstype" "$dir"
  fi
}

install_nightly() {
  rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1 \
    || { log "rustup toolchain install $NIGHTLY"; rustup toolchain install "$NIGHTLY" --profile minimal; }
  rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src' \
    || rustup component add rust-src --toolchain "$NIGHTLY"
}
install_bpf_linker() {
  if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version >/dev/null 2>&1; then
    return
  fi
  local prefix=/usr/local/fathom-llvm
  local d
  d="$(rustc +"$NIGHTLY" --print sysroot)/lib"
  mkdir -p "$prefix/lib"
  ln -sf "$d"/libLLVM.so.* "$prefix/lib/"
  ln -sf "$d"/libLLVM.so.* "$prefix/lib/libLLVM.so"
  echo "$prefix/lib" >/etc/ld.so.conf.d/fathom-llvm.conf
  ldconfig
  log "cargo install bpf-linker (links the nightly toolchain's own LLVM; takes a few minutes)"
  LLVM_PREFIX="$prefix" cargo +"$NIGHTLY" install --locked bpf-linker --no-default-features --features llvm-22
  bpf-linker --version >/dev/null
}

# The VM kernels of the kernel matrix, fetched once into /var/cache/fathom/kernels (outside
# git); scripts/kernel-matrix.sh lists them.
fetch_matrix_kernels() {
  "$(dirname "${BASH_SOURCE[0]}")/kernel-matrix.sh" --fetch
}

need_root
apt_install bpftrace bpftool libbpf-tools qemu-system-x86 busybox-static cpio python3 linux-perf xz-utils
# The local cluster's node (scripts/cluster.sh): container runtime, CNI plugins, iptables.
apt_install containerd runc containernetworking-plugins iptables conntrack ethtool socat openssl gcc libc6-dev
install_nightly
install_bpf_linker
mount_fs tracefs /sys/kernel/tracing
mount_fs bpf /sys/fs/bpf
fetch_matrix_kernels
log "ready: $(bpf-linker --version 2>&1 | head -n1), $(bpftrace --version 2>&1 | head -n1)"
