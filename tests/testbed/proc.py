"""Process plumbing for the test bed: free loopback ports, started daemons, and stopping them by pid.

Every daemon is started in its own session with its output in a log file, and is stopped only
through the pid we recorded when starting it (checked against /proc so a recycled pid is never
signalled), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TestbedError(RuntimeError):
    """A part of the test bed failed to start; the message points at its log."""

    __test__ = False  # not a pytest test class


CACHE_DIR = Path(os.environ.get("MESH_INJECTOR_CACHE", Path.home() / ".cache" / "mesh-injector"))
#: The Go modules under tools/ pin each built part (scripts/setup.d builds and caches them).
TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"
#: binary -> (tools/<dir>, the module whose version names the cache dir, cache part name).
PINNED_BINARIES: dict[str, tuple[str, str, str]] = {
    **{
        name: ("kube", "k8s.io/kubernetes", "kube")
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
    },
    "etcd": ("etcd", "go.etcd.io/etcd/server/v3", "etcd"),
    "containerd": ("containerd", "github.com/containerd/containerd/v2", "containerd"),
    "containerd-shim-runc-v2": ("containerd", "github.com/containerd/containerd/v2", "containerd"),
    "ctr": ("containerd", "github.com/containerd/containerd/v2", "containerd"),
    "runc": ("runc", "github.com/opencontainers/runc", "runc"),
}


def pinned_version(tool_dir: str, module: str) -> str:
    """The version of `module` that tools/<tool_dir>/go.mod pins (what setup built and cached)."""
    for line in (TOOLS_DIR / tool_dir / "go.mod").read_text().splitlines():
        words = line.split()
        if words[:1] == ["require"]:
            words = words[1:]
        if len(words) >= 2 and words[0] == module and words[1].startswith("v"):
            return words[1]
    raise TestbedError(f"tools/{tool_dir}/go.mod pins no {module}")


def pinned_binary(name: str) -> Path:
    """Where scripts/setup.d left a pinned binary: ~/.cache/mesh-injector/<part>-<version>/bin/<name>."""
    tool_dir, module, part = PINNED_BINARIES[name]
    if part == "kube" and os.environ.get("MESH_KUBE_BIN_DIR"):
        return Path(os.environ["MESH_KUBE_BIN_DIR"]) / name
    return CACHE_DIR / f"{part}-{pinned_version(tool_dir, module)}" / "bin" / name


#: The Kubernetes release the test bed runs (tools/kube/go.mod), e.g. "v1.37.2".
KUBE_VERSION = pinned_version("kube", "k8s.io/kubernetes")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kube_binary(name: str) -> Path:
    return pinned_binary(name)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat): a pid's identity over reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass
class Daemon:
    """A started process: its name, pid, start time (to tell it from a recycled pid) and log file."""

    name: str
    pid: int
    start_time: str | None
    log: Path

    def alive(self) -> bool:
        if self.start_time is None or _start_time(self.pid) != self.start_time:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only if the pid is still the process we started."""
        try:
            if not self.alive():
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.1)
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self.alive() and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.05)
        finally:
            self._reap()  # a child that exited between two checks must not stay a zombie

    def _reap(self) -> None:
        """Collect the exit status when it is our child, so it does not linger as a zombie."""
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time, "log": str(self.log)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Daemon:
        return cls(str(data["name"]), int(data["pid"]), data.get("start_time"), Path(str(data["log"])))  # type: ignore[arg-type]


def start_daemon(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Daemon:
    """Start `argv` detached (own session, stdin closed), logging to `log_dir/name.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    return Daemon(name, proc.pid, _start_time(proc.pid), log)


def wait_until(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    *,
    daemons: Sequence[Daemon] = (),
    interval: float = 0.2,
) -> None:
    """Poll `check` until true; fail early with the log tail when one of `daemons` died."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        for daemon in daemons:
            if not daemon.alive():
                raise TestbedError(f"{daemon.name} exited while waiting for {what}:\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {d.name} ({d.log})\n{d.log_tail()}" for d in daemons)
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(interval)


def wait_for(
    what: str,
    fetch: Callable[[], Any],
    timeout: float = 60.0,
    *,
    interval: float = 0.2,
    transient: tuple[type[Exception], ...] = (),
) -> Any:
    """The first truthy value of ``fetch()``; AssertionError naming ``what`` after ``timeout`` s.

    ``transient``: exceptions from ``fetch`` that mean "not yet" (e.g. a file not written yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fetch()
        except transient:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def save_state(path: Path, state: Mapping[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)


def load_state(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes from ``src`` to ``dst`` until EOF, then half-close ``dst`` (a TCP relay's one direction)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
