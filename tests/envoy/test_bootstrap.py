"""Every bootstrap the envoy template can produce passes the real Envoy's validation."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from injector.config import compile_config
from injector.core import inject
from injector.envoy_bootstrap import BLACKHOLE_PORTS, BootstrapSettings, bootstrap_json, build_bootstrap
from injector.result import Decision
from proxyagent import settings as ps
from proxyagent.agent import AgentError, PodSettings, apply_pod_layer
from tests.envoy.envoyenv import validate


def _pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "namespace": "n",
            "annotations": {"inject.istio.io/templates": "envoy", **(annotations or {})},
        },
        "spec": {
            "containers": [{"name": "app", "image": "nginx", "readinessProbe": {"tcpSocket": {"port": 8080}}}]
        },
    }


def _proxy(result: Any) -> dict[str, Any]:
    return next(c for c in result.mutated["spec"]["containers"] if c["name"] == "istio-proxy")


def _bootstrap_of(proxy: dict[str, Any]) -> dict[str, Any]:
    args = proxy["args"]
    return yaml.safe_load(args[args.index("--config-yaml") + 1])


def test_the_default_bootstrap_is_valid_for_envoy() -> None:
    done = validate(bootstrap_json())
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    "settings",
    [BootstrapSettings(access_log=False), BootstrapSettings(max_connections=1, status_max_connections=1)],
)
def test_bootstraps_from_other_settings_are_valid(settings: BootstrapSettings) -> None:
    done = validate(build_bootstrap(settings))
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_bootstrap_the_agent_runs_with_pod_overrides_is_valid() -> None:
    pod = PodSettings(
        {
            "PROXY_CONFIG": json.dumps(
                {
                    "terminationDrainDuration": "7s",
                    "proxyMetadata": {ps.ENV_ACCESS_LOG: "false", ps.ENV_MAX_CONNECTIONS: "50"},
                }
            )
        }
    )
    assert pod.drain_seconds == 7
    boot = apply_pod_layer(build_bootstrap(), pod.runtime)
    layer = next(x for x in boot["layered_runtime"]["layers"] if x["name"] == ps.POD_LAYER)
    assert layer["static_layer"][ps.ACCESS_LOG_KEY] == 0
    assert layer["static_layer"][ps.connection_limit_key(ps.INBOUND_LISTENER)] == 50
    done = validate(boot)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    "env, limit",
    [
        ({ps.ENV_MAX_CONNECTIONS: "0"}, ps.ENV_MAX_CONNECTIONS),
        ({ps.ENV_MAX_CONNECTIONS: "²"}, ps.ENV_MAX_CONNECTIONS),
        ({ps.ENV_MAX_CONNECTIONS: str(ps.MAX_CONNECTIONS_LIMIT + 1)}, ps.ENV_MAX_CONNECTIONS),
        ({ps.ENV_ACCESS_LOG: "maybe"}, ps.ENV_ACCESS_LOG),
        ({"PROXY_CONFIG": '{"terminationDrainDuration": "9999h"}'}, "terminationDrainDuration"),
        ({"PROXY_CONFIG": '{"concurrency": 1000}'}, "concurrency"),
        ({"PROXY_CONFIG": "[1]"}, "PROXY_CONFIG"),
    ],
)
def test_bad_pod_settings_are_refused_naming_the_setting(env: dict[str, str], limit: str) -> None:
    with pytest.raises(AgentError, match=limit):
        PodSettings(env)


def test_envoy_rejects_a_misspelt_field_so_validation_means_something() -> None:
    broken = copy.deepcopy(build_bootstrap())
    broken["static_resources"]["clusters"][0]["lb_polcy"] = "CLUSTER_PROVIDED"
    done = validate(broken)
    assert done.returncode != 0 and "lb_polcy" in done.stderr


def test_the_injected_pod_carries_the_default_bootstrap_and_runs_the_agent() -> None:
    proxy = _proxy(inject(_pod()))
    assert proxy["command"] == ["mesh-proxy-agent"]
    assert _bootstrap_of(proxy) == build_bootstrap()
    assert proxy["image"] == compile_config({}).model.values.proxy.envoy_image


def test_probes_are_rewritten_to_the_agent_for_the_envoy_template() -> None:
    result = inject(_pod())
    app = result.mutated["spec"]["containers"][0]
    assert app["readinessProbe"]["httpGet"] == {
        "path": "/app-health/app/readyz",
        "port": 15020,
        "scheme": "HTTP",
    }
    env = {e["name"]: e.get("value") for e in _proxy(result)["env"]}
    assert json.loads(env["ISTIO_KUBE_APP_PROBERS"]) == {
        "/app-health/app/readyz": {"tcpSocket": {"port": 8080}}
    }


def test_hold_waits_for_readiness_through_the_agent() -> None:
    result = inject(_pod({"proxy.istio.io/config": '{"holdApplicationUntilProxyStarts": true}'}))
    proxy = _proxy(result)
    assert proxy["lifecycle"]["postStart"]["exec"]["command"] == ["mesh-proxy-agent", "wait"]
    # The hook already waited for Envoy: a startupProbe would only add its next period (and the
    # kubelet's next relist) before the proxy's readiness counts.
    assert "startupProbe" not in proxy
    assert result.mutated["spec"]["containers"][0] is proxy  # first: the app waits for the hook


def test_without_hold_the_proxy_keeps_its_startup_probe() -> None:
    proxy = _proxy(inject(_pod()))
    assert "lifecycle" not in proxy
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"}
    assert proxy["startupProbe"]["periodSeconds"] == 1


@pytest.mark.parametrize("hold", [None, "true", "false"])
def test_a_native_proxy_holds_the_app_with_post_start_not_a_startup_probe(hold: str | None) -> None:
    """The kubelet starts the app in the sync after a native sidecar's postStart returned, but
    only at the startupProbe's next period (then its next relist) after Envoy turned ready."""
    annotations = {"sidecar.istio.io/nativeSidecar": "true"}
    if hold is not None:  # a native proxy always holds the app, as in Istio
        annotations["proxy.istio.io/config"] = f'{{"holdApplicationUntilProxyStarts": {hold}}}'
    spec = inject(_pod(annotations)).mutated["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["istio-validation", "istio-proxy"]
    proxy = spec["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["lifecycle"] == {"postStart": {"exec": {"command": ["mesh-proxy-agent", "wait"]}}}
    assert "startupProbe" not in proxy
    assert proxy["readinessProbe"]["httpGet"]["port"] == 15021


def test_the_sidecar_templates_native_proxy_keeps_istios_startup_probe() -> None:
    pod = _pod({"sidecar.istio.io/nativeSidecar": "true"})
    del pod["metadata"]["annotations"]["inject.istio.io/templates"]
    proxy = inject(pod).mutated["spec"]["initContainers"][-1]
    assert proxy["name"] == "istio-proxy" and proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"]["port"] == 15021
    assert "postStart" not in (proxy.get("lifecycle") or {})


@pytest.mark.parametrize("source", ["annotation", "config"])
def test_capture_dns_is_rejected_with_the_envoy_template(source: str) -> None:
    if source == "annotation":
        result = inject(_pod({"traffic.mesh-injector.io/captureDNS": "true"}))
    else:
        result = inject(_pod(), config=compile_config({"values": {"proxy": {"captureDNS": True}}}))
    assert result.decision == Decision.REJECT
    assert "traffic.mesh-injector.io/captureDNS" in result.reason.message
    assert "no DNS proxy" in result.reason.message


def test_capture_dns_stays_allowed_with_the_sidecar_template() -> None:
    pod = _pod({"traffic.mesh-injector.io/captureDNS": "true"})
    del pod["metadata"]["annotations"]["inject.istio.io/templates"]
    assert inject(pod).decision == Decision.INJECT


def test_every_capture_and_status_listener_is_dual_stack() -> None:
    for listener in build_bootstrap()["static_resources"]["listeners"]:
        addresses = [listener["address"]] + [a["address"] for a in listener.get("additional_addresses", ())]
        assert {a["socket_address"]["address"] for a in addresses} == {"0.0.0.0", "::"}, listener["name"]


def test_capture_ports_and_admin_are_blackholed_on_both_capture_listeners() -> None:
    listeners = {x["name"]: x for x in build_bootstrap()["static_resources"]["listeners"]}
    for name in (ps.OUTBOUND_LISTENER, ps.INBOUND_LISTENER):
        ports = {c["filter_chain_match"].get("destination_port") for c in listeners[name]["filter_chains"]}
        assert set(BLACKHOLE_PORTS) <= ports
        assert {15000, 15001, 15006} <= set(BLACKHOLE_PORTS)


def test_access_logs_can_be_turned_off_for_every_pod_in_the_config() -> None:
    config = compile_config({"values": {"proxy": {"envoyAccessLog": False}}})
    boot = _bootstrap_of(_proxy(inject(_pod(), config=config)))
    assert boot == build_bootstrap(BootstrapSettings(access_log=False))
    defaults = boot["layered_runtime"]["layers"][0]["static_layer"]
    assert defaults[ps.ACCESS_LOG_KEY] == 0
    assert validate(boot).returncode == 0
