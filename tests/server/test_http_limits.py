"""Hostile and broken HTTP clients meet a limit that names itself; the honest caller is served.

Everything here is real uvicorn over TLS on loopback, driven byte by byte with raw sockets where
the point is what a client does between the bytes.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server.fake_apiserver import DEV_TOKEN, FakeApiServer
from tests.server.helpers import (
    RunningServer,
    duplex,
    inject_bytes,
    read_n,
    read_response,
    review,
    start_server,
    tls_connect,
    typical_pod,
)

REPO = Path(__file__).resolve().parents[2]


def honest_inject(server: RunningServer, client: httpx.Client | None = None) -> bool:
    """One /inject answered with a patch (on ``client``'s connection, else a new one)."""
    own = client is None
    client = client or server.client()
    try:
        response = client.post("/inject", json=review(typical_pod()))
        return response.status_code == 200 and bool(response.json()["response"].get("patch"))
    finally:
        if own:
            client.close()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, fake_api: FakeApiServer) -> RunningServer:
    """A server with short timeouts and few connections, under a low file-descriptor limit."""
    workdir = tmp_path_factory.mktemp("strict")
    server = start_server(workdir, nofile=256, extra_args=[
        "--header-timeout", "1", "--body-timeout", "1", "--max-requests-per-connection", "3",
        "--keepalive-timeout", "2",
        "--kubeconfig", str(fake_api.kubeconfig(workdir / "kubeconfig")),
    ])
    yield server
    server.stop()


def test_64_mib_header_is_refused_and_never_reaches_a_token_review(
    webhook: RunningServer, fake_api: FakeApiServer
) -> None:
    reviews_before = len(fake_api.calls("/tokenreviews"))
    conn = tls_connect(webhook)
    head = b"POST /dry-run HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer "
    # 64 MiB of header, read while written: the server answers and hangs up long before the end.
    answer = duplex(conn, head + b"A" * (64 << 20) + b"\r\n\r\n", lambda got: False)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"--max-header-bytes" in answer
    assert len(fake_api.calls("/tokenreviews")) == reviews_before
    assert all(r.body_bytes < 64 * 1024 for r in fake_api.requests)
    assert honest_inject(webhook)


def test_too_many_headers_is_431_naming_the_limit(webhook: RunningServer) -> None:
    conn = tls_connect(webhook)
    extra = "".join(f"x-h{i}: v\r\n" for i in range(150))
    conn.sendall(inject_bytes(json.dumps(review(typical_pod())).encode(), extra=extra))
    answer = read_response(conn)
    assert answer.startswith(b"HTTP/1.1 431") and b"--max-headers" in answer


def test_headers_that_never_finish_get_408_after_the_header_timeout(strict: RunningServer) -> None:
    conn = tls_connect(strict)
    conn.sendall(b"POST /inject HTTP/1.1\r\nhost: x\r\n")  # and then nothing
    started = time.monotonic()
    answer = read_response(conn, timeout=10)
    assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer
    assert time.monotonic() - started < 9  # closed by the server, not by our read timeout


def test_a_connection_that_sends_nothing_is_closed(strict: RunningServer) -> None:
    conn = tls_connect(strict)
    started = time.monotonic()
    assert read_response(conn, timeout=10) == b""
    assert time.monotonic() - started < 9


