#!/usr/bin/env bash
# Build the real Kubernetes parts the test bed runs (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet) from Debian's own `kubernetes` source package, and install the
# Debian packages a loopback control plane and a single real node need (etcd, containerd, runc,
# reference CNI plugins, busybox-static and a C compiler for the locally built images).
#
# Why from source: no registry or release download is reachable on CI machines; Debian ships the
# 1.20 source with everything vendored, and Debian's Go 1.19 builds it once reflect2 is swapped
# for Debian's copy (the vendored one segfaults at run time under Go 1.19).
#
# Idempotent: the binaries are cached under ~/.cache/mesh-injector/kube/bin and reused; the
# whole build is skipped when they are all there.
set -euo pipefail

CACHE="${MESH_INJECTOR_CACHE:-$HOME/.cache/mesh-injector}"
KUBE_DIR="$CACHE/kube"
BIN_DIR="$KUBE_DIR/bin"
BUILD_DIR="$KUBE_DIR/build"
WANT_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

log() { echo "30-kube: $*" >&2; }

# --- Debian packages ------------------------------------------------------------------------
apt_need=(
  golang-go etcd-server etcd-client rsync jq golang-github-modern-go-reflect2-dev make
  containerd runc containernetworking-plugins busybox-static gcc libc6-dev iproute2
)
missing=()
for pkg in "${apt_need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
apt_updated=0
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  $SUDO apt-get update -qq
  apt_updated=1
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# containerd's package starts a system daemon when systemd runs; the test bed runs its own
# containerd with its own root and socket, so the system one is neither needed nor touched.

