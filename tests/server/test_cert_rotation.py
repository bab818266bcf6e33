"""Replacing the serving certificate while clients keep sending reviews: no request may fail."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import httpx
from cryptography import x509

from tests.server.helpers import RunningServer, review, start_server, typical_pod


def served_serial(server: RunningServer) -> int:
    import socket

    ctx = server.pki.ssl_context()
    raw = socket.create_connection(("127.0.0.1", server.port))
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_under_load_loses_no_request(tmp_path: Path) -> None:
    server = start_server(tmp_path / "srv")
    failures: list[str] = []
    counts = {"keepalive": 0, "fresh": 0}
    stop = threading.Event()
    body = review(typical_pod())

    def keepalive_client() -> None:  # one connection, many requests
        with server.client() as client:
            while not stop.is_set():
                try:
                    r = client.post("/inject", json=body)
                    if r.status_code != 200 or not r.json()["response"]["allowed"]:
                        failures.append(f"keepalive: {r.status_code}")
                    counts["keepalive"] += 1
                except httpx.HTTPError as exc:
                    failures.append(f"keepalive: {exc!r}")

    def fresh_connection_client() -> None:  # a new TLS handshake per request
        while not stop.is_set():
            try:
                with server.client() as client:
                    r = client.post("/inject", json=body)
                if r.status_code != 200:
                    failures.append(f"fresh: {r.status_code}")
                counts["fresh"] += 1
            except (httpx.HTTPError, ssl.SSLError) as exc:
                failures.append(f"fresh: {exc!r}")

    threads = [threading.Thread(target=keepalive_client), threading.Thread(target=fresh_connection_client),
               threading.Thread(target=fresh_connection_client)]
    try:
        first = served_serial(server)
        for t in threads:
            t.start()
        serials = {first}
        for _ in range(3):
            time.sleep(0.5)
            new = server.pki.serving()
            server.secret.write(new)
            expected = new.certificate.serial_number
            deadline = time.monotonic() + 10
            while served_serial(server) != expected:
                assert time.monotonic() < deadline, "the new certificate was not picked up"
                time.sleep(0.05)
            serials.add(expected)
        time.sleep(0.5)
    finally:
        stop.set()
        try:
            for t in threads:
                if t.is_alive():
                    t.join(10)
        finally:
            server.stop()
    assert len(serials) == 4
    assert counts["keepalive"] > 20 and counts["fresh"] > 20, counts
    assert failures == []


def test_broken_new_pair_keeps_the_old_certificate(tmp_path: Path) -> None:
    server = start_server(tmp_path / "srv")
    try:
        before = served_serial(server)
        good = server.pki.serving()
        other = server.pki.serving()
        # A cert with somebody else's key: must not be served, and the old one stays.
        mismatched = type(good)(good.cert_pem, other.key_pem)
        server.secret.write(mismatched)
        deadline = time.monotonic() + 10
        while True:
            with server.client() as client:
                detail = client.get("/readyz").json()
            if detail["certificate"]["lastError"]:
                break
            assert time.monotonic() < deadline, "the broken pair was not reported"
            time.sleep(0.05)
        assert served_serial(server) == before
        server.secret.write(good)
        deadline = time.monotonic() + 10
        while served_serial(server) != good.certificate.serial_number:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with server.client() as client:
            assert client.get("/readyz").json()["certificate"]["lastError"] is None
            metrics = client.get("/metrics").text
        assert 'mesh_injector_tls_certificate_reloads_total{result="failure"}' in metrics
    finally:
        server.stop()
