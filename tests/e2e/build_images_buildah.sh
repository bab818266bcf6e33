#!/usr/bin/env bash
# Build Dockerfile.cni and Dockerfile.injector for real, without a Docker engine, with Debian's
# buildah, and write them as OCI archives the test node imports (`ctr images import`).
#
# No registry is reachable here, so the Dockerfiles' default base (python:3.11.13-slim-bookworm
# from Docker Hub) cannot be pulled. We make a stand-in base locally instead:
#   debootstrap bookworm (minbase + python3, python3-venv, ca-certificates) from the Debian
#   mirror, then `python3 -m venv /usr/local` so `python`/`pip` live in /usr/local as in the
#   official image (the Dockerfiles call `python -m venv`, `python -m pip uninstall pip ...`);
#   the machine's CA bundle is copied in so pip inside the build trusts the same TLS chain as
#   the host (PyPI is reached through an intercepting proxy here).
# The Dockerfiles are used unchanged, with --build-arg PYTHON_IMAGE=<that base>.
# Differences from the official base: Debian's Python 3.11.2 (not 3.11.13).
#
# Storage (vfs) and the base rootfs are cached under ~/.cache/mesh-injector/buildah; archives go
# to OUT_DIR (default that cache). Idempotent: a cached base is reused; images are rebuilt.
#   tests/e2e/build_images_buildah.sh [OUT_DIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${HOME}/.cache/mesh-injector/buildah"
out="${1:-$cache}"
base=localhost/mesh-base/python:3.11-bookworm
mkdir -p "$cache" "$out"

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get install -y -q buildah debootstrap || { apt-get update -q && apt-get install -y -q buildah debootstrap; }
fi
B=(buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)

if ! "${B[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  if [ ! -x "$cache/rootfs/usr/bin/python3" ]; then
    rm -rf "$cache/rootfs.partial"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$cache/rootfs.partial" http://deb.debian.org/debian
    rm -f "$cache/rootfs.partial"/var/cache/apt/archives/*.deb
    mv "$cache/rootfs.partial" "$cache/rootfs"
  fi
  ctr=$("${B[@]}" from scratch)
  trap '"${B[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
  mnt=$("${B[@]}" mount "$ctr")
  cp -a "$cache/rootfs/." "$mnt/"
  cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/ca-certificates.crt"
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" run --isolation chroot --network host "$ctr" -- python3 -m venv /usr/local
  "${B[@]}" config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python "$ctr"
  "${B[@]}" commit -q "$ctr" "$base" >/dev/null
fi

cd "$repo"
for name in cni injector; do
  image="docker.io/mesh-injector/mesh-${name}:buildah"
  "${B[@]}" bud -q --isolation chroot --network host --pull=never \
    --build-arg PYTHON_IMAGE="$base" -f "Dockerfile.${name}" -t "$image" . >/dev/null
  rm -f "$out/mesh-${name}-buildah.tar"
  "${B[@]}" push -q "$image" "oci-archive:$out/mesh-${name}-buildah.tar:$image"
  echo "$out/mesh-${name}-buildah.tar"
done
