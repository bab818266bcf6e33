#!/usr/bin/env bash
# The test bed's node runtime: containerd 2 (daemon, runc v2 shim, ctr) and runc from their Go
# modules pinned in tools/containerd and tools/runc, cached in
# ~/.cache/mesh-injector/{containerd,runc}-<version>/bin. Debian's containerd 1.6 lacks the CRI
# RuntimeConfig call kubelet 1.37 uses and is past its support; runc is containerd's tested version.
# Also the packages the node's locally built images need: busybox-static, gcc/libc6-dev (pause,
# and runc's cgo nsenter), libseccomp-dev/pkg-config (runc with seccomp: containerd 2 gives
# every sandbox a seccomp profile, which a runc built without it refuses to start).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
apt_need busybox-static gcc libc6-dev libseccomp-dev pkg-config iproute2 containernetworking-plugins

version=$(awk '$1 == "github.com/containerd/containerd/v2" {print $2; exit}' tools/containerd/go.mod)
ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$version"
ldflags="$ldflags -X github.com/containerd/containerd/v2/version.Revision=module"
GO_BUILD_FLAGS=(-tags=no_btrfs,no_devmapper,no_zfs,urfave_cli_no_docs "-ldflags=$ldflags")
go_bins_build containerd "$version" tools/containerd \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr >/dev/null

version=$(awk '$1 == "github.com/opencontainers/runc" {print $2; exit}' tools/runc/go.mod)
GO_BUILD_FLAGS=(-tags=seccomp "-ldflags=-s -w -X main.version=${version#v}")
bindir=$(CGO_ENABLED=1 go_bins_build runc "$version" tools/runc github.com/opencontainers/runc)
"$bindir/runc" --version | sed -n 1p >&2  # sed reads it all: no SIGPIPE under pipefail
