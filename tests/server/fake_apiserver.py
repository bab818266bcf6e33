"""A small HTTP server speaking the few Kubernetes API calls the webhook makes on its own behalf.

Used where the test is about the webhook's side of the exchange (who it asks, what it sends,
what it does with the answer) and the real kube-apiserver of tests/testbed is not needed:
TokenReview, SubjectAccessReview, Events and ``GET /version``. Every request is recorded with
its size, so a test can prove something was never forwarded. The end-to-end tests against the
real API server are in test_apiserver_e2e.py.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    body_bytes: int
    body: dict[str, Any] | None


@dataclass
class FakeApiServer:
    """Tokens map to users; grants are (username, verb, resource, namespace) allowed by SAR."""

    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    grants: set[tuple[str, str, str, str]] = field(default_factory=set)
    version: dict[str, str] | None = field(default_factory=lambda: {
        "major": "1", "minor": "33", "gitVersion": "v1.33.0"})
    requests: list[Recorded] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeApiServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append(Recorded("GET", self.path, 0, None))
                if self.path.rstrip("/") == "/version" and fake.version is not None:
                    self._answer(200, fake.version)
                else:
                    self._answer(404, {"kind": "Status", "code": 404})

            def do_POST(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(size)
                body = json.loads(raw) if raw else None
                fake.requests.append(Recorded("POST", self.path, size, body))
                self._answer(*fake.answer(self.path, body or {}))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path.endswith("/tokenreviews"):
            user = self.tokens.get(body.get("spec", {}).get("token", ""))
            status = {"authenticated": True, "user": user} if user else {"authenticated": False}
            return 201, {**body, "status": status}
        if path.endswith("/subjectaccessreviews"):
            spec = body.get("spec", {})
            attrs = spec.get("resourceAttributes", {})
            key = (spec.get("user", ""), attrs.get("verb", ""), attrs.get("resource", ""),
                   attrs.get("namespace", ""))
            allowed = key in self.grants or (key[0], key[1], key[2], "*") in self.grants
            return 201, {**body, "status": {"allowed": allowed}}
        if path.endswith("/events"):
            return 201, body
        return 404, {"kind": "Status", "code": 404}

    def calls(self, suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.rstrip("/").endswith(suffix)]

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "webhook", "user": {"token": "webhook-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "webhook"}}],
        }))
        return path

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


#: The user the shared fixture's token authenticates as, allowed to create pods everywhere.
DEV_TOKEN = "dev-token"
DEV_USER = {"username": "dev", "groups": ["system:authenticated"], "uid": "u-dev"}


def standard() -> FakeApiServer:
    fake = FakeApiServer(tokens={DEV_TOKEN: DEV_USER}, grants={("dev", "create", "pods", "*")})
    return fake.start()
