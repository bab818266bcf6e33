#!/usr/bin/env bash
# The CNI installer's test needs: patchelf (the agent points the bundled interpreter at the
# bundled loader and libraries with it; the CNI image installs it too), ldd (libc-bin) and
# util-linux's chroot/unshare (hiding host Pythons when proving the installed plugin runs
# without them). Idempotent: apt only when something is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=(patchelf libc-bin util-linux coreutils)
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