def test_a_body_that_stalls_gets_408_after_the_body_timeout(strict: RunningServer) -> None:
    conn = tls_connect(strict)
    body = json.dumps(review(typical_pod())).encode()
    conn.sendall(inject_bytes(body)[: -len(body) // 2])  # headers and half the body
    answer = read_response(conn, timeout=10)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer


def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(strict: RunningServer) -> None:
    conn = tls_connect(strict)
    conn.sendall(inject_bytes(json.dumps(review(typical_pod())).encode()))
    assert read_n(conn, 1)[0][0] == b"HTTP/1.1 200 OK"
    answered = time.monotonic()
    assert read_response(conn, timeout=10) == b""  # nothing more, then the server closes
    assert 1.5 < time.monotonic() - answered < 9  # --keepalive-timeout 2: not before, not never


def test_a_request_begun_on_a_kept_alive_connection_has_the_header_timeout(strict: RunningServer) -> None:
    """After an answer the connection's deadline is the keep-alive one (2 s); the first bytes of
    the next request make it the header timeout (1 s), which answers 408 naming itself."""
    conn = tls_connect(strict)
    conn.sendall(inject_bytes(json.dumps(review(typical_pod())).encode()))
    assert read_n(conn, 1)[0][0] == b"HTTP/1.1 200 OK"
    conn.sendall(b"POST /inject HTTP/1.1\r\nhost: x\r\n")  # and then nothing
    started = time.monotonic()
    answer = read_response(conn, timeout=10)
    assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer
    assert 0.5 < time.monotonic() - started < 1.9  # before the keep-alive deadline would have come


def test_keepalive_connection_is_closed_after_its_request_limit(strict: RunningServer) -> None:
    with strict.client() as client:
        answers = [client.post("/inject", json=review(typical_pod())) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers.get("connection") for a in answers] == [None, None, "close"]


class Slowloris:
    """``count`` TLS clients sending their headers a byte at a time, reconnecting when dropped."""

    def __init__(self, server: RunningServer, count: int) -> None:
        self.server, self.count = server, count
        self.conns: list[ssl.SSLSocket] = []
        self.dropped = 0
        self.opened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> None:
        try:
            conn = tls_connect(self.server, timeout=2)
            conn.sendall(b"POST /inject HTTP/1.1\r\nhost: x\r\n")
            conn.setblocking(False)
            self.conns.append(conn)
            self.opened += 1
        except OSError:
            self.dropped += 1

    def _run(self) -> None:
        while not self.stop.is_set():
            # At most 50 new ones a pass: on a busy machine 500 handshakes take seconds, and the
            # ones already open must keep trickling (and be seen dropped) meanwhile.
            for _ in range(min(50, self.count - len(self.conns))):
                if self.stop.is_set():
                    break
                self._open()
            alive = []
            for conn in self.conns:
                try:
                    conn.send(b"x")  # one more byte of a header that never ends
                    alive.append(conn)
                except (OSError, ssl.SSLError):
                    self.dropped += 1
                    conn.close()
            self.conns = alive
            self.stop.wait(0.5)

    def __enter__(self) -> Slowloris:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for conn in self.conns:
            conn.close()


def test_500_slow_clients_are_dropped_and_honest_injects_are_served(strict: RunningServer) -> None:
    """Under a 256-descriptor limit (the server keeps 192 connections), 500 slowloris clients."""
    with Slowloris(strict, 500) as attack, strict.client() as kept_alive:
        assert honest_inject(strict, kept_alive)
        ramp = time.monotonic() + 60  # past the cap first, however slowly this machine handshakes
        while attack.opened < 250 and time.monotonic() < ramp:
            time.sleep(0.1)
        deadline = time.monotonic() + 8
        results = []
        while time.monotonic() < deadline:
            results.append(honest_inject(strict))  # a new connection each time: the hard case
            results.append(honest_inject(strict, kept_alive))
            kept_alive.close()
            kept_alive = strict.client()
            time.sleep(0.2)
        kept_alive.close()
        dropped = attack.dropped
    assert results and all(results), f"{results.count(False)} of {len(results)} honest requests failed"
    assert dropped > 100  # the attackers were dropped (evicted or timed out) and kept reconnecting
    with strict.client() as client:
        text = client.get("/metrics").text
    assert 'mesh_injector_http_refused_total{limit="evicted"}' in text or \
        'mesh_injector_http_refused_total{limit="header_timeout"}' in text


def test_connection_cap_evicts_an_idle_client_for_a_new_one(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra_args=["--max-connections", "4"])
    try:
        idle = [tls_connect(server) for _ in range(4)]
        time.sleep(0.3)
        assert honest_inject(server)
        closed = 0
        for conn in idle:
            conn.setblocking(False)
            try:
                closed += conn.recv(1) == b""
            except ssl.SSLWantReadError:
                pass
            except (OSError, ssl.SSLError):
                closed += 1
            conn.close()
        assert closed >= 1
    finally:
        server.stop()


def _ctx(server: RunningServer, ciphers: str | None = None, version: ssl.TLSVersion | None = None
         ) -> ssl.SSLContext:
    ctx = server.pki.ssl_context()
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def test_tls_1_2_cbc_suites_are_refused_aead_and_1_3_served(webhook: RunningServer) -> None:
    cbc_only = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:" \
               "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES128-SHA256:AES128-SHA:AES256-SHA"
    with pytest.raises(ssl.SSLError):
        tls_connect(webhook, _ctx(webhook, cbc_only, ssl.TLSVersion.TLSv1_2))
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                  "ECDHE-ECDSA-CHACHA20-POLY1305"):
        conn = tls_connect(webhook, _ctx(webhook, suite, ssl.TLSVersion.TLSv1_2))
        assert conn.cipher()[0] == suite
        conn.close()
    conn = tls_connect(webhook, _ctx(webhook, version=ssl.TLSVersion.TLSv1_3))
    assert conn.version() == "TLSv1.3"
    conn.close()


def test_review_not_decided_by_the_deadline_is_refused_with_timeout(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra_args=["--request-deadline", "0.001"])
    try:
        pod = typical_pod()
        pod["spec"]["containers"][0]["env"] = [{"name": f"V{i}", "value": "x" * 40} for i in range(20_000)]
        doc = review(pod, uid="late-uid")
        with server.client() as client:
            response = client.post("/inject", json=doc)
        assert response.status_code == 200
        answer = response.json()["response"]
        assert answer["uid"] == "late-uid" and answer["allowed"] is False
        assert answer["status"]["code"] == 504 and answer["status"]["reason"] == "Timeout"
        assert "--request-deadline" in answer["status"]["message"]
        assert honest_inject(server)  # small pods are decided inline, well within any deadline
    finally:
        server.stop()


def test_default_deadline_is_shorter_than_the_webhooks_timeout() -> None:
    from injector.http import HttpLimits

    docs = list(yaml.safe_load_all((REPO / "manifests/base/mutatingwebhookconfiguration.yaml").read_text()))
    timeouts = {w["timeoutSeconds"] for d in docs if d for w in d.get("webhooks", [])}
    assert timeouts and HttpLimits().request_deadline < min(timeouts)


def test_plain_tcp_garbage_and_half_handshakes_leave_the_server_serving(webhook: RunningServer) -> None:
    for payload in (b"", b"\x16\x03\x01\x00", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4):
        with socket.create_connection(("127.0.0.1", webhook.port), timeout=5) as raw:
            raw.sendall(payload)
    assert honest_inject(webhook)
    with webhook.client() as client:
        response = client.post("/dry-run", content=b"{}", headers={
            "content-type": "application/json", "authorization": f"Bearer {DEV_TOKEN}"})
    assert response.status_code == 400
