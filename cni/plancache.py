"""A node-local cache of ADD's netlink batch, keyed by exactly what the batch is computed from.

Turning annotations into rules is a pure function of (the pod's mesh annotations, captureDNS,
our code), but importing the shared annotation module costs ~35 ms of CPU per fresh plugin
process (dataclasses pulls in inspect, ast, ...). Pods of one workload carry identical mesh
annotations, so the plugin keeps the encoded batch (or the "leave it alone" decision) of each
distinct input in a root-only tmpfs directory and replays it: same input, same bytes.

Soundness: the key covers every annotation under the mesh prefixes (which hold every key the
shared vocabulary reads: a test asserts it), the captureDNS default, the cache format and the
size+mtime of every source file involved. Errors are never cached. The directory is trusted only
when owned by root and not writable by group/others; entries are written to a temp file and
renamed, and the directory is emptied when it holds more than ``MAX_ENTRIES``.
"""

from __future__ import annotations

import marshal
import os

FORMAT = b"mesh-cni plan cache v1"
#: Annotation key prefixes that can influence the decision or the plan.
MESH_PREFIXES = ("sidecar.istio.io/", "traffic.sidecar.istio.io/", "status.sidecar.istio.io/",
                 "traffic.mesh-injector.io/", "proxy.istio.io/")
SOURCES = ("annotations.py", "nftables.py", "nfnl.py", "plugin.py", "plancache.py")
MAX_ENTRIES = 512
DEFAULT_DIR = "/var/run/mesh-cni/plan-cache"

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (hot path)
if TYPE_CHECKING:
    from collections.abc import Mapping


_FINGERPRINT: bytes | None = None


def _fingerprint() -> bytes:
    """Identity of the code that computes plans, taken once per process: a long-running agent
    keys its entries by the code it loaded, not by files upgraded underneath it."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        _FINGERPRINT = _read_fingerprint()
    return _FINGERPRINT


def _read_fingerprint() -> bytes:
    here = os.path.dirname(os.path.abspath(__file__))
    parts = [FORMAT]
    for name in SOURCES:
        st = os.stat(os.path.join(here, name))
        parts.append(b"%s:%d:%d" % (name.encode(), st.st_size, st.st_mtime_ns))
    return b"|".join(parts)


def key(annotations: Mapping[str, str], capture_dns: bool) -> str:
    """The cache key: a hash over every mesh annotation, the DNS default and our code's identity."""
    import _sha256

    relevant = sorted((k, v) for k, v in annotations.items() if k.startswith(MESH_PREFIXES))
    material = marshal.dumps((_fingerprint(), tuple(relevant), bool(capture_dns)))
    return _sha256.sha256(material).hexdigest()


class PlanCache:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    @classmethod
    def open(cls, directory: str) -> PlanCache | None:
        """The cache at ``directory`` (created root-only if missing), or None when it is not trustworthy."""
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.stat(directory)
        except OSError:
            return None
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        return cls(directory)

    def get(self, cache_key: str) -> tuple | None:
        """(\"skip\", reason) or (\"ops\", [(type, flags, payload, description)], reason), or None."""
        try:
            with open(os.path.join(self.directory, cache_key), "rb") as handle:
                entry = marshal.loads(handle.read())
        except (OSError, ValueError, EOFError, TypeError):
            return None
        return entry if isinstance(entry, tuple) and entry[:1] in (("skip",), ("ops",)) else None

    def put(self, cache_key: str, entry: tuple) -> None:
        """Best effort: a cache that cannot be written only costs speed."""
        try:
            names = os.listdir(self.directory)
            if len(names) >= MAX_ENTRIES:
                for name in names:
                    os.unlink(os.path.join(self.directory, name))
            temporary = os.path.join(self.directory, f".{cache_key}.{os.getpid()}")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, marshal.dumps(entry))
            finally:
                os.close(fd)
            os.replace(temporary, os.path.join(self.directory, cache_key))
        except OSError:
            pass
