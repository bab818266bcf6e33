"""Configuration loading, templates as data, and webhook-level selection."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from injector.config import ConfigError, compile_config, load_config_dir
from injector.core import inject
from injector.quantity import parse_quantity
from injector.result import Decision, ReasonCode
from injector.selectors import evaluate_selection, webhook_selectors


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict:
    meta: dict = {"name": "p", "namespace": "apps", "labels": labels or {"app": "p"}}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    }


def proxy_of(result) -> dict:
    return next(c for c in result.mutated["spec"]["containers"] if c["name"] == "istio-proxy")


# --- config directory -------------------------------------------------------------------------


def test_config_dir_with_values_and_template_files(tmp_path: Path) -> None:
    (tmp_path / "config").write_text("policy: disabled\ndefaultTemplates: [sidecar, extra]\n")
    (tmp_path / "values").write_text("proxy:\n  image: registry.example/proxyv2:9\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "extra.yaml").write_text(
        "metadata:\n  annotations:\n    example.com/team: '{{ pod.namespace }}'\n"
    )
    config = load_config_dir(tmp_path)
    result = inject(pod(labels={"app": "p", "sidecar.istio.io/inject": "true"}), config=config)
    assert result.decision is Decision.INJECT
    assert proxy_of(result)["image"] == "registry.example/proxyv2:9"
    assert result.mutated["metadata"]["annotations"]["example.com/team"] == "apps"
    assert inject(pod(), config=config).reason.code is ReasonCode.POLICY_DISABLED


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"config": "policy: [oops"}, "not valid YAML"),
        ({"config": "policy: sometimes"}, "policy"),
        ({"config": "defaultTemplates: [missing]"}, "unknown template 'missing'"),
        ({"config": "neverInjectSelector: [{}]"}, "empty label selector"),
        ({"config": "unknownKey: 1"}, "unknownKey"),
        (
            {"bad.template.yaml": "spec:\n  containers:\n    - name: x\n      image: '{{ proxy.imag }}'\n"},
            "unknown template value",
        ),
        ({"bad.template.yaml": "spec:\n  nodeName: x\n"}, "spec may hold only"),
        ({"values": "proxy:\n  excludeInboundPorts: '70000'\n"}, "outside 1-65535"),
    ],
)
def test_invalid_config_is_refused_with_a_reason(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_dir(tmp_path)


def test_missing_config_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_dir(tmp_path / "nope")


def test_config_hash_tells_configs_apart_and_lands_in_the_status() -> None:
    a = compile_config()
    b = compile_config({"values": {"proxy": {"image": "other:1"}}})
    assert a.config_hash == compile_config().config_hash
    assert a.config_hash != b.config_hash
    status = orjson.loads(
        inject(pod(), config=b).mutated["metadata"]["annotations"]["sidecar.istio.io/status"]
    )
    assert status["configHash"] == b.config_hash


def test_if_and_none_removal_in_user_templates() -> None:
    config = compile_config(
        {
            "templates": {
                "t": {
                    "spec": {
                        "containers": [
                            {
                                "name": "istio-proxy",
                                "image": "{{ proxy.image }}",
                                "env": [
                                    {
                                        "name": "PROBERS",
                                        "value": "{{ pod.appProbers }}",
                                        "$if": "pod.appProbers",
                                    },
                                    {"name": "OWNER", "value": "{{ pod.owner }}"},
                                ],
                                "lifecycle": "{{ proxy.lifecycle }}",
                            }
                        ]
                    }
                }
            },
            "defaultTemplates": ["t"],
        }
    )
    result = inject(pod(), config=config)
    proxy = proxy_of(result)
    assert "lifecycle" not in proxy  # None removes the key
    assert proxy["env"] == [{"name": "OWNER", "value": "kubernetes://apis/v1/namespaces/apps/pods/p"}]


# --- webhook-level selection --------------------------------------------------------------------

CASES = [
    # namespace labels, pod labels, selected?
    ({"istio-injection": "enabled"}, {}, True),
    ({"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "false"}, False),
    ({"istio-injection": "disabled"}, {"sidecar.istio.io/inject": "true"}, False),
    ({}, {}, False),
    ({}, {"sidecar.istio.io/inject": "true"}, True),
    ({}, {"istio.io/rev": "default"}, True),
    ({}, {"istio.io/rev": "canary"}, False),
    ({"istio.io/rev": "default"}, {}, True),
    ({"istio.io/rev": "canary"}, {}, False),
    ({"istio.io/rev": "canary"}, {"sidecar.istio.io/inject": "true"}, False),
    ({"istio.io/rev": "default", "istio-injection": "enabled"}, {}, True),
]


@pytest.mark.parametrize(("ns_labels", "pod_labels", "selected"), CASES)
def test_selection_follows_istio(ns_labels: dict, pod_labels: dict, selected: bool) -> None:
    selection = evaluate_selection(
        webhook_selectors("default", ["kube-system"]),
        namespace="apps",
        namespace_labels=ns_labels,
        pod_labels=pod_labels,
    )
    assert selection.selected is selected


def test_a_canary_revision_selects_only_its_own_labels() -> None:
    selectors = webhook_selectors("canary", ["kube-system"])
    assert {s.name.split(".")[0] for s in selectors} == {"rev"}

    def select(ns: dict, p: dict) -> bool:
        return evaluate_selection(selectors, namespace="apps", namespace_labels=ns, pod_labels=p).selected

    assert select({"istio.io/rev": "canary"}, {})
    assert select({}, {"istio.io/rev": "canary"})
    assert not select({"istio-injection": "enabled"}, {})


def test_system_namespaces_are_excluded_by_the_api_server_selectors_too() -> None:
    selectors = webhook_selectors("default", ["kube-system", "kube-public"])
    selection = evaluate_selection(
        selectors, namespace="kube-system", namespace_labels={"istio-injection": "enabled"}, pod_labels={}
    )
    assert not selection.selected
    for webhook in selectors:
        assert {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-public", "kube-system"],
        } in webhook.namespace_selector["matchExpressions"]


def test_webhook_path_without_namespace_labels_trusts_the_api_server() -> None:
    # The API server only calls us for selected pods, so no labels means "selected".
    assert inject(pod()).decision is Decision.INJECT
    assert inject(pod(), namespace_labels={}).reason.code is ReasonCode.NAMESPACE_NOT_SELECTED


# --- small pure pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100m", "0.1"),
        ("1", "1"),
        ("1.5Gi", str(1.5 * 2**30)),
        ("2e3", "2000"),
        ("128Mi", str(128 * 2**20)),
        ("1k", "1000"),
    ],
)
def test_quantities(text: str, value: str) -> None:
    assert float(parse_quantity(text)) == float(value)


@pytest.mark.parametrize("text", ["", "lots", "1.2.3", "-1", "10Ki5", "1 Gi"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize("kind", ["Pod", "Deployment"])
def test_patch_replaces_changed_pod_spec_fields_whole_and_keeps_label_ops_per_key(kind: str) -> None:
    """The admission response's shape: per-key label/annotation ops, whole spec fields (the API
    server applies those faster than ops reaching into list items)."""
    import jsonpatch

    obj = pod(annotations={"team": "a"})
    obj["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/ready", "port": 8080}}
    obj["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    spec_at = "/spec"
    if kind == "Deployment":
        obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "apps"},
               "spec": {"selector": {"matchLabels": {"app": "p"}},
                        "template": {"metadata": obj["metadata"], "spec": obj["spec"]}}}
        spec_at = "/spec/template/spec"
    result = inject(obj)
    assert result.decision is Decision.INJECT
    paths = {op["path"]: op["op"] for op in result.patch}
    assert paths[f"{spec_at}/containers"] == "replace" and paths[f"{spec_at}/volumes"] == "replace"
    assert paths[f"{spec_at}/initContainers"] == "add"
    assert not [p for p in paths if p.startswith((f"{spec_at}/containers/", f"{spec_at}/volumes/"))]
    label_ops = [p for p in paths if p.startswith(spec_at.removesuffix("/spec") + "/metadata/labels/")]
    assert label_ops, "labels are added one key at a time, the user's own labels untouched"
    assert jsonpatch.apply_patch(obj, result.patch) == result.mutated


def test_large_pod_patch_does_not_repeat_the_unchanged_env() -> None:
    big = pod()
    big["spec"]["containers"][0]["env"] = [{"name": f"V{i}", "value": "x" * 40} for i in range(2000)]
    result = inject(big)
    assert result.decision is Decision.INJECT
    patch_size = len(orjson.dumps(result.patch))
    assert patch_size < 20_000, "the admission response must not carry the pod's unchanged env back"
    assert all(not op["path"].startswith("/spec/containers/0/env") for op in result.patch)


@pytest.mark.parametrize(
    ("obj", "part"),
    [
        ({"kind": "Pod", "metadata": 1}, "metadata"),
        ({"kind": "Pod", "metadata": {"annotations": {"a": 1}}}, "metadata.annotations"),
        ({"kind": "Pod", "spec": {"containers": [{"image": "x"}]}}, "spec.containers[0].name"),
        (
            {"kind": "Pod", "spec": {"containers": [{"name": "a", "readinessProbe": {"httpGet": 5}}]}},
            "readinessProbe.httpGet",
        ),
        ({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": []}}, "spec.template"),
        ({"kind": "List", "items": [1]}, "items"),
        ({"kind": 7}, "kind"),
    ],
)
def test_malformed_input_is_rejected_naming_the_part(obj: dict, part: str) -> None:
    result = inject(obj)
    assert result.decision is Decision.REJECT
    assert result.reason.code is ReasonCode.MALFORMED_OBJECT
    assert part in result.reason.message
    assert result.patch == []