# kubectl matching the 1.20 API server: Debian's kubernetes-client, unpacked into the cache rather
# than installed, so it cannot clash with another `kubectl` package the machine may carry.
if [ ! -x "$BIN_DIR/kubectl" ]; then
  mkdir -p "$BIN_DIR" "$KUBE_DIR/kubectl-deb"
  (cd "$KUBE_DIR/kubectl-deb" && rm -f ./*.deb && apt-get download -qq kubernetes-client >/dev/null) || {
    $SUDO apt-get update -qq && apt_updated=1
    (cd "$KUBE_DIR/kubectl-deb" && apt-get download -qq kubernetes-client >/dev/null)
  }
  rm -rf "$KUBE_DIR/kubectl-deb/root"
  dpkg-deb -x "$KUBE_DIR"/kubectl-deb/kubernetes-client_*.deb "$KUBE_DIR/kubectl-deb/root"
  install -m 0755 "$KUBE_DIR/kubectl-deb/root/usr/bin/kubectl" "$BIN_DIR/kubectl"
  rm -rf "$KUBE_DIR/kubectl-deb"
  log "kubectl $("$BIN_DIR/kubectl" version --client --short 2>/dev/null || true) in $BIN_DIR"
fi

have_all_bins() {
  local b
  for b in "${WANT_BINS[@]}"; do
    [ -x "$BIN_DIR/$b" ] || return 1
  done
}

if have_all_bins; then
  log "cached binaries in $BIN_DIR"
  exit 0
fi

# --- deb-src entry for bookworm ---------------------------------------------------------------
# Same URIs/suites/components/keyring as the machine's Debian `deb` entries, in whichever
# format they use (deb822 `.sources` or one-line `.list`).
SRC_SOURCES=/etc/apt/sources.list.d/mesh-injector-debsrc.sources
SRC_LIST=/etc/apt/sources.list.d/mesh-injector-debsrc.list

has_debsrc() {
  # A deb-src entry for a bookworm suite already configured (by us or by the machine)?
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    grep -Eq '^[[:space:]]*deb-src[[:space:]].*[[:space:]]bookworm([[:space:]]|$)' "$f" && return 0
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN{RS=""; found=0}
         /(^|\n)Types:[^\n]*deb-src/ && /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ \
           && !/(^|\n)Enabled:[ \t]*no/ {found=1}
         END{exit !found}' "$f" && return 0
  done
  return 1
}

add_debsrc() {
  local f tmp_sources tmp_list
  tmp_sources="$(mktemp)"
  tmp_list="$(mktemp)"
  # deb822: copy each enabled Debian stanza that has Types deb and a bookworm suite, as deb-src
  # (only Debian's archives: another vendor's repository may publish no sources at all).
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    [ "$f" = "$SRC_SOURCES" ] && continue
    awk 'BEGIN{RS=""; ORS="\n\n"}
         /(^|\n)Types:[^\n]*(^|[ \t])deb([ \t]|\n|$)/ && /(^|\n)URIs:[^\n]*debian/ \
           && /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ && !/(^|\n)Enabled:[ \t]*no/ {
           n = split($0, lines, "\n"); out = ""
           for (i = 1; i <= n; i++) {
             if (lines[i] ~ /^Types:/) lines[i] = "Types: deb-src"
             out = out lines[i] "\n"
           }
           printf "%s\n", out
         }' "$f" >>"$tmp_sources"
  done
  # One-line format: every Debian `deb ... bookworm...` line becomes a `deb-src` line.
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    [ "$f" = "$SRC_LIST" ] && continue
    sed -nE '/debian/s/^[[:space:]]*deb([[:space:]]+.*[[:space:]]bookworm([-[:alnum:]]*)([[:space:]].*)?)$/deb-src\1/p' \
      "$f" >>"$tmp_list"
  done
  if [ -s "$tmp_sources" ]; then
    $SUDO install -m 0644 "$tmp_sources" "$SRC_SOURCES"
    log "added deb-src entries in $SRC_SOURCES"
  fi
  if [ -s "$tmp_list" ]; then
    $SUDO install -m 0644 "$tmp_list" "$SRC_LIST"
    log "added deb-src entries in $SRC_LIST"
  fi
  rm -f "$tmp_sources" "$tmp_list"
  if [ ! -s "$SRC_SOURCES" ] && [ ! -s "$SRC_LIST" ]; then
    log "no Debian bookworm deb entry found to mirror as deb-src"
    exit 1
  fi
}

# --- source and build -------------------------------------------------------------------------
mkdir -p "$KUBE_DIR" "$BIN_DIR"
SRC_TREE="$BUILD_DIR/src"
if [ ! -f "$SRC_TREE/Makefile" ]; then
  if ! has_debsrc; then
    add_debsrc
    apt_updated=0
  fi
  [ "$apt_updated" = 1 ] || $SUDO apt-get update -qq
  rm -rf "$BUILD_DIR"
  mkdir -p "$BUILD_DIR/dl"
  log "downloading Debian's kubernetes source package"
  (cd "$BUILD_DIR/dl" && apt-get source --download-only -qq kubernetes >/dev/null)
  orig="$(ls "$BUILD_DIR"/dl/kubernetes_*.orig.tar.* | head -n1)"
  mkdir -p "$SRC_TREE"
  tar -xf "$orig" -C "$SRC_TREE" --strip-components=1
  # Debian's reflect2 instead of the vendored one: the vendored copy crashes under Go 1.19.
  rm -rf "$SRC_TREE/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$SRC_TREE/vendor/github.com/modern-go/reflect2"
  rm -f "$SRC_TREE/vendor/github.com/modern-go/reflect2/go.mod"
  mkdir -p "$SRC_TREE/.go/src/k8s.io"
  ln -sfn ../../.. "$SRC_TREE/.go/src/k8s.io/kubernetes"
fi

mkdir -p "$KUBE_DIR/home"
what=""
for b in "${WANT_BINS[@]}"; do what="$what cmd/$b"; done
log "building${what} (several minutes on 2 cores the first time)"
start=$(date +%s)
(
  cd "$SRC_TREE"
  export GOPATH="$SRC_TREE/.go" HOME="$KUBE_DIR/home" CGO_ENABLED=0
  export GOCACHE="$KUBE_DIR/home/go-build"
  make WHAT="${what# }"
) >"$KUBE_DIR/build.log" 2>&1 || {
  tail -n 40 "$KUBE_DIR/build.log" >&2
  log "build failed; full log in $KUBE_DIR/build.log"
  exit 1
}
for b in "${WANT_BINS[@]}"; do
  install -m 0755 "$SRC_TREE/_output/local/bin/linux/amd64/$b" "$BIN_DIR/$b.tmp"
  mv -f "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
done
log "built in $(( $(date +%s) - start ))s; binaries in $BIN_DIR"
