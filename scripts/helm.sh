#!/usr/bin/env bash
# The project's Helm: built from the Go module pinned in e2e/cluster/helm (go.mod/go.sum pin
# helm.sh/helm/v3), cached in /var/cache/fathom/helm/<version>/helm with a stamp of the
# module's go.mod and go.sum (a changed pin rebuilds; otherwise nothing is built).
#
#   scripts/helm.sh --build     build if needed, print the binary's path
#   scripts/helm.sh --path      print the path (exit 1 if not built)
#   scripts/helm.sh ARGS...     build if needed, run helm ARGS
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
MOD=$HERE/e2e/cluster/helm
VERSION=$(sed -n 's#^require helm.sh/helm/v3 \(v[^ ]*\).*#\1#p' "$MOD/go.mod")
[ -n "$VERSION" ] || { echo "helm.sh: no helm.sh/helm/v3 version in $MOD/go.mod" >&2; exit 1; }
CACHE=${FATHOM_HELM_CACHE:-/var/cache/fathom/helm/$VERSION}
BIN=$CACHE/helm
STAMP=$CACHE/stamp
want=$(cat "$MOD/go.mod" "$MOD/go.sum" | sha256sum | cut -d' ' -f1)

build() {
  if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    return
  fi
  command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || PATH=/usr/local/go/bin:$PATH
  command -v go >/dev/null || { echo "helm.sh: go is not installed (Helm is built from its Go module)" >&2; exit 1; }
  mkdir -p "$CACHE"
  echo "[helm] building helm $VERSION from $MOD (go.sum-pinned; once)" >&2
  (cd "$MOD" && go build -mod=readonly -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION" \
      -o "$BIN.new" helm.sh/helm/v3/cmd/helm) \
    || { echo "helm.sh: building helm $VERSION failed (go build in $MOD)" >&2; exit 1; }
  "$BIN.new" version --short >/dev/null
  mv "$BIN.new" "$BIN"
  echo "$want" >"$STAMP"
}

case ${1:-} in
  --build) build; echo "$BIN" ;;
  --path) [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] || { echo "helm.sh: helm $VERSION is not built (scripts/helm.sh --build; scripts/test.sh builds it)" >&2; exit 1; }; echo "$BIN" ;;
  *) build; exec "$BIN" "$@" ;;
esac
