# Shared by scripts/setup and scripts/setup.d/*.sh (sourced, not run).

# The machine's Go (/usr/local/go) first, whatever else is on PATH (Debian's golang-go is 1.19 and
# must never be the one that builds a module); one shared module and build cache for all parts.
go_env() {
  local cache="${MESH_INJECTOR_CACHE:-$HOME/.cache/mesh-injector}"
  [ -x /usr/local/go/bin/go ] && PATH="/usr/local/go/bin:$PATH"
  export PATH
  export GOMODCACHE="${GOMODCACHE:-$cache/gomod}" GOCACHE="${GOCACHE:-$cache/go-build}"
  export GOFLAGS="${GOFLAGS:--modcacherw}" GOTOOLCHAIN=local CGO_ENABLED="${CGO_ENABLED:-0}"
  if ! go version >/dev/null 2>&1; then
    echo "no Go toolchain: the polyglot machines carry Go 1.26 at /usr/local/go" >&2
    return 1
  fi
}

# go_bins_build PART VERSION MODDIR [NAME=]PKG...: build the Go packages PKG (module MODDIR's
# go.mod/go.sum pins them) into ~/.cache/mesh-injector/PART-VERSION/bin, unless every binary is
# there already with the same pins (a stamp holds the hash of go.mod, go.sum, MODDIR's own *.go
# and the build flags). A binary is named after its package's last path element, or NAME.
# Extra `go build` flags come from the array GO_BUILD_FLAGS (may be unset). Prints the bin dir.
go_bins_build() {
  local part="$1" version="$2" moddir="$3" spec name pkg missing=0 key stamp bindir start
  shift 3
  local cache="${MESH_INJECTOR_CACHE:-$HOME/.cache/mesh-injector}"
  bindir="$cache/$part-$version/bin"
  local flags=()
  [ -n "${GO_BUILD_FLAGS+x}" ] && flags=("${GO_BUILD_FLAGS[@]}")
  key=$( (cat "$moddir/go.mod" "$moddir/go.sum" "$moddir"/*.go 2>/dev/null
          printf '%s\n' "${flags[@]}" "$@" "${CGO_ENABLED:-0}") | sha256sum | cut -c1-16)
  stamp="$bindir/.pins-$key"
  for spec in "$@"; do
    name="${spec%%=*}"
    [ "$name" = "$spec" ] && name="${spec##*/}"
    [ -x "$bindir/$name" ] || missing=1
  done
  if [ "$missing" = 0 ] && [ -f "$stamp" ]; then
    echo "$part $version: cached in $bindir" >&2
    echo "$bindir"
    return 0
  fi
  go_env
  mkdir -p "$bindir"
  rm -f "$bindir"/.pins-*
  echo "$part $version: building $* (go $(go env GOVERSION))" >&2
  start=$(date +%s)
  for spec in "$@"; do
    name="${spec%%=*}"
    pkg="${spec#*=}"
    [ "$name" = "$spec" ] && name="${spec##*/}"
    (cd "$moddir" && go build -trimpath "${flags[@]}" -o "$bindir/$name.tmp" "$pkg") >&2
    mv -f "$bindir/$name.tmp" "$bindir/$name"
  done
  touch "$stamp"
  echo "$part $version: built in $(( $(date +%s) - start ))s" >&2
  echo "$bindir"
}

# apt_wait_lock: wait (up to MESH_APT_LOCK_WAIT seconds, default 600) while another apt/dpkg
# process holds the dpkg or apt lists lock, instead of failing on it. flock on the lock files
# is what apt itself takes (fcntl locks; flock(1) -w uses flock, so probe with fuser too).
apt_wait_lock() {
  local limit="${MESH_APT_LOCK_WAIT:-600}" waited=0 f busy
  local locks=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock)
  while :; do
    busy=""
    for f in "${locks[@]}"; do
      [ -e "$f" ] || continue
      if _lock_held "$f"; then busy="$f"; break; fi
    done
    [ -n "$busy" ] || return 0
    if [ "$waited" -ge "$limit" ]; then
      echo "apt: $busy still held after ${limit}s (MESH_APT_LOCK_WAIT)" >&2
      return 1
    fi
    [ "$waited" = 0 ] && echo "apt: waiting for $busy (held by another apt/dpkg)" >&2
    sleep 2
    waited=$((waited + 2))
  done
}

# _lock_held FILE: true when some process holds an fcntl lock on FILE (what apt and dpkg take).
_lock_held() {
  python3 - "$1" <<'PY'
import fcntl, struct, sys
try:
    fd = open(sys.argv[1], "rb+")
except OSError:
    sys.exit(1)
# F_GETLK: ask whether a write lock could be placed; l_type F_UNLCK back means free.
req = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
sys.exit(0 if struct.unpack("hhqqi", res)[0] != fcntl.F_UNLCK else 1)
PY
}

# apt_get ARGS...: apt-get after waiting for the lock; retried once more on a lock race (another
# apt starting between our check and apt's own lock attempt exits 100 with "Could not get lock").
apt_get() {
  local sudo="" try out rc
  [ "$(id -u)" = 0 ] || sudo="sudo"
  for try in 1 2 3 4 5; do
    apt_wait_lock || return 1
    out=$(DEBIAN_FRONTEND=noninteractive $sudo apt-get "$@" 2>&1) && rc=0 || rc=$?
    if [ "$rc" != 0 ] && grep -q "Could not get lock\|Unable to acquire the dpkg\|Unable to lock" <<<"$out"; then
      sleep 3
      continue
    fi
    [ "$rc" = 0 ] || echo "$out" >&2
    return "$rc"
  done
  echo "$out" >&2
  return 1
}

# apt_need PKG...: apt-get install the packages that are not installed yet; nothing when all are.
apt_need() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "apt: installing ${missing[*]}" >&2
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
