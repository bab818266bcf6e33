"""The HTTP contract of POST /inject, each case against the real server over verified HTTPS."""

from __future__ import annotations

import base64
import json
import ssl
import warnings
from pathlib import Path

import httpx
import jsonpatch
import pytest

from tests.server.helpers import RunningServer, decoded_patch, review, start_server, typical_pod


def post(
    webhook: RunningServer, body: bytes | str, content_type: str | None = "application/json"
) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    with webhook.client() as client:
        return client.post("/inject", content=body, headers=headers)


def post_review(webhook: RunningServer, doc: dict) -> dict:
    response = post(webhook, json.dumps(doc))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("api_version", ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
def test_pod_create_is_injected_and_review_is_echoed(webhook: RunningServer, api_version: str) -> None:
    pod = typical_pod()
    doc = review(pod, api_version=api_version, uid="7f0d-uid-echo")
    answer = post_review(webhook, doc)
    assert answer["apiVersion"] == api_version
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "7f0d-uid-echo"
    assert answer["response"]["allowed"] is True
    patched = jsonpatch.apply_patch(pod, decoded_patch(answer))
    names = [c["name"] for c in patched["spec"].get("initContainers", []) + patched["spec"]["containers"]]
    assert "istio-proxy" in names
    assert "sidecar.istio.io/status" in patched["metadata"]["annotations"]


def test_patch_is_base64_json_patch(webhook: RunningServer) -> None:
    answer = post_review(webhook, review(typical_pod()))
    raw = answer["response"]["patch"]
    ops = json.loads(base64.b64decode(raw, validate=True))
    assert isinstance(ops, list) and ops
    assert all(op["op"] in {"add", "replace", "remove"} and op["path"].startswith("/") for op in ops)


def test_wrong_content_type_is_415(webhook: RunningServer) -> None:
    body = json.dumps(review(typical_pod()))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        response = post(webhook, body, content_type)
        assert response.status_code == 415, (content_type, response.text)
        assert "Content-Type" in response.json()["message"]


def test_empty_body_is_400(webhook: RunningServer) -> None:
    response = post(webhook, b"")
    assert response.status_code == 400
    assert "empty" in response.json()["message"]


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"text"', b"{}"])
def test_undecodable_or_wrong_shape_is_400(webhook: RunningServer, body: bytes) -> None:
    response = post(webhook, body)
    assert response.status_code == 400
    assert response.json()["message"]


def test_review_without_request_or_uid_is_400(webhook: RunningServer) -> None:
    doc = review(typical_pod())
    del doc["request"]["uid"]
    response = post(webhook, json.dumps(doc))
    assert response.status_code == 400 and "uid" in response.json()["message"]
    response = post(webhook, json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}))
    assert response.status_code == 400 and "request" in response.json()["message"]


def test_body_over_default_limit_is_400(webhook: RunningServer) -> None:
    pod = typical_pod()
    pod["metadata"]["annotations"] = {"filler": "x" * (6 * 1024 * 1024 + 10)}
    response = post(webhook, json.dumps(review(pod)))
    assert response.status_code == 400
    assert "limit" in response.json()["message"]
    # The server is still answering normally afterwards.
    assert post_review(webhook, review(typical_pod()))["response"]["allowed"] is True


def test_chunked_body_over_limit_is_400(webhook: RunningServer) -> None:
    chunk = b" " * (1024 * 1024)

    def body():  # no Content-Length: the cap must hold while streaming
        for _ in range(7):
            yield chunk

    with webhook.client() as client:
        response = client.post("/inject", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "limit" in response.json()["message"]


def test_bad_traffic_annotation_is_refused_naming_it(webhook: RunningServer) -> None:
    pod = typical_pod(annotations={"traffic.sidecar.istio.io/includeInboundPorts": "80,http"})
    answer = post_review(webhook, review(pod))["response"]
    assert answer["allowed"] is False
    assert "patch" not in answer
    message = answer["status"]["message"]
    assert "traffic.sidecar.istio.io/includeInboundPorts" in message and "http" in message


def test_proxy_uid_conflict_is_refused_naming_the_container(webhook: RunningServer) -> None:
    pod = typical_pod()
    pod["spec"]["containers"][1]["securityContext"] = {"runAsUser": 1337}
    answer = post_review(webhook, review(pod))["response"]
    assert answer["allowed"] is False
    assert "worker" in answer["status"]["message"] and "1337" in answer["status"]["message"]


def test_non_pod_kind_is_allowed_without_patch(webhook: RunningServer) -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
               "spec": {"ports": [{"port": 80}]}}
    answer = post_review(
        webhook, review(service, kind={"group": "", "version": "v1", "kind": "Service"}, resource="services")
    )["response"]
    assert answer["allowed"] is True and "patch" not in answer and "patchType" not in answer


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT"])
def test_non_create_is_allowed_without_patch(webhook: RunningServer, operation: str) -> None:
    answer = post_review(webhook, review(typical_pod(), operation=operation))["response"]
    assert answer["allowed"] is True and "patch" not in answer


