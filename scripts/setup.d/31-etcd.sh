#!/usr/bin/env bash
# etcd for the test bed's control plane, from the go.etcd.io/etcd/server/v3 module pinned in
# tools/etcd (Debian's etcd 3.4 is older than the 3.5 minimum of current Kubernetes).
# Cached in ~/.cache/mesh-injector/etcd-<version>/bin/etcd.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
version=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' tools/etcd/go.mod)
GO_BUILD_FLAGS=("-ldflags=-s -w")
bindir=$(go_bins_build etcd "$version" tools/etcd etcd=go.etcd.io/etcd/server/v3)
"$bindir/etcd" --version | sed -n 1p >&2  # sed reads it all: no SIGPIPE under pipefail
