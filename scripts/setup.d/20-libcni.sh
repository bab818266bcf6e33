#!/usr/bin/env bash
# CNI test bed: nftables/iproute2 (inspection only), Debian's reference CNI plugins, and our
# libcni driver (tools/libcni-driver) built with Debian's Go in GOPATH mode against Debian's
# libcni source. Idempotent; the binary is cached under ~/.cache/mesh-injector/ by source hash.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
need=(nftables iproute2 containernetworking-plugins golang-go golang-github-appc-cni-dev)
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

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
