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


def open_netns(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsMissing(2, f"network namespace {path} does not exist") from None
    return fd


class entered:
    """Context manager: the calling thread is inside the netns at ``path`` within the block."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.home = -1
        self.target = -1

    def __enter__(self) -> entered:
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
