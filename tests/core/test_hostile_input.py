"""Hostile annotations (issue 11): every bad value is a rejection naming the annotation and the
limit, never an exception or an unbounded result."""

from __future__ import annotations

from typing import Any

import pytest

from cni import annotations as ann
from injector.config import ConfigError, compile_config
from injector.core import inject
from injector.result import Decision, ReasonCode


def pod(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    containers = [{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}]}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
        "spec": {"containers": containers, **spec},
    }


@pytest.mark.parametrize("digits", ["8\u00b2", "\u0668\u0660", "\u06f8\u06f0", "\uff18\uff10", "\u00b9"])
@pytest.mark.parametrize(
    "key",
    [ann.EXCLUDE_INBOUND_PORTS, ann.INCLUDE_INBOUND_PORTS, ann.EXCLUDE_OUTBOUND_PORTS, ann.STATUS_PORT,
     ann.PROXY_UID, ann.PROXY_GID],
)
def test_numbers_that_are_not_ascii_digits_are_refused_naming_the_annotation(key: str, digits: str) -> None:
    result = inject(pod({key: digits}))
    assert result.decision is Decision.REJECT
    assert result.reason.code is ReasonCode.INVALID_TRAFFIC_ANNOTATION
    assert key in result.reason.message and result.patch == []


def test_a_cidr_prefix_in_arabic_indic_digits_is_refused() -> None:
    result = inject(pod({ann.EXCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/\u0668"}))
    assert result.reason.code is ReasonCode.INVALID_TRAFFIC_ANNOTATION
    assert ann.EXCLUDE_OUTBOUND_IP_RANGES in result.reason.message


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9)
)


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (ALIAS_BOMB, "aliases"),
        ("[" * 40 + "]" * 40, "max_depth"),
        ("concurrency: 2\n" + "# padding\n" * 8000, "max_bytes"),
    ],
)
def test_proxy_config_yaml_is_bounded(value: str, limit: str) -> None:
    result = inject(pod({ann.PROXY_CONFIG: value}))
    assert result.decision is Decision.REJECT and not result.allowed
    assert result.reason.code is ReasonCode.INVALID_ANNOTATION
    assert ann.PROXY_CONFIG in result.reason.message and limit in result.reason.message
    assert result.patch == []


def test_proxy_config_limits_are_config_values() -> None:
    config = compile_config({"limits": {"proxyConfigMaxBytes": 10}})
    result = inject(pod({ann.PROXY_CONFIG: "concurrency: 2"}), config=config)
    assert result.reason.code is ReasonCode.INVALID_ANNOTATION and "max_bytes" in result.reason.message
    assert config.config_hash == compile_config().config_hash  # limits do not make pods stale


@pytest.mark.parametrize(
    ("key", "item", "limit"),
    [
        (ann.EXCLUDE_OUTBOUND_IP_RANGES, "10.{a}.{b}.0/24", ann.MAX_CIDRS),
        (ann.INCLUDE_OUTBOUND_IP_RANGES, "10.{a}.{b}.0/24", ann.MAX_CIDRS),
        (ann.EXCLUDE_INBOUND_PORTS, "{p}", ann.MAX_PORTS),
        (ann.EXCLUDE_INTERFACES, "eth{i}", ann.MAX_INTERFACES),
    ],
)
def test_list_annotations_above_the_shared_limit_are_refused(key: str, item: str, limit: int) -> None:
    def value(n: int) -> str:
        return ",".join(item.format(i=i, a=i // 256, b=i % 256, p=1000 + i) for i in range(n))

    assert inject(pod({key: value(limit)})).decision is Decision.INJECT
    for count in (limit + 1, 10_000):
        result = inject(pod({key: value(count)}))
        assert result.reason.code is ReasonCode.INVALID_TRAFFIC_ANNOTATION
        assert key in result.reason.message and f"{count} " in result.reason.message
        assert f"limit of {limit}" in result.reason.message
        assert len(result.reason.message) < 400  # the message does not echo 10,000 items


def test_the_patch_is_bounded() -> None:
    config = compile_config({"limits": {"maxPatchBytes": 4096}})
    result = inject(pod({}), config=config)
    assert result.decision is Decision.REJECT and result.patch == []
    assert result.reason.code is ReasonCode.PATCH_TOO_LARGE
    assert "maxPatchBytes" in result.reason.message and "4096" in result.reason.message
    admitted = inject(pod({}))
    assert admitted.patch_json is not None and len(admitted.patch_json) <= 1024 * 1024


def test_config_errors_use_the_names_users_write() -> None:
    with pytest.raises(ConfigError) as caught:
        compile_config({"values": {"proxy": {"statusPort": "x"}}, "bogus": 1})
    message = str(caught.value)
    assert "values.proxy.statusPort" in message and "bogus: unknown key" in message
    for internal in ("ConfigModel", "type=", "pydantic", "status_port"):
        assert internal not in message


DEEP = "[" * 200_000  # far deeper than the JSON parser's recursion


def test_a_deeply_nested_overrides_record_is_read_as_no_record() -> None:
    """proxy.istio.io/overrides (read back on re-injection) nested past the parser's recursion:
    injected as without the record, not an exception out of the core."""
    result = inject(pod({"proxy.istio.io/overrides": DEEP}))
    assert result.decision is Decision.INJECT


def test_a_deeply_nested_app_probers_value_in_an_earlier_proxy_is_ignored() -> None:
    """Re-injection reads ISTIO_KUBE_APP_PROBERS back from the pod's istio-proxy: nested past the
    parser's recursion it counts as absent (the pod is re-injected), not an exception."""
    again = pod({"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'})
    again["spec"]["containers"].append(
        {"name": "istio-proxy", "image": "proxy", "env": [{"name": "ISTIO_KUBE_APP_PROBERS", "value": DEEP}]})
    result = inject(again)
    assert result.decision is Decision.INJECT


def test_a_deeply_nested_saved_prometheus_value_in_an_earlier_proxy_is_ignored() -> None:
    """Re-injection undoes the earlier Prometheus merge from ISTIO_PROMETHEUS_ANNOTATIONS in the
    pod's istio-proxy: nested past the parser's recursion it counts as absent (the app's own
    scrape annotations are not restored), not an exception out of the core."""
    again = pod({"sidecar.istio.io/status": '{"containers":["istio-proxy"]}',
                 "prometheus.io/scrape": "true", "prometheus.io/port": "15020",
                 "prometheus.io/path": "/stats/prometheus"})
    again["spec"]["containers"].append(
        {"name": "istio-proxy", "image": "proxy",
         "env": [{"name": "ISTIO_PROMETHEUS_ANNOTATIONS", "value": DEEP}]})
    result = inject(again)
    assert result.decision is Decision.INJECT
    annotations = result.mutated["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "15020"  # merged again, nothing of the saved value
