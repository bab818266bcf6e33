#!/usr/bin/env bash
# CNI test bed: nftables/iproute2 (inspection only), Debian's reference CNI plugins (1.1.1: CNI
# spec up to 1.0.0, what the test conflists use), and our libcni driver (tools/libcni-driver), a
# Go module on github.com/containernetworking/cni at the version containerd uses, built with the
# machine's Go. Cached in ~/.cache/mesh-injector/libcni-driver-<version>/bin; the stable path
# ~/.cache/mesh-injector/libcni-driver/libcni-driver links to it (tests run that path).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
apt_need nftables iproute2 containernetworking-plugins

cache="${MESH_INJECTOR_CACHE:-$HOME/.cache/mesh-injector}"
version=$(awk '$1 == "require" && $2 == "github.com/containernetworking/cni" {print $3}' tools/libcni-driver/go.mod)
GO_BUILD_FLAGS=("-ldflags=-s -w")
bindir=$(go_bins_build libcni-driver "$version" tools/libcni-driver libcni-driver=.)
# `go build -o DIR/ .` names the binary after the module's last path element.
mkdir -p "$cache/libcni-driver"
ln -sfn "$bindir/libcni-driver" "$cache/libcni-driver/libcni-driver"
echo "libcni driver: $cache/libcni-driver/libcni-driver (libcni $version)" >&2
