"""The proxy agent: runs Envoy as its child and serves the pod's status port, as pilot-agent does.

- ``/app-health/<container>/{readyz,livez,startupz}``: the app's original probe, run now.
- ``/stats/prometheus``: Envoy's stats followed by the app's own metrics (when the injector
  moved the app's prometheus.io annotations to ``ISTIO_PROMETHEUS_ANNOTATIONS``).
- ``/healthz/ready``: Envoy's readiness (its admin ``/ready``), failing while draining.

On SIGTERM the agent fails readiness, stops Envoy's inbound listeners (new inbound connections
are refused), leaves in-flight connections and outbound traffic alone for the drain duration
(Istio's ``terminationDrainDuration``, default 5s), then stops Envoy and exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxyagent import probes
from proxyagent import settings as ps

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

# http.client and http.server are imported where used: the agent execs Envoy before it needs
# them (their import is ~60-90 ms of CPU on the pod's start path), and `wait` needs neither.

DEFAULT_DRAIN_SECONDS = 5.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}  # "ms" before "s"
MAX_DRAIN_SECONDS = 3600.0
_FALSE = ("false", "0", "no", "off", "n", "f")
_TRUE = ("true", "1", "yes", "on", "y", "t")
#: Bytes read from the app's metrics endpoint at most (a misbehaving app cannot exhaust us).
MAX_APP_METRICS = 16 << 20
#: The status port's bounds: concurrent connections (threads) and idle seconds per connection.
MAX_STATUS_CONNECTIONS = 64
STATUS_IDLE_SECONDS = 5.0
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentError(ValueError):
    """Bad agent configuration; the message names the setting."""


def parse_duration(name: str, text: Any) -> float:
    """A protobuf-JSON duration such as ``5s``, ``1.5s``, ``500ms`` or ``2m``, bounded."""
    value = str(text).strip()
    unit = next((u for u in _UNITS if value.endswith(u)), None)
    if unit is None:
        raise AgentError(f"{name}: {text!r} is not a duration like 5s")
    number, scale = value[: -len(unit)], _UNITS[unit]
    try:
        seconds = float(number) * scale
    except ValueError:
        raise AgentError(f"{name}: {text!r} is not a duration like 5s") from None
    if not 0 <= seconds <= MAX_DRAIN_SECONDS:
        raise AgentError(f"{name}: {text!r} is outside 0s..{int(MAX_DRAIN_SECONDS)}s")
    return seconds


def _bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise AgentError(f"{name}: {text!r} is not true or false")


class PodSettings:
    """What the agent takes from the pod: proxy config (annotation) and environment."""

    def __init__(self, env: Mapping[str, str]) -> None:
        try:
            config = json.loads(env.get("PROXY_CONFIG") or "{}")
        except ValueError:
            raise AgentError("PROXY_CONFIG: not JSON") from None
        if not isinstance(config, dict):
            raise AgentError("PROXY_CONFIG: not a JSON object")
        metadata = config.get("proxyMetadata") or {}
        if not isinstance(metadata, dict):
            raise AgentError("PROXY_CONFIG: proxyMetadata must be a mapping")
        # Istio passes proxyMetadata to the proxy as environment; the container's own env wins.
        merged = {str(k): str(v) for k, v in metadata.items()}
        merged.update(env)
        self.drain_seconds = (
            parse_duration("terminationDrainDuration", config["terminationDrainDuration"])
            if config.get("terminationDrainDuration") is not None
            else DEFAULT_DRAIN_SECONDS
        )
        concurrency = config.get("concurrency")
        if concurrency is not None and (not isinstance(concurrency, int) or not 0 <= concurrency <= 64):
            raise AgentError(f"concurrency: {concurrency!r} is not a number of workers in 0..64")
        self.concurrency: int | None = concurrency or None
        self.runtime: dict[str, int] = {}
        if ps.ENV_ACCESS_LOG in merged:
            self.runtime[ps.ACCESS_LOG_KEY] = (
                100 if _bool(ps.ENV_ACCESS_LOG, merged[ps.ENV_ACCESS_LOG]) else 0
            )
        if ps.ENV_MAX_CONNECTIONS in merged:
            text = merged[ps.ENV_MAX_CONNECTIONS].strip()
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= ps.MAX_CONNECTIONS_LIMIT:
                raise AgentError(
                    f"{ps.ENV_MAX_CONNECTIONS}: {text!r} is not in 1..{ps.MAX_CONNECTIONS_LIMIT}"
                )
            for listener in (ps.OUTBOUND_LISTENER, ps.INBOUND_LISTENER):
                self.runtime[ps.connection_limit_key(listener)] = int(text)
        self.probers = probes.parse_probers(env.get("ISTIO_KUBE_APP_PROBERS"))
        self.probe_host = env.get("INSTANCE_IP") or "127.0.0.1"
        self.app_metrics = _app_metrics(env.get("ISTIO_PROMETHEUS_ANNOTATIONS"))
        self.status_port = ps.STATUS_PORT


def _app_metrics(text: str | None) -> tuple[int, str] | None:
    """The app's own scrape target (port, path) saved by the injector's Prometheus merge."""
    if not text:
        return None
    try:
        saved = json.loads(text)
    except ValueError:
        return None
    if not isinstance(saved, dict) or str(saved.get("scrape", "")).strip().lower() in _FALSE:
        return None
    port = str(saved.get("port") or "")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return None
    path = str(saved.get("path") or "/metrics")
    return int(port), path if path.startswith("/") else "/" + path


def apply_pod_layer(bootstrap: dict[str, Any], runtime: Mapping[str, int]) -> dict[str, Any]:
    """The bootstrap with the pod's runtime overrides in its ``pod`` layer."""
    for layer in bootstrap.get("layered_runtime", {}).get("layers", ()):
        if layer.get("name") == ps.POD_LAYER:
            layer["static_layer"] = dict(runtime)
            return bootstrap
    if runtime:
        raise AgentError(f"bootstrap has no runtime layer {ps.POD_LAYER!r} for the pod's settings")
    return bootstrap


