"""Pods with a real Envoy: a CNI-wired netns (bridge + host-local + mesh-cni, so the redirect is
in place), our test app, and the agent running Envoy as the proxy uid with the injector's bootstrap.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from injector.envoy_bootstrap import BootstrapSettings, bootstrap_json
from tests.cni.cnitest import INJECTED, UNPRIVILEGED_PYTHON, CniBed, Pod, _enter
from tests.envoy.envoyenv import envoy_binary

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROXY_UID = 1337
#: The agent runs as the proxy uid with the system Python (the venv may be unreadable to it):
#: it needs the standard library only.
AGENT = [
    "-S",
    "-c",
    f"import sys; sys.path.insert(0, {str(REPO)!r}); from proxyagent.agent import main; sys.exit(main())",
]


def _preexec(netns: str, uid: int | None) -> Any:
    def prepare() -> None:
        os.setsid()
        _enter(netns)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    return prepare


def spawn(
    pod: Pod,
    argv: Sequence[str],
    *,
    uid: int | None = None,
    env: Mapping[str, str] | None = None,
    stdout: Any = subprocess.PIPE,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(argv),
        preexec_fn=_preexec(pod.netns, uid),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
    )


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def requests(
    pod: Pod, reqs: list[dict[str, Any]], *, uid: int | None = None, timeout: float = 60
) -> list[dict[str, Any]]:
    """Run raw client requests from inside ``pod`` (tests/envoy/client.py), in order."""
    done = subprocess.run(
        [UNPRIVILEGED_PYTHON, "-I", "-S", str(HERE / "client.py")],
        input=json.dumps(reqs),
        preexec_fn=_preexec(pod.netns, uid),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def get(pod: Pod, host: str, port: int, target: str, **kw: Any) -> dict[str, Any]:
    return requests(pod, [{"http": [host, port], "target": target, **kw}])[0]


@dataclass
class Meshed:
    """One meshed pod: app + agent + Envoy. ``log`` is the proxy's stdout (access log lines)."""

    pod: Pod
    log: Path
    agent: subprocess.Popen[str] | None = None
    app: subprocess.Popen[str] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start_app(self, *, grpc: bool = False) -> None:
        argv = [sys.executable, str(HERE / "app.py"), "8080", *(["--grpc"] if grpc else [])]
        self.app = spawn(self.pod, argv)
        assert self.app.stdout is not None
        line = self.app.stdout.readline()
        assert line.strip() == "ready", self.app.stderr.read() if self.app.stderr else line

    def stop_app(self) -> None:
        stop(self.app)
        self.app = None

    def start_agent(
        self,
        *,
        settings: BootstrapSettings | None = None,
        wait: bool = True,
        concurrency: int = 1,
        bootstrap: str | None = None,
    ) -> None:
        """Run the agent (and so Envoy) as the proxy uid; ``bootstrap`` replaces the rendered one."""
        env = {"PATH": "/usr/bin:/bin", "INSTANCE_IP": self.pod.ipv4, **self.env}
        argv = [
            UNPRIVILEGED_PYTHON,
            *AGENT,
            "run",
            "--envoy",
            str(envoy_binary()),
            "--config-yaml",
            bootstrap if bootstrap is not None else bootstrap_json(settings),
            "--",
            "--log-level",
            "warning",
            "--disable-hot-restart",
            "--concurrency",
            str(concurrency),
        ]
        out = self.log.open("a")
        os.chown(self.log, PROXY_UID, PROXY_UID)  # Envoy reopens /dev/stdout as the proxy uid
        self.agent = spawn(self.pod, argv, uid=PROXY_UID, env=env, stdout=out)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.agent is not None and self.agent.poll() is None, self.agent_stderr()
            if get(self.pod, "127.0.0.1", 15021, "/healthz/ready", timeout=1).get("status") == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"Envoy not ready after {timeout}s: {self.agent_stderr()}")

    def agent_stderr(self) -> str:
        if self.agent is None or self.agent.poll() is None or self.agent.stderr is None:
            return "(running)"
        return self.agent.stderr.read()[-3000:]

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges, read from admin on the pod's loopback."""
        reply = get(self.pod, "127.0.0.1", 15000, "/stats")
        out: dict[str, int] = {}
        for line in reply["body"].splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def access_log(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    lines.append(item)
        return lines

    def close(self) -> None:
        stop(self.agent)
        stop(self.app)


@contextlib.contextmanager
def meshed_pod(
    bed: CniBed,
    tmp: Path,
    *,
    env: Mapping[str, str] | None = None,
    grpc: bool = False,
    agent: bool = True,
    settings: BootstrapSettings | None = None,
) -> Iterator[Meshed]:
    pod = bed.add_pod("meshnet", dict(INJECTED))
    mesh = Meshed(pod=pod, log=tmp / f"{pod.name}-proxy.log", env=dict(env or {}))
    try:
        mesh.start_app(grpc=grpc)
        if agent:
            mesh.start_agent(settings=settings)
        yield mesh
    finally:
        mesh.close()
