"""Istio's built-in templates besides ``sidecar``, chosen with ``inject.istio.io/templates``:
what a user of a gateway or of proxyless gRPC sees in the injected pod."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni import annotations as ann
from injector.config import compile_config
from injector.core import inject
from injector.result import Decision


def _pod(template: str, containers: list[dict[str, Any]], **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "annotations": {ann.TEMPLATES: template, **annotations},
        },
        "spec": {"containers": containers},
    }


def _injected(obj: dict[str, Any], **values: Any) -> dict[str, Any]:
    config = compile_config({"values": {"proxy": values}}) if values else None
    result = inject(obj, config=config, namespace_labels={"istio-injection": "enabled"})
    assert result.decision is Decision.INJECT, result.reasons
    return result.mutated


def _by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in items}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env") or ()}


GATEWAY_PROXY = {
    "name": "istio-proxy",
    "image": "auto",
    "ports": [{"containerPort": 8443, "name": "https"}],
    "resources": {"limits": {"cpu": "1"}},
    "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 2},
}


@pytest.mark.parametrize("capture", ["cni", "init"])
@pytest.mark.parametrize("native", ["true", "false"])
def test_a_gateway_pod_gets_the_proxy_as_its_own_container(capture: str, native: str) -> None:
    out = _injected(_pod("gateway", [GATEWAY_PROXY]), capture=capture, nativeSidecars=native)
    spec = out["spec"]
    assert [c["name"] for c in spec["containers"]] == ["istio-proxy"]
    assert "initContainers" not in spec  # no capture, no validation, never a native sidecar
    proxy = spec["containers"][0]
    assert proxy["image"] == compile_config().model.values.proxy.image  # "auto" filled in
    assert proxy["args"][:2] == ["proxy", "router"]
    assert {"containerPort": 8443, "name": "https"} in proxy["ports"]  # the gateway's own
    assert proxy["resources"] == {"limits": {"cpu": "1"}}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}  # not rewritten
    assert proxy["readinessProbe"]["periodSeconds"] == 2
    annotations = out["metadata"]["annotations"]
    assert not ann.redirect_decision(annotations).redirect  # the plugin leaves a gateway's traffic alone
    assert ann.INTERCEPTION_MODE not in annotations
    assert annotations["istio.io/rev"] == "default" and "istio.io/rev" not in out["metadata"]["labels"]
    assert "security.istio.io/tlsMode" not in out["metadata"]["labels"]
    # As Istio's gateway: pilot-agent learns the listeners it declares, runs as the proxy user
    # and may bind ports below 1024 without privileges.
    assert json.loads(_env(proxy)["ISTIO_META_POD_PORTS"]) == [{"containerPort": 8443, "name": "https"}]
    assert {"runAsUser": 1337, "runAsGroup": 1337}.items() <= proxy["securityContext"].items()
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in spec["securityContext"]["sysctls"]
    assert {"GOMAXPROCS", "GOMEMLIMIT", "ISTIO_CPU_LIMIT", "ISTIO_META_NODE_NAME"} <= set(_env(proxy))


def test_a_reinjected_gateway_keeps_its_own_ports_in_the_pod_ports() -> None:
    once = _injected(_pod("gateway", [GATEWAY_PROXY]))
    result = inject(once, namespace_labels={"istio-injection": "enabled"})
    assert result.decision is Decision.INJECT and result.patch == []


def test_grpc_agent_points_every_app_container_at_the_agent() -> None:
    app = {
        "name": "app",
        "image": "example/app",
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
        "env": [{"name": "KEEP", "value": "1"}],
    }
    out = _injected(_pod("grpc-agent", [app, {"name": "second", "image": "example/b"}]))
    spec = out["spec"]
    containers = _by_name(spec["containers"])
    proxy = containers.pop("istio-proxy")
    assert "initContainers" not in spec  # proxyless: no capture
    assert _env(proxy)["DISABLE_ENVOY"] == "true" and _env(proxy)["ISTIO_META_GENERATOR"] == "grpc"
    xds_dir = next(m["mountPath"] for m in proxy["volumeMounts"] if m["name"] == "istio-xds")
    for container in containers.values():
        env = _env(container)
        assert env["GRPC_XDS_BOOTSTRAP"].startswith(xds_dir + "/")
        assert env["GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT"] == "true"
        assert {"mountPath": xds_dir, "name": "istio-xds"} in container["volumeMounts"]
    assert _env(containers["app"])["KEEP"] == "1"
    assert containers["app"]["readinessProbe"] == app["readinessProbe"]  # not rewritten
    assert out["metadata"]["annotations"][ann.REWRITE_PROBES] == "false"
    assert not ann.redirect_decision(out["metadata"]["annotations"]).redirect


def test_grpc_agent_holds_the_app_until_the_agent_is_ready() -> None:
    out = _injected(_pod("grpc-agent", [{"name": "app", "image": "x"}]), holdApplicationUntilProxyStarts=True)
    first = out["spec"]["containers"][0]
    assert first["name"] == "istio-proxy"
    # The agent's own status server: without Envoy nothing listens on 15021, `wait`'s default.
    assert first["lifecycle"]["postStart"]["exec"]["command"] == [
        "pilot-agent", "wait", "--url=http://localhost:15020/healthz/ready"]


def test_grpc_agent_waits_for_the_agent_after_starting_it_even_without_hold() -> None:
    """As Istio's grpc-agent: the postStart wait is always there; without hold the proxy comes
    after the app containers, so it holds nothing back."""
    out = _injected(_pod("grpc-agent", [{"name": "app", "image": "x"}]))
    assert [c["name"] for c in out["spec"]["containers"]] == ["app", "istio-proxy"]
    proxy = out["spec"]["containers"][1]
    assert proxy["lifecycle"]["postStart"]["exec"]["command"] == [
        "pilot-agent", "wait", "--url=http://localhost:15020/healthz/ready"]
    annotations = out["metadata"]["annotations"]
    assert annotations["istio.io/rev"] == "default" and "istio.io/rev" not in out["metadata"]["labels"]
    assert annotations["sidecar.istio.io/status"].count('"app"') == 0  # the app is not ours to take out


def test_grpc_simple_writes_a_bootstrap_the_app_reads_and_adds_no_proxy() -> None:
    out = _injected(
        _pod("grpc-simple", [{"name": "app", "image": "x", "livenessProbe": {"tcpSocket": {"port": 1}}}])
    )
    spec = out["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert [c["name"] for c in spec["initContainers"]] == ["grpc-bootstrap-init"]
    init, app = spec["initContainers"][0], spec["containers"][0]
    bootstrap = _env(app)["GRPC_XDS_BOOTSTRAP"]
    assert bootstrap in init["command"][-1]  # the init container writes the file the app reads
    shared = {m["name"] for m in init["volumeMounts"]} & {m["name"] for m in app["volumeMounts"]}
    assert shared == {"grpc-io-proxyless-bootstrap"}
    assert _env(init)["XDS_ADDRESS"] == "istiod.istio-system.svc:15010"  # istiod's plaintext xDS
    assert app["livenessProbe"] == {"tcpSocket": {"port": 1}}
    annotations = out["metadata"]["annotations"]
    assert ann.PROM_PORT not in annotations  # no agent to serve merged metrics
    assert annotations[ann.REWRITE_PROBES] == "false"
    assert ann.DEFAULT_CONTAINER not in annotations  # nothing added for kubectl to skip
    assert not ann.redirect_decision(annotations).redirect


@pytest.mark.parametrize("template", ["gateway", "grpc-agent", "grpc-simple"])
def test_each_builtin_template_is_listed_when_a_name_is_unknown(template: str) -> None:
    result = inject(
        _pod("nonexistent", [{"name": "a", "image": "x"}]), namespace_labels={"istio-injection": "enabled"}
    )
    assert result.decision is Decision.REJECT
    assert template in result.reasons[0].message


def test_a_template_without_a_proxy_keeps_the_pods_own_istio_proxy_container() -> None:
    own = {"name": "istio-proxy", "image": "example/own-proxy:1"}
    out = _injected(_pod("grpc-simple", [{"name": "app", "image": "x"}, own]))
    kept = _by_name(out["spec"]["containers"])["istio-proxy"]
    assert kept["image"] == "example/own-proxy:1"


def test_grpc_agent_lets_the_app_read_the_agents_certificates_unless_the_pod_chose_a_group() -> None:
    plain = _injected(_pod("grpc-agent", [{"name": "app", "image": "x"}]))
    assert plain["spec"]["securityContext"] == {"fsGroup": 1337}
    own = _pod("grpc-agent", [{"name": "app", "image": "x"}])
    own["spec"]["securityContext"] = {"fsGroup": 2000, "runAsNonRoot": True}
    assert _injected(own)["spec"]["securityContext"] == {"fsGroup": 2000, "runAsNonRoot": True}