def admin(method: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One request to Envoy's loopback admin API."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", ps.ADMIN_PORT, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _fetch(port: int, path: str, limit: int, timeout: float = 5.0) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "text/plain"})
        response = conn.getresponse()
        body = response.read(limit + 1)
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        if len(body) > limit:
            raise OSError(f"more than {limit} bytes")
        return body
    finally:
        conn.close()


class Agent:
    def __init__(self, pod: PodSettings) -> None:
        self.pod = pod
        self.draining = threading.Event()
        self.scrape_failures = 0
        self.envoy: subprocess.Popen[bytes] | None = None

    # --- status port ---------------------------------------------------------------------

    def envoy_ready(self) -> bool:
        if self.draining.is_set():
            return False
        try:
            status, _ = admin("GET", "/ready", timeout=1.0)
        except OSError:
            return False
        return status == 200

    def metrics(self) -> bytes:
        import http.client

        try:
            _, envoy = admin("GET", "/stats/prometheus", timeout=5.0)
        except OSError:
            envoy = b""
        parts = [envoy]
        if self.pod.app_metrics is not None:
            port, path = self.pod.app_metrics
            try:
                parts.append(_fetch(port, path, MAX_APP_METRICS))
            except (OSError, http.client.HTTPException):
                self.scrape_failures += 1
        parts.append(
            b"# TYPE mesh_agent_app_scrape_failures_total counter\n"
            + f"mesh_agent_app_scrape_failures_total {self.scrape_failures}\n".encode()
        )
        return b"\n".join(p if p.endswith(b"\n") or not p else p + b"\n" for p in parts)

    def serve_status(self) -> ThreadingHTTPServer:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        agent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = STATUS_IDLE_SECONDS  # a client silent this long is dropped (slow loris)

            def log_message(self, *_args: Any) -> None:  # the kubelet probes every few seconds
                pass

            def _reply(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                # Exact request targets only: no query strings, no absolute forms, no dot
                # segments; probes and scrapers send exactly these.
                path = self.path
                if path in agent.pod.probers:
                    try:
                        text = probes.run_probe(agent.pod.probers[path], agent.pod.probe_host)
                    except probes.ProbeError as err:
                        self._reply(503, f"{err}\n".encode())
                    else:
                        self._reply(200, f"{text}\n".encode())
                elif path == "/stats/prometheus":
                    self._reply(200, agent.metrics(), PROM_CONTENT_TYPE)
                elif path == "/healthz/ready":
                    ready = agent.envoy_ready()
                    self._reply(200 if ready else 503, b"LIVE\n" if ready else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

        slots = threading.BoundedSemaphore(MAX_STATUS_CONNECTIONS)

        class Server(ThreadingHTTPServer):
            """One thread per connection, at most MAX_STATUS_CONNECTIONS: more are closed at once."""

            daemon_threads = True
            request_queue_size = 64

            def process_request(self, request: Any, client_address: Any) -> None:
                if not slots.acquire(blocking=False):
                    self.shutdown_request(request)
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        try:
            Server.address_family = socket.AF_INET6
            server = Server(("::", self.pod.status_port), Handler, bind_and_activate=False)
            server.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:  # no IPv6 in this kernel or pod
            Server.address_family = socket.AF_INET
            server = Server(("0.0.0.0", self.pod.status_port), Handler, bind_and_activate=False)
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        threading.Thread(target=server.serve_forever, name="status", daemon=True).start()
        return server

    # --- Envoy ---------------------------------------------------------------------------

    def start_envoy(self, envoy: str, bootstrap: dict[str, Any], args: Sequence[str]) -> None:
        argv = [envoy, "--config-yaml", json.dumps(bootstrap, separators=(",", ":"))]
        argv += with_concurrency(args, self.pod.concurrency)
        self.envoy = subprocess.Popen(argv, preexec_fn=_die_with_parent)

    def drain(self) -> None:
        """Fail readiness, refuse new inbound connections, wait the drain duration, stop Envoy."""
        self.draining.set()
        for path in ("/healthcheck/fail", "/drain_listeners?inboundonly"):
            with contextlib.suppress(OSError):
                admin("POST", path)
        assert self.envoy is not None
        try:
            self.envoy.wait(timeout=self.pod.drain_seconds)
        except subprocess.TimeoutExpired:
            self.envoy.terminate()
        try:
            self.envoy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.envoy.kill()
            self.envoy.wait()


def with_concurrency(args: Sequence[str], workers: int | None) -> list[str]:
    """Envoy's arguments with the pod's worker count in place of the template's.

    Envoy refuses a repeated ``--concurrency`` ("Argument already set"), so the pod's value
    replaces the template's instead of being appended.
    """
    out = list(args)
    if workers is None:
        return out
    for i, arg in enumerate(out):
        if arg == "--concurrency" and i + 1 < len(out):
            out[i + 1] = str(workers)
            return out
        if arg.startswith("--concurrency="):
            out[i] = f"--concurrency={workers}"
            return out
    return [*out, "--concurrency", str(workers)]


def _die_with_parent() -> None:
    """Envoy gets SIGKILL if the agent dies, so no orphan keeps the pod's ports."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(
    envoy: str, bootstrap_text: str, envoy_args: Sequence[str], env: Mapping[str, str], *, status_port: int
) -> int:
    try:
        pod = PodSettings(env)
        if not 0 < status_port < 65536:
            raise AgentError(f"--status-port: {status_port} is not a port number")
        pod.status_port = status_port
        bootstrap = json.loads(bootstrap_text)
        if not isinstance(bootstrap, dict):
            raise AgentError("bootstrap: not a JSON object")
        apply_pod_layer(bootstrap, pod.runtime)
    except (AgentError, ValueError) as err:
        print(f"mesh-proxy-agent: {err}", file=sys.stderr)
        return 2
    agent = Agent(pod)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent.start_envoy(envoy, bootstrap, envoy_args)  # first: Envoy's readiness gates the app
    server = agent.serve_status()  # app probes and metrics: needed once the app runs
    assert agent.envoy is not None
    while not stop.is_set():
        code = agent.envoy.poll()
        if code is not None:  # Envoy is gone: exit too, so the kubelet restarts the container
            server.shutdown()
            print(f"mesh-proxy-agent: envoy exited with {code}", file=sys.stderr)
            return code if code >= 0 else 128 - code  # killed by a signal: 128+N, as a shell says
        stop.wait(0.2)
    agent.drain()
    server.shutdown()
    return 0


def wait(url: str, timeout: float, period: float = 0.01) -> int:
    """Block until ``url`` answers HTTP 200 (Envoy ready), for holdApplicationUntilProxyStarts.

    The kubelet runs this as the proxy's postStart hook and starts the app when it returns, so
    it polls often and stays light (a raw HTTP/1.1 request, no http.client to import). Every
    10 ms: until Envoy listens a poll is a refused connect (~50 us of CPU), and each 10 ms less
    between Envoy ready and the hook's return is 10 ms less before the app starts."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _status_of(host, port, request.encode()) == 200:
                return 0
        except OSError:
            pass
        if time.monotonic() >= deadline:
            print(f"mesh-proxy-agent wait: {url} not ready after {timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(period)


def _status_of(host: str, port: int, request: bytes) -> int:
    """The status code of one HTTP request (0: no status line within the first 64 bytes)."""
    with socket.create_connection((host, port), timeout=1.0) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head and len(head) < 64:
            chunk = sock.recv(64 - len(head))
            if not chunk:
                break
            head += chunk
    fields = head.split(b" ", 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return 0
    return int(fields[1])


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mesh-proxy-agent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run Envoy and serve the status port")
    p_run.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", "envoy"), help="Envoy binary")
    p_run.add_argument("--status-port", type=int, default=ps.STATUS_PORT, help="status port (default 15020)")
    p_run.add_argument("--config-yaml", required=True, help="the bootstrap JSON the injector rendered")
    p_run.add_argument("envoy_args", nargs=argparse.REMAINDER, help="passed to Envoy (after --)")
    p_wait = sub.add_parser("wait", help="wait until the proxy is ready (HTTP 200)")
    p_wait.add_argument("--url", default=f"http://127.0.0.1:{ps.HEALTH_PORT}/healthz/ready")
    p_wait.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    args = parser.parse_args(argv)
    if args.command == "wait":
        return wait(args.url, args.timeout)
    extra = args.envoy_args[1:] if args.envoy_args[:1] == ["--"] else args.envoy_args
    return run(args.envoy, args.config_yaml, extra, os.environ, status_port=args.status_port)


if __name__ == "__main__":
    sys.exit(main())
