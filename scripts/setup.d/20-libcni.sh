#!/usr/bin/env bash
# CNI test bed: nftables/iproute2 (inspection only), Debian's reference CNI plugins, and our
# libcni driver (tools/libcni-driver) built with Debian's Go in GOPATH mode against Debian's
# libcni source. Idempotent; the binary is cached under ~/.cache/mesh-injector/ by source hash.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
apt_need nftables iproute2 containernetworking-plugins golang-go golang-github-appc-cni-dev

cache="${HOME}/.cache/mesh-injector/libcni-driver"
src_hash=$(sha256sum tools/libcni-driver/main.go | cut -c1-16)
bin="$cache/libcni-driver-$src_hash"
if [ ! -x "$bin" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/src/mesh-injector/libcni-driver" "$cache"
  cp tools/libcni-driver/main.go "$work/src/mesh-injector/libcni-driver/"
  (cd "$work/src/mesh-injector/libcni-driver" &&
    GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOCACHE="$cache/gocache" CGO_ENABLED=0 \
      go build -o "$bin.tmp" .)
  mv "$bin.tmp" "$bin"
fi
ln -sfn "$bin" "$cache/libcni-driver"
echo "libcni driver: $cache/libcni-driver" >&2
