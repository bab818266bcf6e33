#!/usr/bin/env bash
# Build the real Istio that tests/istio and bench/bench_istio_*.py compare against: istioctl,
# pilot-discovery (istiod) and the istio-cni plugin, from the module pinned in tools/istio
# (go.mod + go.sum), with the machine's Go (1.26 at /usr/local/go).
#
# Cached: the binaries go to ~/.cache/mesh-injector/istio-<pin>/bin, and the build is skipped
# while every binary is there and the stamp matches tools/istio/go.sum. A new pin is a new
# directory, so changing tools/istio rebuilds and nothing else does.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
# istio-cni in sidecar mode programs a pod's netns with the host's iptables-restore/-save
# (bench/bench_istio_cni.py runs it); our plugin needs neither.
apt_need iptables

CACHE="${MESH_INJECTOR_CACHE:-$HOME/.cache/mesh-injector}"
PIN="$(awk '$1 == "istio.io/istio" {print $2}' tools/istio/go.mod)"
ISTIO_VERSION="$(bash tools/istio/version.sh)"
BIN_DIR="$CACHE/istio-$ISTIO_VERSION/bin"
STAMP="$BIN_DIR/.go.sum.sha256"
WANT_SUM="$(sha256sum tools/istio/go.sum | cut -d' ' -f1)"
CMDS=(istioctl/cmd/istioctl pilot/cmd/pilot-discovery cni/cmd/istio-cni)

log() { echo "60-istio: $*" >&2; }

have_all() {
  local c
  for c in "${CMDS[@]}"; do [ -x "$BIN_DIR/$(basename "$c")" ] || return 1; done
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_SUM" ]
}
if have_all; then
  log "cached binaries in $BIN_DIR"
  exit 0
fi

export PATH="/usr/local/go/bin:$PATH"  # never Debian's Go 1.19
export GOMODCACHE="${GOMODCACHE:-$CACHE/gomod}" GOCACHE="${GOCACHE:-$CACHE/go-build}"
export GOFLAGS="${GOFLAGS:--modcacherw}" CGO_ENABLED=0
mkdir -p "$BIN_DIR"
# What `istioctl version` and `manifest generate` report (the default image tag comes from it).
ldflags="-s -w -X istio.io/istio/pkg/version.buildVersion=$ISTIO_VERSION"
ldflags+=" -X istio.io/istio/pkg/version.buildGitRevision=${PIN##*-}"
ldflags+=" -X istio.io/istio/pkg/version.buildHub=docker.io/istio"
ldflags+=" -X istio.io/istio/pkg/version.buildStatus=Clean -X istio.io/istio/pkg/version.buildTag=$ISTIO_VERSION"
start=$(date +%s)
for c in "${CMDS[@]}"; do
  log "building istio.io/istio/$c ($PIN)"
  (cd tools/istio && go build -trimpath -ldflags "$ldflags" -o "$BIN_DIR/$(basename "$c")" "istio.io/istio/$c")
done
echo "$WANT_SUM" > "$STAMP"
log "built in $(( $(date +%s) - start ))s into $BIN_DIR"
