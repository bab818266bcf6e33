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
#: Largest CNI config file we read. Real ones are a few KiB; a huge file in the net dir must not
#: cost the agent (limited to a few hundred MiB) its memory.
MAX_CONFIG_BYTES = 1 << 20


class ConfigTooLarge(OSError):
    """A net-dir file over MAX_CONFIG_BYTES: not read, reported by name and size."""

    def __init__(self, path: Path, size: int, limit: int) -> None:
        super().__init__(errno.EFBIG, f"{size} bytes, over MAX_CONFIG_BYTES ({limit})", str(path))
        self.size = size


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
    through_links: bool = False,
) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename.

    ``mode``/``owner`` default to the existing file's (so other agents' files keep theirs).
    ``expect_unchanged``: the stat we read the old content under; if the file was replaced in
    the meantime we raise ``FileChangedError`` instead of clobbering the newer content.
    ``through_links``: when ``path`` is a symlink, replace the file it points to and keep the
    link (a net dir managed by links stays managed by links). On any error (ENOSPC included)
    the old file is untouched and the temp file removed.
    """
    path = Path(path)
    if through_links and path.is_symlink():
        path = Path(os.path.realpath(path))
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


def read_regular(path: Path, *, max_bytes: int = MAX_CONFIG_BYTES) -> tuple[bytes, os.stat_result] | None:
    """A regular file's bytes (through symlinks) and its stat; None when missing or not regular.

    Never blocks and never opens special files: stat first, then open O_NONBLOCK and check the
    opened file again (it may have been swapped). Over ``max_bytes``: ConfigTooLarge, unread.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if st.st_size > max_bytes:
        raise ConfigTooLarge(path, st.st_size, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        chunks, size = [], 0
        while chunk := os.read(fd, max_bytes + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ConfigTooLarge(path, size, max_bytes)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def read_dir_files(
    directory: Path, suffixes: tuple[str, ...], *, max_bytes: int = MAX_CONFIG_BYTES
) -> tuple[dict[str, tuple[bytes, os.stat_result]], dict[str, int]]:
    """The regular files of a directory with one of ``suffixes`` (hidden ones skipped), with their
    bytes and the stat they were read under; and, apart, the names and sizes of those too large."""
    out: dict[str, tuple[bytes, os.stat_result]] = {}
    oversized: dict[str, int] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out, oversized
    for name in names:
        if name.startswith(".") or not name.endswith(suffixes):
            continue
        try:
            found = read_regular(directory / name, max_bytes=max_bytes)
        except ConfigTooLarge as err:
            oversized[name] = err.size
            continue
        except (IsADirectoryError, PermissionError):
            continue
        if found is not None:
            out[name] = found
    return out, oversized


def remove_file(path: Path) -> bool:
    """Unlink if present; True when something was removed."""
    try:
        retry_busy(lambda: os.unlink(path))
    except FileNotFoundError:
        return False
    _fsync_dir(Path(path).parent)
    return True
