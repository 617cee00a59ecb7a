#!/usr/bin/env bash
# Builds Fathom's two images from the release binaries, as OCI archives (no registry, no
# container engine needed), and optionally imports them into the local cluster's containerd.
#
#   scripts/images.sh build     # target/images/{fathom-operator,fathom-node-runner}.tar
#   scripts/images.sh import    # build, then import into scripts/cluster.sh's containerd, pinned
#   scripts/images.sh load      # import what `build` made, without building
#
# FATHOM_IMAGE_PROFILE=debug packs the debug binaries instead of release ones (the test command
# does, to reuse the binaries the e2e suite already built rather than spend a release build
# of the workspace in CI's budget). Either way the binaries are copied with their debug
# information stripped (strip --strip-debug), and the image names are the same.
#
# Each image is one layer: the binary and exactly the shared libraries `ldd` lists for it (glibc,
# libgcc_s: the "distroless cc" set), nothing else — no shell, no package manager. The operator
# runs as 65532:65532; the runner as root with only the capabilities the chart adds
# (docs/install.md). The chart deploys these images (fathom.local/<name>:<version>);
# `Containerfile` (targets operator and node-runner) builds the same contents with
# docker/podman for a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET/images
REGISTRY=${FATHOM_IMAGE_REGISTRY:-fathom.local}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
STATE=${FATHOM_CLUSTER_STATE:-/var/lib/fathom-cluster}
PROFILE=${FATHOM_IMAGE_PROFILE:-release}

die() { echo "images.sh: $*" >&2; exit 1; }

# FILE_SPECs for the binary's shared libraries, at the paths ldd names (real files copied).
libs_of() {
  local bin=$1 line path
  ldd "$bin" | while read -r line; do
    case $line in
      *"=> /"*) path=${line#*=> }; path=${path%% (*} ;;
      /*) path=${line%% (*} ;;
      *) continue ;;
    esac
    echo "$(readlink -f "$path"):$path:0755"
  done
}

build() {
  local flag=
  case $PROFILE in
    release) flag=--release ;;
    debug) ;;
    *) die "FATHOM_IMAGE_PROFILE=$PROFILE: release or debug" ;;
  esac
  cargo build $flag -p fathom-operator --bin fathom-operator \
    -p fathom-node --bin fathom-node-runner -p kubectl-fathom --bin kubectl-fathom
  mkdir -p "$OUT/bin"
  local name
  for name in fathom-operator fathom-node-runner kubectl-fathom; do
    [ -x "$TARGET/$PROFILE/$name" ] || die "$TARGET/$PROFILE/$name is missing"
    cp "$TARGET/$PROFILE/$name" "$OUT/bin/$name.new"
    strip --strip-debug "$OUT/bin/$name.new"
    mv "$OUT/bin/$name.new" "$OUT/bin/$name"
  done
  local op=$OUT/bin/fathom-operator runner=$OUT/bin/fathom-node-runner
  mapfile -t op_libs < <(libs_of "$op")
  mapfile -t runner_libs < <(libs_of "$runner")
  python3 e2e/cluster/oci-image.py --name "$REGISTRY/fathom-operator:$VERSION" \
    --out "$OUT/fathom-operator.tar" --user 65532:65532 --entrypoint /fathom-operator \
    --env PATH=/ "$op:/fathom-operator:0755" "${op_libs[@]}"
  python3 e2e/cluster/oci-image.py --name "$REGISTRY/fathom-node-runner:$VERSION" \
    --out "$OUT/fathom-node-runner.tar" --entrypoint /fathom-node-runner \
    --env PATH=/ "$runner:/fathom-node-runner:0755" "${runner_libs[@]}"
  # The kubectl plugin as a release binary beside the images.
  cp "$OUT/bin/kubectl-fathom" "$OUT/kubectl-fathom"
  local f
  echo "images of the $PROFILE binaries:"
  for f in "$OUT"/fathom-operator.tar "$OUT"/fathom-node-runner.tar "$OUT"/kubectl-fathom; do
    printf '%s\t%s bytes\n' "$f" "$(stat -c %s "$f")"
  done
}

load() {
  local sock=$STATE/containerd/containerd.sock
  [ -S "$sock" ] || die "no cluster containerd at $sock (scripts/cluster.sh up)"
  local name
  for name in fathom-operator fathom-node-runner; do
    [ -f "$OUT/$name.tar" ] || die "$OUT/$name.tar is missing (scripts/images.sh build)"
    ctr --address "$sock" -n k8s.io images import --all-platforms "$OUT/$name.tar" >/dev/null \
      || die "importing $OUT/$name.tar failed"
    # Pinned: the kubelet's image garbage collection must never remove an image no registry
    # could give back.
    ctr --address "$sock" -n k8s.io images label "$REGISTRY/$name:$VERSION" \
      io.cri-containerd.pinned=pinned >/dev/null || die "pinning $REGISTRY/$name:$VERSION failed"
  done
  ctr --address "$sock" -n k8s.io images ls | awk -v r="$REGISTRY/fathom-" 'index($1, r) == 1 { print $1, $4, $5 }'
}

case ${1:-build} in
  build) build ;;
  import) build; load ;;
  load) load ;;
  *) echo "usage: scripts/images.sh build|import|load" >&2; exit 2 ;;
esac
