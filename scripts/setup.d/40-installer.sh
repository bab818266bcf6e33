#!/usr/bin/env bash
# The CNI installer's test needs: patchelf (the agent points the bundled interpreter at the
# bundled loader and libraries with it; the CNI image installs it too), ldd (libc-bin) and
# util-linux's chroot/unshare (hiding host Pythons when proving the installed plugin runs
# without them). Idempotent: apt only when something is missing.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
apt_need patchelf libc-bin util-linux coreutils
