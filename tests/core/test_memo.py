"""The config's one memo: a memoized render equals a fresh one, entries are bounded, and the
template context is built from its one declaration."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector import context
from injector.config import compile_config
from injector.core import inject
from tests.core.test_properties import CONFIGS, pods

#: Annotations that change the fixed (memoised) template groups, beside the traffic ones.
FIXED_OVERRIDES = {
    "sidecar.istio.io/logLevel": st.sampled_from(["info", "debug", "warning"]),
    "sidecar.istio.io/componentLogLevel": st.sampled_from(["misc:error", "misc:info"]),
    "sidecar.istio.io/proxyImage": st.sampled_from(["example/proxy:1", "example/proxy:2"]),
    "sidecar.istio.io/proxyMemory": st.sampled_from(["64Mi", "256Mi"]),
    "status.sidecar.istio.io/port": st.sampled_from(["15020", "15999", "0"]),
    "traffic.mesh-injector.io/proxyUID": st.sampled_from(["1337", "2000"]),
    "inject.istio.io/templates": st.sampled_from(["sidecar", "envoy", "sidecar,envoy"]),
    "proxy.istio.io/config": st.sampled_from(
        ["{}", "holdApplicationUntilProxyStarts: true", "concurrency: 2"]
    ),
}


def outcome(result: Any) -> tuple[Any, ...]:
    return (result.decision, result.reasons, result.warnings, result.patch, result.mutated)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pods(), config_name=st.sampled_from(sorted(CONFIGS)), data=st.data())
def test_memoized_render_equals_a_fresh_render(
    pod: dict[str, Any], config_name: str, data: st.DataObject
) -> None:
    """The warm config (its memo filled by every earlier example) answers exactly as a config
    whose memo stores nothing: no entry can serve another pod's render."""
    chosen = [k for k in FIXED_OVERRIDES if data.draw(st.integers(0, 2), label=f"use {k}") == 0]
    extra = {k: data.draw(FIXED_OVERRIDES[k], label=k) for k in chosen}
    pod["metadata"].setdefault("annotations", {}).update(extra)
    warm = CONFIGS[config_name]
    fresh = warm.without_memo()
    pristine = copy.deepcopy(pod)
    memoized = inject(pod, config=warm)
    again = inject(pod, config=warm)  # the second call is served from the memo
    assert outcome(memoized) == outcome(inject(copy.deepcopy(pristine), config=fresh)) == outcome(again)
    assert pod == pristine
    assert fresh.memo.size() == 0


def test_the_memo_is_bounded() -> None:
    config = compile_config()
    for i in range(3000):  # every pod a new traffic setting and a new proxy setting
        pod = {
            "metadata": {
                "name": f"p{i}",
                "annotations": {
                    "traffic.sidecar.istio.io/excludeInboundPorts": str(1 + i),
                    "sidecar.istio.io/proxyImage": f"example/proxy:{i}",
                },
            },
            "spec": {"containers": [{"name": "app", "image": "nginx"}]},
        }
        assert inject(pod, config=config).allowed
    kinds = ("traffic", "templates", "fixed", "render", "status", "capture", "selectors", "revision")
    bound = sum(min(config.memo.limit, config.memo.KIND_LIMITS.get(k, config.memo.limit)) for k in kinds)
    assert config.memo.size() <= bound


def test_revision_configs_come_from_the_config_memo() -> None:
    config = compile_config()
    canary = config.for_revision("canary")
    assert canary.revision == "canary" and config.for_revision("canary") is canary
    assert config.for_revision(None) is config and config.for_revision("default") is config


def test_the_pod_group_is_exactly_its_declaration() -> None:
    group = context.pod_group(
        pod_name="p", namespace="ns", service_account="default", app_containers=[], pod_containers=[],
        app_probers=None,
        prometheus_annotations=None, workload_kind="Pod", workload_api="v1", workload_name="p",
        canonical_name="p", canonical_revision="latest",
    )
    assert tuple(group) == context.DECLARED["pod"]
    assert {f"{g}.{n}" for g, names in context.DECLARED.items() for n in names} == context.VARIABLES


def test_a_fixed_group_that_drifts_from_its_declaration_is_refused() -> None:
    with pytest.raises(RuntimeError, match="declaration"):
        context.FixedContext({"proxy": {"name": "x"}, "mesh": {}})


def test_templates_accept_only_declared_values() -> None:
    from injector.config import ConfigError

    with pytest.raises(ConfigError, match="unknown template value"):
        compile_config({"templates": {"x": "spec: {containers: [{name: a, image: '{{ proxy.nope }}'}]}"}})
