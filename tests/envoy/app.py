"""A test app for inside a pod's netns: HTTP on 8080, TCP echo on 9000, optional gRPC health.

HTTP: ``/ok``, ``/peer`` (answers the client address it saw), ``/status/<code>``,
``/slow?ms=N``, ``/healthz/ready`` (always 503), ``/metrics`` (an app metric for the
Prometheus merge). Prints ``ready`` once all listeners are up. Everything binds ``::``
dual-stack.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/peer":
            self._reply(200, self.client_address[0].removeprefix("::ffff:").encode())
        elif url.path.startswith("/status/"):
            self._reply(int(url.path.rsplit("/", 1)[1]), b"status")
        elif url.path == "/slow":
            time.sleep(int(parse_qs(url.query).get("ms", ["1000"])[0]) / 1000)
            self._reply(200, b"slow done")
        elif url.path == "/healthz/ready":  # a listener that accepts but is never ready
            self._reply(503, b"not ready")
        elif url.path == "/metrics":
            self._reply(200, b"# TYPE app_marker_total counter\napp_marker_total 42\n")
        else:
            self._reply(200, b"ok")


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def echo(port: int) -> None:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    listener.listen(64)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def grpc_health(port: int) -> object:
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("app.Serving", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("app.Broken", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    return server


def main() -> None:
    http_port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = Server(("::", http_port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if "--no-echo" not in sys.argv:
        echo(9000)
    servers = [server, grpc_health(50051) if "--grpc" in sys.argv else None]
    print("ready", flush=True)
    while servers:
        time.sleep(3600)


if __name__ == "__main__":
    main()
