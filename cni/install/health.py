"""Readiness, liveness and metrics of the agent: /readyz /healthz /metrics on a small HTTP server."""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("mesh-cni.install")




@dataclass
class Status:
    """What the health endpoint and metrics report; written by the loop, read by the HTTP thread."""

    ready: bool = False
    reason: str = "starting"
    contended: bool = False
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, ready: bool, reason: str, contended: bool) -> None:
        with self.lock:
            self.ready, self.reason, self.contended = ready, reason, contended

    def count(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.counters[name] += amount

    def metrics_text(self) -> str:
        with self.lock:
            lines = [
                "# HELP mesh_cni_install_ready 1 while the plugin is installed and chained.",
                "# TYPE mesh_cni_install_ready gauge",
                f"mesh_cni_install_ready {int(self.ready)}",
                "# HELP mesh_cni_install_contended 1 while another agent keeps overwriting the chain.",
                "# TYPE mesh_cni_install_contended gauge",
                f"mesh_cni_install_contended {int(self.contended)}",
            ]
            for name, value in sorted(self.counters.items()):
                metric, _, label = name.partition("|")
                labels = f'{{action="{label}"}}' if label else ""
                lines += [f"# TYPE {metric} counter", f"{metric}{labels} {value}"]
        return "\n".join(lines) + "\n"


def _health_handler(status: Status) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/readyz"):
                with status.lock:
                    code, text = (200, "ok\n") if status.ready else (503, f"not ready: {status.reason}\n")
            elif self.path.startswith("/healthz"):
                code, text = 200, "ok\n"
            elif self.path.startswith("/metrics"):
                code, text = 200, status.metrics_text()
            else:
                code, text = 404, "not found\n"
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def serve(status: Status, address: str, port: int) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start the health server on a daemon thread; the caller shuts it down."""
    server = ThreadingHTTPServer((address, port), _health_handler(status))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="health", daemon=True)
    thread.start()
    log.info("health endpoint on %s:%d (/readyz /healthz /metrics)", address, server.server_address[1])
    return server, thread
