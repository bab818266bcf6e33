#!/usr/bin/env bash
# Kubernetes for the test bed: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet
# and kubectl built from the k8s.io/kubernetes Go module pinned in tools/kube (go.mod replaces
# each staging module with its published release; go.sum pins every checksum), with the machine's
# Go. Cached in ~/.cache/mesh-injector/kube-<version>/bin, rebuilt only when a binary is missing
# or the pins (go.mod + go.sum) change.
#
# KUBE_BINS="kube-apiserver kubelet" limits the build to those (default: all five).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' tools/kube/go.mod)
[ -n "$version" ] || { echo "30-kube: no k8s.io/kubernetes require in tools/kube/go.mod" >&2; exit 1; }
minor=${version#v1.}
minor=${minor%%.*}
bins=(${KUBE_BINS:-kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl})
pkgs=()
for b in "${bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done

# What hack/lib/version.sh stamps into a release build: without it every component reports
# v0.0.0-master, which the API server's /version, node status and kubectl's skew check all show.
# Build tags as upstream's hack/lib/golang.sh (no test-only code, no gRPC tracing).
ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $p.gitVersion=$version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ldflags="$ldflags -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
GO_BUILD_FLAGS=(-tags=notest,grpcnotrace "-ldflags=-s -w${ldflags}")
bindir=$(go_bins_build kube "$version" tools/kube "${pkgs[@]}")
"$bindir/kube-apiserver" --version >&2 2>/dev/null || true
