"""Every way a review can reach ``/inject`` gets the same answer.

The HTTP protocol answers a ``POST /inject`` with a Content-Length up to 256 KiB itself (no
ASGI task, one write); chunked bodies, ``Expect: 100-continue``, bigger bodies and pipelined
requests behind another request go through the ASGI endpoint. A client must not be able to tell
which path answered, except by speed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.helpers import (
    RunningServer,
    decoded_patch,
    duplex,
    inject_bytes,
    read_n,
    read_response,
    review,
    split_response,
    tls_connect,
    typical_pod,
)


def chunks(body: bytes) -> Iterator[bytes]:
    """The body as a generator: httpx sends it with Transfer-Encoding: chunked."""
    yield body[: len(body) // 2]
    yield body[len(body) // 2:]


def without_date(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != "date"}


@pytest.mark.parametrize("body", [
    json.dumps(review(typical_pod(), uid="same-uid")).encode(),  # injected
    json.dumps(review(typical_pod(annotations={"sidecar.istio.io/inject": "false"}), uid="u2")).encode(),
    json.dumps(review(typical_pod(annotations={"traffic.sidecar.istio.io/includeInboundPorts": "x"}),
                      uid="u3")).encode(),  # refused
    json.dumps(review({"kind": "ConfigMap"}, kind={"group": "", "version": "v1", "kind": "ConfigMap"},
                      uid="u4")).encode(),
    b"{not json",
    b"",
], ids=["injected", "opted-out", "refused", "not-a-pod", "not-json", "empty"])
def test_content_length_and_chunked_bodies_get_identical_answers(webhook: RunningServer, body: bytes) -> None:
    headers = {"content-type": "application/json"}
    with webhook.client() as client:
        inline = client.post("/inject", content=body, headers=headers)
        chunked = client.post("/inject", content=chunks(body), headers=headers)
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert inline.status_code == chunked.status_code
    assert inline.content == chunked.content
    assert without_date(inline.headers) == without_date(chunked.headers)
    assert inline.headers["content-type"] == "application/json"


def test_wrong_content_type_is_refused_alike_on_both_paths(webhook: RunningServer) -> None:
    body = json.dumps(review(typical_pod())).encode()
    with webhook.client() as client:
        inline = client.post("/inject", content=body, headers={"content-type": "text/plain"})
        chunked = client.post("/inject", content=chunks(body), headers={"content-type": "text/plain"})
    assert inline.status_code == chunked.status_code == 415
    assert inline.content == chunked.content


def test_pipelined_requests_are_answered_in_order(webhook: RunningServer) -> None:
    """An inline review, a FastAPI endpoint and another review sent in one write."""
    first = json.dumps(review(typical_pod("one"), uid="pipe-1")).encode()
    second = json.dumps(review(typical_pod("two"), uid="pipe-2")).encode()
    conn = tls_connect(webhook)
    conn.sendall(inject_bytes(first) + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" + inject_bytes(second)
                 + inject_bytes(first))
    answers = read_n(conn, 4)
    conn.close()
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 4
    assert answers[1][2] == b"ok\n"
    uids = [json.loads(a[2])["response"]["uid"] for a in (answers[0], answers[2], answers[3])]
    assert uids == ["pipe-1", "pipe-2", "pipe-1"]
    assert decoded_patch(json.loads(answers[2][2]))


def test_review_after_a_pipelined_slow_endpoint_waits_its_turn(webhook: RunningServer) -> None:
    """/metrics answers from a thread; the review behind it on the connection comes second."""
    body = json.dumps(review(typical_pod(), uid="after-metrics")).encode()
    conn = tls_connect(webhook)
    conn.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n" + inject_bytes(body))
    answers = read_n(conn, 2)
    conn.close()
    assert b"mesh_injector_requests_total" in answers[0][2]
    assert json.loads(answers[1][2])["response"]["uid"] == "after-metrics"


def test_many_pipelined_requests_behind_a_slow_one_are_all_answered(webhook: RunningServer) -> None:
    """2,000 reviews queued behind /metrics on one connection: each answered, in order."""
    count = 2000
    requests = b"".join(inject_bytes(b'{"uid": %d}' % i) for i in range(count))
    conn = tls_connect(webhook, timeout=30)
    payload = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n" + requests
    received = duplex(conn, payload, lambda got: got.count(b"HTTP/1.1 ") >= count + 1)
    conn.close()
    answers, rest = [], received
    while (found := split_response(rest)) is not None:
        answer, rest = found
        answers.append(answer)
    assert b"mesh_injector_requests_total" in answers[0][2]
    assert {a[0] for a in answers[1:]} == {b"HTTP/1.1 400 Bad Request"}  # no AdmissionReview envelope
    assert len(answers) == count + 1


@pytest.mark.parametrize("size", [100 * 1024, 400 * 1024], ids=["100KiB-inline", "400KiB-on-the-pool"])
def test_large_reviews_sent_in_pieces_are_answered(webhook: RunningServer, size: int) -> None:
    """Above uvicorn's 64 KiB read pause (inline) and above the inline limit (thread pool), the
    body arriving in two pieces a moment apart as it would over a real network."""
    pod = typical_pod(annotations={"note": "x" * size})
    body = json.dumps(review(pod, uid=f"big-{size}")).encode()
    conn = tls_connect(webhook)
    request = inject_bytes(body)
    conn.sendall(request[: 80 * 1024])
    time.sleep(0.3)
    conn.sendall(request[80 * 1024:])
    (status, _, answer), = read_n(conn, 1)
    conn.close()
    assert status == b"HTTP/1.1 200 OK", answer[:300]
    assert json.loads(answer)["response"]["uid"] == f"big-{size}"
    assert decoded_patch(json.loads(answer))


def test_the_api_servers_request_form_is_served(webhook: RunningServer) -> None:
    """kube-apiserver calls ``/inject?timeout=10s``; the keep-alive connection stays open."""
    body = json.dumps(review(typical_pod(), uid="with-query")).encode()
    conn = tls_connect(webhook)
    conn.sendall(inject_bytes(body, "/inject?timeout=10s"))
    (status, headers, answer), = read_n(conn, 1)
    conn.sendall(inject_bytes(body, "/inject?timeout=10s"))
    assert read_n(conn, 1)[0][0] == b"HTTP/1.1 200 OK"
    conn.close()
    assert status == b"HTTP/1.1 200 OK" and b"connection" not in headers
    assert re.fullmatch(rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", headers[b"date"])
    assert json.loads(answer)["response"]["uid"] == "with-query"


def test_expect_100_continue_is_honoured(webhook: RunningServer) -> None:
    body = json.dumps(review(typical_pod(), uid="expect")).encode()
    conn = tls_connect(webhook)
    head, _, _ = inject_bytes(body, extra="expect: 100-continue\r\nconnection: close\r\n").partition(
        b"\r\n\r\n")
    conn.sendall(head + b"\r\n\r\n")
    interim = conn.recv(65536)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    conn.sendall(body)
    answer = read_response(conn)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["response"]["uid"] == "expect"