def test_dry_run_review_is_handled_like_any_other(webhook: RunningServer) -> None:
    pod = typical_pod()
    normal = post_review(webhook, review(pod))["response"]
    dry = post_review(webhook, review(pod, dry_run=True))["response"]
    assert dry["allowed"] is True
    assert json.loads(base64.b64decode(dry["patch"])) == json.loads(base64.b64decode(normal["patch"]))


def test_opted_out_pod_is_allowed_untouched(webhook: RunningServer) -> None:
    answer = post_review(webhook, review(typical_pod(annotations={"sidecar.istio.io/inject": "false"})))
    assert answer["response"]["allowed"] is True and "patch" not in answer["response"]


def test_host_network_pod_is_allowed_untouched(webhook: RunningServer) -> None:
    pod = typical_pod()
    pod["spec"]["hostNetwork"] = True
    answer = post_review(webhook, review(pod))["response"]
    assert answer["allowed"] is True and "patch" not in answer


@pytest.mark.parametrize(("pod", "cause"), [
    ({"spec": "nonsense"}, "spec must be a mapping"),
    ({"metadata": [], "spec": {"containers": "x"}}, "metadata must be a mapping"),
    ({"spec": {"containers": [1]}}, "spec.containers[0] must be a mapping"),
    (None, "carries no pod object"),
])
def test_malformed_pod_is_refused_with_the_cause(
    webhook: RunningServer, pod: dict | None, cause: str
) -> None:
    response = post(webhook, json.dumps(review(pod, uid="malformed-uid")))
    assert response.status_code == 200, response.text
    answer = response.json()["response"]
    assert answer["uid"] == "malformed-uid" and answer["allowed"] is False
    assert answer["status"]["code"] == 400 and answer["status"]["reason"] == "BadRequest"
    message = answer["status"]["message"]
    assert message.startswith("MalformedObject: ") and cause in message


def test_tls_1_2_is_served_and_older_versions_are_refused(webhook: RunningServer) -> None:
    ctx = webhook.pki.ssl_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with httpx.Client(verify=ctx) as client:
        assert client.get(f"{webhook.url}/healthz").status_code == 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = webhook.pki.ssl_context()
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let our client offer TLS 1.0/1.1 at all
    with httpx.Client(verify=old) as client, pytest.raises(httpx.ConnectError):
        client.get(f"{webhook.url}/healthz")


def test_plain_http_is_not_served(webhook: RunningServer) -> None:
    with httpx.Client() as client, pytest.raises(httpx.TransportError):
        client.get(f"http://127.0.0.1:{webhook.port}/healthz")


def test_client_must_trust_the_ca(webhook: RunningServer) -> None:
    with httpx.Client() as client, pytest.raises(httpx.ConnectError):
        client.get(f"{webhook.url}/healthz")  # system trust store only


def test_structured_log_line_per_review(webhook: RunningServer) -> None:
    post_review(webhook, review(typical_pod("logged"), uid="log-uid-1", namespace="team-a"))
    lines = [entry for entry in webhook.logs() if entry.get("uid") == "log-uid-1"]
    assert lines, "no JSON log line for the request"
    line = lines[-1]
    assert line["namespace"] == "team-a"
    assert line["pod"] == "logged-5d9c7b-"
    assert line["decision"] == "inject" and line["reason"] == "Injected"
    assert isinstance(line["latency_ms"], float | int) and line["latency_ms"] >= 0


def test_body_limit_is_configurable(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra_args=["--max-body-bytes", "4096"])
    try:
        small = json.dumps(review(typical_pod()))
        big_pod = typical_pod(annotations={"note": "x" * 5000})
        assert len(small) < 4096
        assert post(server, small).status_code == 200
        response = post(server, json.dumps(review(big_pod)))
        assert response.status_code == 400 and "4096" in response.json()["message"]
    finally:
        server.stop()
