"""injector.documents and dryrun.respond: one input policy for /dry-run and the CLI, bounded."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from injector import documents, dryrun
from injector.config import default_config
from injector.documents import DocumentError, DocumentLimits
from injector.dryrun import DryRunLimits
from injector.yamlio import YamlLimits


def pod(name: str = "web") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]}}


def deployment(name: str = "web") -> dict[str, Any]:
    template = {"metadata": {"labels": {"app": name}}, "spec": pod(name)["spec"]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": name}}, "template": template}}


def answer(body: bytes | str, content_type: str = "application/yaml", **params: str) -> tuple[int, Any]:
    data = body.encode() if isinstance(body, str) else body
    status, payload, media = dryrun.respond(data, content_type, default_config(), params=params)
    return status, (json.loads(payload) if media == dryrun.JSON_MEDIA else yaml.safe_load(payload))


@pytest.mark.parametrize("kind", ["List", "DeploymentList", "PodList"])
def test_every_list_kind_is_its_items(kind: str) -> None:
    body = {"apiVersion": "v1", "kind": kind, "items": [deployment("a"), pod("b")]}
    objects = list(documents.expand(documents.parse(json.dumps(body).encode(), "json", source="f"),
                                    source="f"))
    assert [o["metadata"]["name"] for o in objects] == ["a", "b"]
    status, got = answer(yaml.safe_dump(body))
    assert status == 200
    decisions = [(r["kind"], r["decision"]) for r in got["results"]]
    assert decisions == [("Deployment", "inject"), ("Pod", "inject")]


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        (yaml.safe_dump({"kind": "List", "items": [pod(f"p{i}") for i in range(10_000)]}), "max_nodes"),
        (json.dumps({"kind": "List", "items": [pod(f"p{i}") for i in range(10_000)]}), "max_nodes"),
        (yaml.safe_dump({"kind": "List", "items": [{"kind": "Pod"} for _ in range(201)]}), "max_objects"),
        ("kind: Pod\n---\n" * 10_000, "max_documents"),
        (json.dumps([{"kind": "Pod"}] * 10_000), "max_documents"),
        ("kind: Pod\nx: " + "a" * (3 << 20), "max_bytes"),
        ("kind: Pod\nx: " + "[" * 65 + "]" * 65, "max_depth"),
        ('{"kind": "Pod", "x": ' + "[" * 65 + "]" * 65 + "}", "max_depth"),
    ],
    ids=["10k-pod-list-yaml", "10k-pod-list-json", "201-objects", "10k-documents-yaml", "10k-documents-json",
         "3MiB", "deep-yaml", "deep-json"],
)
def test_dry_run_refuses_what_is_too_big_naming_the_limit(body: str, limit: str) -> None:
    content_type = "application/json" if body.lstrip().startswith(("{", "[")) else "application/yaml"
    status, got = answer(body, content_type)
    assert status == 413
    assert got["limit"] == limit
    assert f"limit {limit}=" in got["error"]
    assert got["error"].startswith("the request body")


def test_dry_run_refuses_aliases() -> None:
    status, got = answer("kind: Pod\nmetadata: &m {name: a}\nspec: {containers: [{name: a, image: b}]}\n"
                         "x: *m\n")
    assert (status, got["limit"]) == (400, "aliases")


def test_dry_run_stops_at_its_time_limit() -> None:
    body = yaml.safe_dump_all([pod("a"), pod("b")]).encode()
    limits = DryRunLimits(max_seconds=0.0)
    status, payload, _ = dryrun.respond(body, "application/yaml", default_config(), limits=limits)
    got = json.loads(payload)
    assert status == 413 and got["limit"] == "max_seconds" and "max_seconds=0" in got["error"]


def test_dry_run_answers_in_the_input_format_or_the_requested_one() -> None:
    status, got = answer(yaml.safe_dump(pod()))
    assert status == 200 and got["results"][0]["decision"] == "inject"
    status, payload, media = dryrun.respond(yaml.safe_dump(pod()).encode(), "application/yaml",
                                            default_config(), params={"output": "json"})
    assert media == dryrun.JSON_MEDIA and json.loads(payload)["configHash"] == default_config().config_hash


@pytest.mark.parametrize(
    ("body", "content_type", "status", "fragment"),
    [
        ("", "application/json", 400, "empty request body"),
        ("kind: [", "application/yaml", 400, "the request body: not valid YAML at line 2"),
        ("- 1\n- 2\n", "application/yaml", 400, "document 1 is not a Kubernetes object"),
        ("{}", "text/html", 415, "unsupported Content-Type 'text/html'"),
        ("{", "application/json", 400, "the request body: not valid JSON"),
    ],
)
def test_dry_run_bad_bodies(body: str, content_type: str, status: int, fragment: str) -> None:
    got_status, got = answer(body, content_type)
    assert got_status == status
    assert fragment in got["error"]


def test_bad_namespace_labels_name_the_item_not_the_parameter() -> None:
    status, got = answer(json.dumps(pod()), "application/json", namespaceLabels="bogus")
    assert status == 400 and got["error"] == "namespace label 'bogus' is not key=value"


def test_unknown_kind_with_a_pod_template_is_reported_as_having_one() -> None:
    rollout = {**deployment("r"), "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout"}
    status, got = answer(yaml.safe_dump_all([rollout, {"kind": "ConfigMap", "metadata": {"name": "c"}}]))
    assert status == 200
    first, second = got["results"]
    assert first["decision"] == "passthrough"
    message = first["reasons"][0]["message"]
    assert message.startswith("Rollout has a pod template at spec.template, but is not a kind")
    assert "no pod template" in second["reasons"][0]["message"]


def test_parse_names_the_source_and_document() -> None:
    with pytest.raises(DocumentError, match=r"^pods.yaml: document 2 is not a Kubernetes object"):
        list(documents.parse(b"kind: Pod\n---\n[1, 2]\n", "yaml", source="pods.yaml"))
    limits = DocumentLimits(yaml=YamlLimits(), max_objects=1)
    with pytest.raises(DocumentError, match=r"max_objects=1") as caught:
        list(documents.expand([pod(), pod()], source="pods.yaml", limits=limits))
    assert caught.value.limit == "max_objects"
