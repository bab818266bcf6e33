"""inotify through ctypes: wake up when a watched directory changes, sleep otherwise.

The agent spends its life waiting; with inotify the kernel wakes it on the exact change, so the
net dir is not hot-polled and a rewrite is noticed in milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

DIR_EVENTS = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class DirWatcher:
    """Watches directories; ``fileno()`` becomes readable on change, ``drain()`` says which dirs."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._dirs: dict[int, Path] = {}

    def fileno(self) -> int:
        return self._fd

    def watch(self, directory: Path) -> bool:
        """(Re-)watch a directory; False when it does not exist (yet)."""
        directory = Path(directory)
        if directory in self._dirs.values():
            return True
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(directory), DIR_EVENTS)
        if wd < 0:
            return False
        self._dirs[wd] = directory
        return True

    def watched(self) -> set[Path]:
        return set(self._dirs.values())

    def drain(self) -> set[Path]:
        """Read all pending events; the set of directories that changed (a gone dir is unwatched)."""
        changed: set[Path] = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return changed
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size + length
                directory = self._dirs.get(wd)
                if directory is None:
                    continue
                changed.add(directory)
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self._dirs.pop(wd, None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
