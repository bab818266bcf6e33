"""The envoy template's static bootstrap is valid against Envoy's API schema (typed protobuf messages)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import yaml

from injector.core import inject
from injector.envoy_bootstrap import bootstrap_json, build_bootstrap

pytest.importorskip("envoy_data_plane")
with warnings.catch_warnings():  # the generated models trip pydantic deprecation warnings on import
    warnings.simplefilter("ignore", DeprecationWarning)
    # Typed configs inside google.protobuf.Any resolve through these modules' registrations.
    import envoy_data_plane.envoy.extensions.filters.http.router.v3
    import envoy_data_plane.envoy.extensions.filters.listener.original_dst.v3
    import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3
    import envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3  # noqa: F401
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _camel_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k if k.startswith("@") else _camel(k)): _camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_keys(v) for v in value]
    return value


def _bootstrap_from_injected_pod() -> dict[str, Any]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n",
           "annotations": {"inject.istio.io/templates": "envoy"}},
           "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
    result = inject(pod)
    proxy = next(c for c in result.mutated["spec"]["containers"] if c["name"] == "istio-proxy")
    args = proxy["args"]
    return yaml.safe_load(args[args.index("--config-yaml") + 1])


def test_bootstrap_parses_strictly_and_loses_nothing() -> None:
    """Unknown fields raise; a round trip that drops or changes a field fails the comparison."""
    message = Bootstrap.from_json(bootstrap_json())
    assert message.to_dict() == _camel_keys(build_bootstrap())


def test_the_pod_carries_the_same_valid_bootstrap() -> None:
    from_pod = _bootstrap_from_injected_pod()
    assert from_pod == build_bootstrap()
    Bootstrap.from_dict(_camel_keys(from_pod))


def test_a_typo_in_a_bootstrap_field_is_caught_by_the_schema() -> None:
    broken = json.loads(bootstrap_json())
    broken["static_resources"]["clusters"][0]["lb_polcy"] = "CLUSTER_PROVIDED"
    with pytest.raises(Exception, match=r"lb_polcy|lbPolcy"):
        Bootstrap.from_json(json.dumps(broken))


def test_capture_listeners_forward_to_the_original_destination() -> None:
    boot = build_bootstrap()
    listeners = {item["name"]: item for item in boot["static_resources"]["listeners"]}
    clusters = {item["name"]: item for item in boot["static_resources"]["clusters"]}
    for name, port, cluster in (("virtualOutbound", 15001, "PassthroughCluster"),
                                ("virtualInbound", 15006, "InboundPassthroughCluster")):
        listener = listeners[name]
        assert listener["address"]["socket_address"]["port_value"] == port
        assert listener["listener_filters"][0]["name"] == "envoy.filters.listener.original_dst"
        proxy = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert proxy["cluster"] == cluster
        assert clusters[cluster]["type"] == "ORIGINAL_DST"
    bind = clusters["InboundPassthroughCluster"]["upstream_bind_config"]["source_address"]
    assert bind["address"] == "127.0.0.6"
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
