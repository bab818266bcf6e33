"""Entering a pod's network namespace just long enough to open a netlink socket there.

A netlink socket stays bound to the namespace it was created in, so we switch the calling
*thread* into the pod's netns, create the socket and switch straight back: the rest of the
process (and other agent threads) never leave the host namespace. Python 3.11 has no
``os.setns``; ``ctypes`` costs ~7 ms to import, so setns(2) is called through ``_ctypes`` directly.
Opening the namespace with a plain ``open`` never creates one (unlike pyroute2's ``setns``).
"""

from __future__ import annotations

import os

CLONE_NEWNET = 0x40000000


class NetnsMissing(FileNotFoundError):
    """The netns path does not exist (or is not a namespace): DEL treats this as done."""


def _make_setns():  # type: ignore[no-untyped-def]
    import _ctypes

    class _CInt(_ctypes._SimpleCData):  # type: ignore[misc,name-defined]
        _type_ = "i"

    class _Func(_ctypes.CFuncPtr):  # type: ignore[misc,name-defined]
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = _CInt

    func = _Func(_ctypes.dlsym(_ctypes.dlopen(None, 0), "setns"))

    def setns(fd: int, nstype: int) -> None:
        if func(fd, nstype) != 0:
            errno_ = _ctypes.get_errno()
            raise OSError(errno_, f"setns: {os.strerror(errno_)}")

    return setns


_setns = None


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """setns(2) for the calling thread."""
    global _setns
    if _setns is None:
        _setns = getattr(os, "setns", None) or _make_setns()
    _setns(fd, nstype)


NS_GET_NSTYPE = 0xB703  # ioctl: the CLONE_NEW* type of a namespace fd


class NetnsRefused(OSError):
    """The path is a namespace we must never program (ours, the host's) or not a netns at all."""


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def open_netns(path: str) -> int:
    """An fd of the network namespace at ``path``, after proving it is a pod's netns.

    Opened O_PATH first (never blocks, even on a FIFO) and checked by identity, not by name:
    a symlink or bind mount of our own, the calling thread's or PID 1's namespace is refused,
    and so is anything that is not a network namespace.
    """
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsMissing(2, f"network namespace {path} does not exist") from None
    try:
        st = os.fstat(handle)
        ours = _identity("/proc/self/ns/net")
        if not (stat_is_reg(st.st_mode) and ours is not None and st.st_dev == ours[0]):
            raise NetnsRefused(22, f"{path} is not a network namespace")
        identity = (st.st_dev, st.st_ino)
        for own in ("/proc/self/ns/net", "/proc/thread-self/ns/net", "/proc/1/ns/net"):
            if identity == _identity(own):
                raise NetnsRefused(1, f"{path} is the host's or the plugin's own network namespace "
                                      f"({own}); refusing to program it")
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(handle)
    try:
        import fcntl

        if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            raise NetnsRefused(22, f"{path} is a namespace, but not a network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


def stat_is_reg(mode: int) -> bool:
    return mode & 0o170000 == 0o100000  # S_ISREG without importing stat (namespace files are)


#: ``path`` meaning "the namespace we already run in": only ``mesh-cni redirect`` (an init
#: container programming its own pod) asks for it; a plugin's CNI_NETNS is never empty here.
CURRENT = ""


class entered:
    """Context manager: the calling thread is inside the netns at ``path`` within the block."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.home = -1
        self.target = -1

    def __enter__(self) -> entered:
        if self.path == CURRENT:
            return self
        self.target = open_netns(self.path)
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(self.target)
        except OSError as error:
            os.close(self.target)
            os.close(self.home)
            if error.errno == 22:  # EINVAL: not a network namespace (e.g. an empty file)
                raise NetnsMissing(2, f"{self.path} is not a network namespace") from None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path == CURRENT:
            return
        try:
            setns(self.home)
        finally:
            os.close(self.home)
            os.close(self.target)


def nft_socket(path: str):  # type: ignore[no-untyped-def]
    """A raw NETLINK_NETFILTER socket (cni.nfnl.NftSocket) living in the netns at ``path``."""
    from cni.nfnl import NftSocket

    with entered(path):
        return NftSocket()
