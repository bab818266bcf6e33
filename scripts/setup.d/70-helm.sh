#!/usr/bin/env bash
# Helm for the chart's tests (lint, template, install/upgrade/uninstall against the test bed's
# API server), built from its Go module at the version pinned in tools/helm/go.mod with the
# machine's Go (never Debian's golang-go). Cached under ~/.cache/mesh-injector/helm-<version>;
# rebuilt only when the pin (go.mod/go.sum) changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="/usr/local/go/bin:$PATH"
cache="${MESH_INJECTOR_CACHE:-$HOME/.cache/mesh-injector}"
export GOMODCACHE="${GOMODCACHE:-$cache/gomod}" GOCACHE="${GOCACHE:-$cache/go-build}" GOFLAGS=-modcacherw
version=$(awk '$1 == "require" && $2 == "helm.sh/helm/v4" {print $3}' tools/helm/go.mod)
pin=$(cat tools/helm/go.mod tools/helm/go.sum | sha256sum | cut -c1-12)
dir="$cache/helm-$version"
if [ ! -x "$dir/bin/helm" ] || [ "$(cat "$dir/pin" 2>/dev/null)" != "$pin" ]; then
  mkdir -p "$dir/bin"
  start=$(date +%s)
  (cd tools/helm && CGO_ENABLED=0 go build -trimpath \
    -ldflags "-X helm.sh/helm/v4/internal/version.version=$version" -o "$dir/bin/helm.tmp" helm.sh/helm/v4/cmd/helm)
  mv -f "$dir/bin/helm.tmp" "$dir/bin/helm"
  echo "$pin" >"$dir/pin"
  echo "70-helm: built helm $version in $(( $(date +%s) - start ))s" >&2
fi
echo "70-helm: $("$dir/bin/helm" version --short) in $dir/bin" >&2
