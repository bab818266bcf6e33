"""POST /dry-run: the same core answer as /inject, for Pods, workloads and Lists, in YAML or JSON."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jsonpatch
import pytest
import yaml

from tests.server.fake_apiserver import DEV_TOKEN, FakeApiServer
from tests.server.helpers import RunningServer, review, start_server, typical_pod


def deployment(name: str = "web", annotations: dict | None = None) -> dict:
    template = typical_pod(name)
    template["metadata"] = {"labels": {"app": name}, **({"annotations": annotations} if annotations else {})}
    del template["apiVersion"], template["kind"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}}, "template": template},
    }


SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"ports": [{"port": 80}]}}


def dry_run(webhook: RunningServer, body: str | bytes, content_type: str, token: str | None = DEV_TOKEN,
            timeout: float = 10.0, **params: str):
    headers = {"content-type": content_type}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    with webhook.client(timeout=timeout) as client:
        return client.post("/dry-run", content=body, headers=headers, params=params)


def test_multi_document_yaml_in_yaml_out(webhook: RunningServer) -> None:
    docs = [deployment(), SERVICE, typical_pod("solo", annotations={"sidecar.istio.io/inject": "false"})]
    response = dry_run(webhook, yaml.safe_dump_all(docs), "application/yaml")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/yaml")
    results = yaml.safe_load(response.text)["results"]
    assert [r["kind"] for r in results] == ["Deployment", "Service", "Pod"]
    dep, svc, pod = results
    assert dep["decision"] == "inject" and dep["reasons"][0]["code"] == "Injected"
    assert jsonpatch.apply_patch(docs[0], dep["patch"]) == dep["mutated"]
    pod_spec = dep["mutated"]["spec"]["template"]["spec"]
    names = [c["name"] for c in pod_spec["containers"] + pod_spec.get("initContainers", [])]
    assert "istio-proxy" in names
    assert svc["decision"] == "passthrough" and svc["patch"] == []
    assert pod["decision"] == "skip" and pod["reasons"][0]["code"] == "PodOptedOut"


def test_json_list_in_json_out(webhook: RunningServer) -> None:
    body = {"apiVersion": "v1", "kind": "List", "items": [typical_pod("a"), deployment("b")]}
    response = dry_run(webhook, json.dumps(body), "application/json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    results = response.json()["results"]
    assert [r["decision"] for r in results] == ["inject", "inject"]
    assert response.json()["configHash"]


def test_same_answer_as_the_webhook(webhook: RunningServer) -> None:
    pod = typical_pod("same")
    with webhook.client() as client:
        answer = client.post("/inject", json=review(pod, namespace="apps")).json()["response"]
    webhook_patch = json.loads(base64.b64decode(answer["patch"]))
    result = dry_run(webhook, json.dumps(pod), "application/json", namespace="apps").json()["results"][0]
    assert result["patch"] == webhook_patch


def test_rejection_carries_the_reason(webhook: RunningServer) -> None:
    pod = typical_pod(annotations={"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/33"})
    result = dry_run(webhook, json.dumps(pod), "application/json").json()["results"][0]
    assert result["decision"] == "reject" and result["allowed"] is False
    assert result["reasons"][0]["code"] == "InvalidTrafficAnnotation"
    assert "10.0.0.0/33" in result["reasons"][0]["message"]


def test_namespace_labels_apply_the_webhook_selectors(webhook: RunningServer) -> None:
    pod = json.dumps(typical_pod())
    unlabelled = dry_run(webhook, pod, "application/json", namespace="plain", namespaceLabels="team=a")
    assert unlabelled.json()["results"][0]["decision"] == "skip"
    assert unlabelled.json()["results"][0]["reasons"][0]["code"] == "NamespaceNotSelected"
    labelled = dry_run(webhook, pod, "application/json", namespace="mesh",
                       namespaceLabels="istio-injection=enabled")
    assert labelled.json()["results"][0]["decision"] == "inject"


def test_revision_selects_like_that_revisions_webhook(webhook: RunningServer) -> None:
    pod = json.dumps(typical_pod())
    canary_ns = "istio.io/rev=canary"
    as_default = dry_run(webhook, pod, "application/json", namespace="c", namespaceLabels=canary_ns)
    assert as_default.json()["results"][0]["reasons"][0]["code"] == "RevisionMismatch"
    as_canary = dry_run(webhook, pod, "application/json", namespace="c", namespaceLabels=canary_ns,
                        revision="canary")
    result = as_canary.json()["results"][0]
    assert result["decision"] == "inject"
    status = json.loads(result["mutated"]["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["revision"] == "canary"


def test_output_override_and_errors(webhook: RunningServer) -> None:
    as_json = dry_run(webhook, yaml.safe_dump(typical_pod()), "application/yaml", output="json")
    assert as_json.headers["content-type"].startswith("application/json") and as_json.json()["results"]
    assert dry_run(webhook, "kind: [", "application/yaml").status_code == 400
    assert dry_run(webhook, "", "application/json").status_code == 400
    assert dry_run(webhook, "- 1\n- 2\n", "application/yaml").status_code == 400
    assert dry_run(webhook, "{}", "text/html").status_code == 415
    bad_labels = dry_run(webhook, json.dumps(typical_pod()), "application/json", namespaceLabels="novalue")
    assert bad_labels.status_code == 400 and "novalue" in bad_labels.json()["error"]


def test_dry_run_needs_a_token_of_a_user_who_may_create_pods(
    webhook: RunningServer, fake_api: FakeApiServer
) -> None:
    fake_api.tokens["reader-token"] = {"username": "reader", "groups": ["system:authenticated"]}
    fake_api.grants.add(("reader", "create", "pods", "allowed-ns"))
    pod = json.dumps(typical_pod())
    missing = dry_run(webhook, pod, "application/json", token=None)
    assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
    assert dry_run(webhook, pod, "application/json", token="forged").status_code == 401
    denied = dry_run(webhook, pod, "application/json", token="reader-token", namespace="other")
    assert denied.status_code == 403
    assert denied.json()["error"] == "user 'reader' may not create pods in namespace 'other'"
    allowed = dry_run(webhook, pod, "application/json", token="reader-token", namespace="allowed-ns")
    assert allowed.status_code == 200
    sar = fake_api.calls("/subjectaccessreviews")[-1].body["spec"]
    assert sar["user"] == "reader"
    assert sar["resourceAttributes"] == {"verb": "create", "resource": "pods", "group": "",
                                         "namespace": "allowed-ns"}


def pod_list(count: int) -> dict:
    return {"apiVersion": "v1", "kind": "List", "items": [typical_pod(f"p{i}") for i in range(count)]}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, fake_api: FakeApiServer) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("dry-run-limits")
    server = start_server(workdir, extra_args=[
        "--kubeconfig", str(fake_api.kubeconfig(workdir / "kubeconfig")), "--dry-run-timeout", "10",
        "--dry-run-max-body-bytes", "200000", "--dry-run-max-memory", "32"])
    yield server
    server.stop()


def test_dry_run_body_limit_is_its_own(limited: RunningServer) -> None:
    response = dry_run(limited, json.dumps(pod_list(400)), "application/json")
    assert response.status_code == 413
    assert "200000 bytes (serve --dry-run-max-body-bytes)" in response.json()["error"]


def test_dry_run_over_its_time_is_stopped_naming_the_limit(tmp_path: Path, fake_api: FakeApiServer) -> None:
    # The document limits keep honest work far below any sane time limit; a tiny one shows the
    # backstop: the child is killed, the caller told which flag, the worker unharmed.
    server = start_server(tmp_path, extra_args=[
        "--kubeconfig", str(fake_api.kubeconfig(tmp_path / "kubeconfig")), "--dry-run-timeout", "0.01"])
    try:
        response = dry_run(server, yaml.safe_dump(pod_list(150)), "application/yaml")
        assert response.status_code == 400, response.text[:300]
        assert "within 0.01 s (limit --dry-run-timeout)" in response.json()["error"]
        with server.client() as client:
            assert client.post("/inject", json=review(typical_pod())).json()["response"]["patch"]
    finally:
        server.stop()


def test_dry_run_expansion_bomb_is_stopped_by_its_limits(limited: RunningServer) -> None:
    # A few hundred bytes of nested YAML aliases that expand to 10**8 strings once written out.
    levels = ["a0: &a0 [" + ", ".join(['"xxxxxxxxxx"'] * 10) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    body = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bomb\nspec:\n  containers:\n  - name: app\n" \
           "    image: x\n    args: *a7\nbomb:\n" + "".join(f"  {line}\n" for line in levels)
    assert len(body) < 2000
    started = time.monotonic()
    response = dry_run(limited, body, "application/yaml")
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    # Whichever limit trips first: memory, time, or (with the YAML limits) aliases themselves.
    assert "--dry-run-max-memory" in error or "--dry-run-timeout" in error or "alias" in error, error
    assert time.monotonic() - started < 30
    assert dry_run(limited, json.dumps(typical_pod()), "application/json").status_code == 200


def test_a_huge_dry_run_does_not_hold_inject(tmp_path: Path, fake_api: FakeApiServer) -> None:
    """/inject answers while the largest dry-run the document limits admit is running."""
    server = start_server(tmp_path, extra_args=[
        "--kubeconfig", str(fake_api.kubeconfig(tmp_path / "kubeconfig"))])
    try:
        body = yaml.safe_dump(pod_list(200))  # 200 objects: injector.dryrun's max_objects
        finished: dict[str, float] = {}

        def big() -> None:
            finished["started"] = time.monotonic()
            response = dry_run(server, body, "application/yaml", timeout=300)
            finished["dry-run"] = time.monotonic()
            finished["status"] = response.status_code

        thread = threading.Thread(target=big)
        done: list[float] = []
        with server.client() as client:
            assert client.get("/healthz").status_code == 200  # this connection is open already
            thread.start()
            time.sleep(0.15)  # the dry-run is authenticated and running by now
            for _ in range(20):
                started = time.monotonic()
                answer = client.post("/inject", json=review(typical_pod())).json()["response"]
                done.append(time.monotonic())
                assert answer["allowed"] and answer["patch"]
                latency = done[-1] - started
        thread.join(300)
        assert finished["status"] == 200
        answered_meanwhile = sum(t < finished["dry-run"] for t in done)
        assert answered_meanwhile >= 5, "the /inject calls waited for the dry-run"
        print(f"dry-run {finished['dry-run'] - finished['started']:.2f} s; {answered_meanwhile} of 20 "
              f"/inject answered meanwhile; last /inject {latency * 1000:.1f} ms")
    finally:
        server.stop()
