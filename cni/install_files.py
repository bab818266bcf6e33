"""Filesystem shells of the installer: atomic writes that keep mode/owner, and the ETXTBSY retry.

Every file we put on the host is written to a temp file in the same directory and renamed over
the target, so a runtime reading the net dir or exec'ing the plugin sees the old or the new
file, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: How long to retry while the kernel says "text file busy" (a runtime is exec'ing the file).
ETXTBSY_RETRY_SECONDS = 5.0


def retry_busy(action: Callable[[], T], *, deadline_s: float = ETXTBSY_RETRY_SECONDS) -> T:
    """Run ``action``, retrying with a short sleep while it fails with ETXTBSY."""
    end = time.monotonic() + deadline_s
    delay = 0.01
    while True:
        try:
            return action()
        except OSError as err:
            if err.errno != errno.ETXTBSY or time.monotonic() >= end:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int | None = None,
    owner: tuple[int, int] | None = None,
    expect_unchanged: os.stat_result | None = None,
) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename.

    ``mode``/``owner`` default to the existing file's (so other agents' files keep theirs).
    ``expect_unchanged``: the stat we read the old content under; if the file was replaced in
    the meantime we raise ``FileChangedError`` instead of clobbering the newer content.
    """
    path = Path(path)
    try:
        current = path.stat()
    except FileNotFoundError:
        current = None
    if mode is None:
        mode = stat.S_IMODE(current.st_mode) if current else 0o644
    if owner is None and current is not None:
        owner = (current.st_uid, current.st_gid)
    tmp = path.with_name(f".{path.name}.mesh-cni-tmp.{os.getpid()}")

    def write() -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        retry_busy(write)
        if expect_unchanged is not None and not same_file_version(path, expect_unchanged):
            raise FileChangedError(path)
        retry_busy(lambda: os.rename(tmp, path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileChangedError(RuntimeError):
    """Another writer replaced the file between our read and our rename; re-read and retry."""


def same_file_version(path: Path, seen: os.stat_result) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_mtime_ns, now.st_size) == (seen.st_ino, seen.st_mtime_ns, seen.st_size)


def read_dir_files(directory: Path) -> dict[str, tuple[bytes, os.stat_result]]:
    """Regular files of a directory with their bytes and the stat they were read under."""
    out: dict[str, tuple[bytes, os.stat_result]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        path = directory / name
        try:
            with open(path, "rb") as handle:
                st = os.fstat(handle.fileno())
                if not stat.S_ISREG(st.st_mode):
                    continue
                out[name] = (handle.read(), st)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
    return out


def remove_file(path: Path) -> bool:
    """Unlink if present; True when something was removed."""
    try:
        retry_busy(lambda: os.unlink(path))
    except FileNotFoundError:
        return False
    _fsync_dir(Path(path).parent)
    return True
