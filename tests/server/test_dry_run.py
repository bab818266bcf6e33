"""POST /dry-run: the same core answer as /inject, for Pods, workloads and Lists, in YAML or JSON."""

from __future__ import annotations

import base64
import json

import jsonpatch
import yaml

from tests.server.fake_apiserver import DEV_TOKEN
from tests.server.helpers import RunningServer, review, typical_pod


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
            **params: str):
    headers = {"content-type": content_type}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    with webhook.client() as client:
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
