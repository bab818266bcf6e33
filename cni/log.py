"""A tiny logger for the plugin: stderr plus a size-bounded file; never stdout (that is the runtime's).

``logging`` costs several ms to import per pod start; this is a few lines. The file is appended
with O_APPEND (safe across concurrent plugin processes) and rotated to ``<file>.1`` when it
grows past ``max_bytes``.
"""

from __future__ import annotations

import os
import sys
import time

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}
DEFAULT_MAX_BYTES = 1 << 20


class Log:
    def __init__(self, path: str = "", level: str = "info", max_bytes: int = DEFAULT_MAX_BYTES,
                 context: str = "") -> None:
        self.path = path
        self.level = LEVELS.get(level.lower(), 20)
        self.max_bytes = max_bytes
        self.context = context

    def _write(self, level: str, message: str) -> None:
        if LEVELS[level] < self.level:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        line = f"{stamp} {level.upper()} mesh-cni[{os.getpid()}] {self.context}{message}\n"
        try:  # noqa: SIM105 - contextlib is one more import on the hot path
            sys.stderr.write(line)
        except (OSError, ValueError):
            pass
        if self.path:
            self._append(line.encode())

    def _append(self, data: bytes) -> None:
        try:
            try:
                if os.stat(self.path).st_size + len(data) > self.max_bytes:
                    os.replace(self.path, self.path + ".1")
            except FileNotFoundError:
                os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError:
            pass  # logging must never fail a pod

    def debug(self, message: str) -> None:
        self._write("debug", message)

    def info(self, message: str) -> None:
        self._write("info", message)

    def warn(self, message: str) -> None:
        self._write("warn", message)

    def error(self, message: str) -> None:
        self._write("error", message)
