"""A small transparent proxy standing in for Envoy in node tests (Envoy cannot be had here).

Stdlib only, so it runs in `images.proxy_image()` (and in the repo's Python). It is not a mesh
proxy, just enough of one for the redirect to be observable:
- 15001 (outbound) and 15006 (inbound): accept what the redirect sends, read the original
  destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST), print one JSON line per connection
  (`{"event": "connection", "listener": ..., "src": ..., "original_dst": ..., "uid": ...}`) and
  forward the bytes to that destination. It runs as the proxy UID (1337, from the injected
  securityContext), so its own connections are the ones the redirect leaves alone; inbound
  connections to the pod's own address leave from 127.0.0.6 (::6), as Envoy's inbound
  passthrough does, since uid 1337 to the pod IP over lo is redirected again. A connection
  whose original destination is one of its own listeners (nothing redirected it) is refused and
  logged as `loop`.
- 15021 `/healthz/ready` (readiness, what the templates probe) and the status port 15020:
  `/app-health/<container>/<readyz|livez|startupz>` runs the original probe from
  ISTIO_KUBE_APP_PROBERS (httpGet or tcpSocket against the pod) like Istio's agent does.
- `pilot-agent wait` (holdApplicationUntilProxyStarts) polls 15021 until ready.
- TESTPROXY_READY_AFTER=SECONDS (env, default 0): 15021 answers 503 `starting` until that long
  after start (a slow Envoy start, to show who waits for the proxy); the `ready` line is
  printed when it turns ready. SIGTERM prints `{"event": "terminating"}` and exits 0 (to show
  when the kubelet stopped the proxy relative to the app).
Command-line arguments (`proxy sidecar ...`, Envoy's `-c ...`) are accepted and ignored.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Sequence

OUTBOUND_PORT, INBOUND_PORT, STATUS_PORT, HEALTH_PORT = 15001, 15006, 15020, 15021
SO_ORIGINAL_DST = 80  # same value for IPv4 (SOL_IP) and IPv6 (IP6T_SO_ORIGINAL_DST, SOL_IPV6)
_log_lock = threading.Lock()


def log(**fields: object) -> None:
    with _log_lock:
        sys.stdout.write(json.dumps(fields, sort_keys=True) + "\n")
        sys.stdout.flush()


def original_destination(conn: socket.socket) -> tuple[str, int]:
    """Where the client meant to connect before the redirect rewrote the destination."""
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _is_local(host: str) -> bool:
    """Whether `host` is an address of this network namespace (it can be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


class _Forwarder(socketserver.BaseRequestHandler):
    listener = "outbound"

    def source(self, host: str) -> tuple[str, int] | None:
        """Outbound: the proxy's own connections go out as uid 1337 (not captured again)."""
        del host
        return None

    def handle(self) -> None:
        conn: socket.socket = self.request
        peer = conn.getpeername()
        src = f"{peer[0]}:{peer[1]}"
        try:
            host, port = original_destination(conn)
        except OSError as err:
            log(event="error", listener=self.listener, src=src, error=f"no original destination: {err}")
            return
        local_ports = {OUTBOUND_PORT, INBOUND_PORT}
        if port in local_ports and conn.getsockname()[1] == port:
            log(event="loop", listener=self.listener, src=src, original_dst=f"{host}:{port}")
            return
        log(
            event="connection",
            listener=self.listener,
            src=src,
            original_dst=f"{host}:{port}",
            uid=os.getuid(),
        )
        try:
            upstream = socket.create_connection((host, port), timeout=10, source_address=self.source(host))
        except OSError as err:
            log(event="upstream_error", listener=self.listener, original_dst=f"{host}:{port}", error=str(err))
            return
        upstream.settimeout(None)
        with upstream:
            back = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
            back.start()
            _pipe(conn, upstream)
            back.join(timeout=60)


class _Outbound(_Forwarder):
    listener = "outbound"


class _Inbound(_Forwarder):
    listener = "inbound"

    def source(self, host: str) -> tuple[str, int] | None:
        """Inbound to this pod's own address: from the passthrough address (127.0.0.6 / ::6), as
        Envoy's inbound passthrough does. A uid-1337 connection to the pod's own IP over lo would
        otherwise be redirected to 15006 again (the rule that lets the proxy reach its app
        through the pod IP), looping forever; the redirect leaves this source address alone."""
        if not _is_local(host):
            return None
        return ("::6", 0) if ":" in host else ("127.0.0.6", 0)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _run_probe(probe: dict[str, object]) -> bool:
    """One of the app's original probes (Istio's prober format), against the pod itself."""
    timeout = float(probe.get("timeoutSeconds", 1) or 1)  # type: ignore[arg-type]
    if "httpGet" in probe:
        spec: dict[str, object] = probe["httpGet"]  # type: ignore[assignment]
        host = str(spec.get("host") or "127.0.0.1")
        conn_cls = (
            http.client.HTTPSConnection
            if str(spec.get("scheme", "HTTP")).upper() == "HTTPS"
            else (http.client.HTTPConnection)
        )
        conn = conn_cls(host, int(spec["port"]), timeout=timeout)  # type: ignore[arg-type]
        try:
            conn.request("GET", str(spec.get("path") or "/"))
            return 200 <= conn.getresponse().status < 400
        except OSError:
            return False
        finally:
            conn.close()
    for kind in ("tcpSocket", "grpc"):
        if kind in probe:
            spec = probe[kind]  # type: ignore[assignment]
            try:
                socket.create_connection(
                    (str(spec.get("host") or "127.0.0.1"), int(spec["port"])),  # type: ignore[arg-type]
                    timeout=timeout,
                ).close()
                return True
            except OSError:
                return False
    return False


#: Monotonic time from which 15021 answers ready (see TESTPROXY_READY_AFTER).
_ready_at = 0.0


def _ready_after(env: dict[str, str] | os._Environ[str]) -> float:
    """TESTPROXY_READY_AFTER as seconds, bounded to 0-300 (a bad value means no delay)."""
    try:
        value = float(env.get("TESTPROXY_READY_AFTER", "0"))
    except ValueError:
        return 0.0
    return min(max(value, 0.0), 300.0) if value == value else 0.0  # NaN -> 0


class _Status(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/healthz/ready", "/ready"):
            if time.monotonic() < _ready_at:
                self._reply(503, "starting")
            else:
                self._reply(200, "ready")
        elif path == "/stats/prometheus":
            self._reply(200, "# test proxy: no stats\n")
        elif path.startswith("/app-health/"):
            probers = json.loads(os.environ.get("ISTIO_KUBE_APP_PROBERS") or "{}")
            probe = probers.get(path)
            if probe is None:
                self._reply(404, f"no prober for {path}")
            else:
                self._reply(200 if _run_probe(probe) else 503, path)
        else:
            self._reply(404, "not found")

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """Run every listener until killed; arguments are ignored (see module docstring)."""
    del argv
    servers: list[socketserver.BaseServer] = [
        _Server(("0.0.0.0", OUTBOUND_PORT), _Outbound),
        _Server(("0.0.0.0", INBOUND_PORT), _Inbound),
        http.server.ThreadingHTTPServer(("0.0.0.0", STATUS_PORT), _Status),
        http.server.ThreadingHTTPServer(("0.0.0.0", HEALTH_PORT), _Status),
    ]
    if socket.has_ipv6:
        for port, handler in ((OUTBOUND_PORT, _Outbound), (INBOUND_PORT, _Inbound)):
            with contextlib.suppress(OSError):  # no IPv6 in this netns
                six = _Server6(("::", port), handler, bind_and_activate=False)
                six.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                six.server_bind()
                six.server_activate()
                servers.append(six)
    global _ready_at
    _ready_at = time.monotonic() + _ready_after(os.environ)
    signal.signal(signal.SIGTERM, _terminate)
    for server in servers:
        _serve(server)
    time.sleep(max(0.0, _ready_at - time.monotonic()))
    log(event="ready", uid=os.getuid(), ports=[OUTBOUND_PORT, INBOUND_PORT, STATUS_PORT, HEALTH_PORT])
    while True:
        time.sleep(3600)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: say so (the kubelet's stop order shows in the logs), then exit 0."""
    del signum, frame
    log(event="terminating")
    os._exit(0)


def pilot_agent_main(argv: Sequence[str] | None = None) -> int:
    """`pilot-agent wait`: block until the proxy is ready (up to 2 min); anything else runs the proxy."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "wait":
        return main(args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", HEALTH_PORT, timeout=1)
            conn.request("GET", "/healthz/ready")
            if conn.getresponse().status == 200:
                return 0
        time.sleep(0.2)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
