"""Property tests: for random valid pods the patch applies, the output is schema-valid, and
injecting the output again changes nothing."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from injector.config import compile_config
from injector.core import inject
from injector.patch import create_patch
from injector.result import Decision, ReasonCode
from tests.core.kube import schema_errors

CONFIGS = {
    "default": compile_config(),
    "native": compile_config({"values": {"proxy": {"nativeSidecars": "true"}}}),
    "init-capture": compile_config(
        {"values": {"proxy": {"capture": "init", "holdApplicationUntilProxyStarts": True}}}
    ),
    "envoy": compile_config({"defaultTemplates": ["envoy"]}),
}

dns_label = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.startswith("istio")
)
port_name = st.from_regex(r"[a-z]{1,10}", fullmatch=True)
port_number = st.integers(min_value=1, max_value=65535)
env_value = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@st.composite
def containers(draw: st.DrawFn, name: str) -> dict[str, Any]:
    ports = draw(
        st.lists(st.tuples(port_name, port_number), max_size=3, unique_by=(lambda p: p[0], lambda p: p[1]))
    )
    body: dict[str, Any] = {
        "name": name,
        "image": draw(st.sampled_from(["nginx:1.27", "example/app:2", "busybox"])),
    }
    if ports:
        body["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    env = draw(
        st.lists(
            st.tuples(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), env_value),
            max_size=5,
            unique_by=lambda e: e[0],
        )
    )
    if env:
        body["env"] = [{"name": k, "value": v} for k, v in env]

    def probe() -> st.SearchStrategy[dict[str, Any]]:
        targets = [p for _, p in ports] or [8080]
        port_ref = st.sampled_from(targets + [n for n, _ in ports])
        handler = st.one_of(
            st.builds(
                lambda p, path, scheme: {"httpGet": {"path": path, "port": p, "scheme": scheme}},
                port_ref,
                st.sampled_from(["/", "/healthz", "/ready"]),
                st.sampled_from(["HTTP", "HTTPS"]),
            ),
            st.builds(lambda p: {"tcpSocket": {"port": p}}, port_ref),
            st.builds(lambda p: {"grpc": {"port": p}}, st.sampled_from(targets)),
            st.just({"exec": {"command": ["true"]}}),
        )
        return st.builds(
            lambda h, t: {**h, **({"timeoutSeconds": t} if t else {})},
            handler,
            st.integers(min_value=0, max_value=5),
        )

    for field in ("readinessProbe", "livenessProbe", "startupProbe"):
        if draw(st.booleans()):
            body[field] = draw(probe())
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        body["securityContext"] = {"runAsUser": draw(st.sampled_from([0, 1000, 1337]))}
    return body


traffic_values = {
    "traffic.sidecar.istio.io/includeOutboundIPRanges": st.sampled_from(
        ["*", "10.0.0.0/8", "10.0.0.0/8,fd00::/8", "bad"]
    ),
    "traffic.sidecar.istio.io/excludeInboundPorts": st.sampled_from(["", "9100", "80,443", "99999"]),
    "traffic.sidecar.istio.io/excludeInterfaces": st.sampled_from(["eth1", "", "a/b"]),
    "sidecar.istio.io/interceptionMode": st.sampled_from(["REDIRECT", "NONE"]),
    "sidecar.istio.io/rewriteAppHTTPProbers": st.sampled_from(["true", "false"]),
    "sidecar.istio.io/proxyCPU": st.sampled_from(["50m", "1", "x"]),
    "prometheus.io/scrape": st.sampled_from(["true", "false"]),
    "prometheus.io/port": st.sampled_from(["9100", "8080"]),
    "sidecar.istio.io/nativeSidecar": st.sampled_from(["true", "false"]),
    "proxy.istio.io/config": st.sampled_from(["holdApplicationUntilProxyStarts: true", "{}"]),
}


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(dns_label, min_size=1, max_size=5, unique=True))
    split = draw(st.integers(min_value=1, max_value=len(names)))
    app_names, init_names = names[:split], names[split:]
    annotations = {k: draw(v) for k, v in traffic_values.items() if draw(st.integers(0, 4)) == 0}
    labels = {"app": draw(dns_label)}
    if draw(st.booleans()):
        labels["version"] = draw(dns_label)
    spec: dict[str, Any] = {"containers": [draw(containers(n)) for n in app_names]}
    if init_names:
        inits = []
        for n in init_names:
            item = {"name": n, "image": "busybox", "command": ["true"]}
            if draw(st.booleans()):
                item["restartPolicy"] = "Always"
            inits.append(item)
        spec["initContainers"] = inits
    if draw(st.booleans()):
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    meta: dict[str, Any] = {"name": draw(dns_label), "namespace": "app", "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


REJECT_CODES = {
    ReasonCode.INVALID_TRAFFIC_ANNOTATION,
    ReasonCode.INVALID_ANNOTATION,
    ReasonCode.PROXY_UID_CONFLICT,
}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods(), config_name=st.sampled_from(sorted(CONFIGS)))
def test_random_pods_inject_validly_and_idempotently(pod: dict[str, Any], config_name: str) -> None:
    config = CONFIGS[config_name]
    assert schema_errors(pod) == [], "the generator must produce valid pods"
    pristine = copy.deepcopy(pod)
    result = inject(pod, config=config)
    event(f"{result.decision.value}: {result.reason.code.value}")
    assert pod == pristine
    if result.decision is Decision.REJECT:
        assert result.reason.code in REJECT_CODES
        assert result.patch == []
        return
    assert result.decision is Decision.INJECT
    assert jsonpatch.apply_patch(pod, result.patch) == result.mutated
    assert schema_errors(result.mutated) == []
    again = inject(copy.deepcopy(result.mutated), config=config)
    assert again.decision is Decision.INJECT
    assert again.patch == []
    assert again.reason.code is ReasonCode.ALREADY_INJECTED


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3))
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(alphabet="ab/~c", max_size=3), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(a=json_values, b=json_values)
def test_patch_turns_any_document_into_any_other(a: Any, b: Any) -> None:
    patch = create_patch(a, b)
    assert jsonpatch.apply_patch(copy.deepcopy(a), patch) == b


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods(), data=st.data())
def test_corrupted_pods_get_a_decision_not_a_crash(pod: dict[str, Any], data: st.DataObject) -> None:
    """What the CLI or dry-run endpoint may be fed: one part replaced by a value of the wrong type."""
    path = data.draw(st.sampled_from(_paths(pod)[1:]))
    target = pod
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(
        st.one_of(
            json_leaf,
            st.lists(json_leaf, max_size=2),
            st.dictionaries(st.text(max_size=3), json_leaf, max_size=2),
        )
    )
    result = inject(pod)
    event(result.decision.value)
    if result.decision is Decision.INJECT:
        assert jsonpatch.apply_patch(pod, result.patch) == result.mutated
