"""What an Istio user sees in an injected pod that the differential (tests/istio) found missing
or different: each test is one default or annotation of Istio's at the pinned release."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni import annotations as ann
from injector.config import compile_config
from injector.core import inject
from injector.result import Decision


def _pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"containers": [{"name": "app", "image": "x"}, {"name": "log", "image": "y"}]}
    body.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": dict(annotations or {})},
        "spec": body,
    }


def _inject(obj: dict[str, Any], **values: Any) -> dict[str, Any]:
    config = compile_config({"values": {"proxy": values}}) if values else None
    result = inject(obj, config=config, namespace_labels={"istio-injection": "enabled"})
    assert result.decision is Decision.INJECT, result.reasons
    return result.mutated


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"]["annotations"]


def test_kubectl_logs_and_exec_default_to_the_first_app_container() -> None:
    got = _annotations(_inject(_pod()))
    assert got["kubectl.kubernetes.io/default-logs-container"] == "app"
    assert got[ann.DEFAULT_CONTAINER] == "app"


def test_a_default_logs_container_the_user_chose_is_kept() -> None:
    got = _annotations(_inject(_pod({"kubectl.kubernetes.io/default-logs-container": "log"})))
    assert got["kubectl.kubernetes.io/default-logs-container"] == "log"
    assert got[ann.DEFAULT_CONTAINER] == "app"


def _overrides(obj: dict[str, Any]) -> Any:
    return json.loads(_annotations(obj)["proxy.istio.io/overrides"])


@pytest.mark.parametrize(("native", "where"), [("false", "containers"), ("true", "initContainers")])
def test_the_pods_own_istio_proxy_is_recorded_as_the_users_overrides(native: str, where: str) -> None:
    """The user's istio-proxy (``image: auto`` left out) is recorded where the proxy ended up,
    so what the user customised can be told from what the injector rendered."""
    own = {"name": "istio-proxy", "image": "auto", "env": [{"name": "EXTRA", "value": "1"}]}
    obj = _pod(containers=[{"name": "app", "image": "x"}, own])
    injected = _inject(obj, nativeSidecars=native)
    recorded = {"name": "istio-proxy", "env": [{"name": "EXTRA", "value": "1"}]}
    assert _overrides(injected) == {where: [recorded]}
    again = inject(injected, config=compile_config({"values": {"proxy": {"nativeSidecars": native}}}))
    assert _overrides(again.mutated) == _overrides(injected)  # re-injection keeps the record


def test_no_overrides_annotation_without_an_own_istio_proxy() -> None:
    assert "proxy.istio.io/overrides" not in _annotations(_inject(_pod()))


def _proxy(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "istio-proxy")


@pytest.mark.parametrize("hold", ["true", "false"])
def test_a_native_proxy_drains_when_the_pod_shuts_down(hold: str) -> None:
    """A native sidecar is stopped after the app containers: its preStop starts Envoy's drain
    on the pod's status port (holding the app back is the kubelet's job then, not postStart)."""
    obj = _pod({"status.sidecar.istio.io/port": "16000",
                "proxy.istio.io/config": f"holdApplicationUntilProxyStarts: {hold}"})
    lifecycle = _proxy(_inject(obj, nativeSidecars="true"))["lifecycle"]
    assert lifecycle == {"preStop": {"exec": {"command": [
        "pilot-agent", "request", "--debug-port=16000", "POST", "drain"]}}}


def test_a_classic_proxy_has_no_drain_hook() -> None:
    assert "lifecycle" not in _proxy(_inject(_pod(), nativeSidecars="false"))


def test_the_pull_policy_is_left_to_the_api_server_unless_configured() -> None:
    """As Istio's default: no imagePullPolicy, so a ``:latest`` proxy image is pulled Always."""
    for c in _added(_inject(_pod())):
        assert "imagePullPolicy" not in c, c["name"]
    for c in _added(_inject(_pod(), imagePullPolicy="Always")):
        assert c["imagePullPolicy"] == "Always", c["name"]


def _added(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers the injection added (proxy and capture init container)."""
    spec = obj["spec"]
    added = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"].startswith("istio-")]
    assert {c["name"] for c in added} == {"istio-proxy", "istio-validation"}
    return added


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env") or ()}


def test_a_bare_generate_name_pod_is_named_after_its_prefix() -> None:
    """(An intended difference: Istio names no workload here.)"""
    obj = _pod()
    obj["metadata"] = {"generateName": "batch-", "namespace": "ns"}
    injected = _inject(obj)
    assert _env(_proxy(injected))["ISTIO_META_WORKLOAD_NAME"] == "batch"
    assert injected["metadata"]["labels"]["service.istio.io/canonical-name"] == "batch"


def test_prometheus_scrapes_the_pods_own_status_port() -> None:
    """(An intended difference: Istio points the scrape at 15020, where nothing listens then.)"""
    got = _annotations(_inject(_pod({"status.sidecar.istio.io/port": "16000", "prometheus.io/port": "9090"})))
    assert got["prometheus.io/port"] == "16000"


def test_status_port_zero_gives_a_proxy_without_health_probes() -> None:
    proxy = _proxy(_inject(_pod({"status.sidecar.istio.io/port": "0"})))
    assert "startupProbe" not in proxy
    assert "readinessProbe" not in proxy
    assert "startupProbe" in _proxy(_inject(_pod()))


SIDECAR = {
    "name": "shipper", "image": "z", "restartPolicy": "Always",
    "readinessProbe": {"httpGet": {"path": "/ready", "port": 2020}},
    "livenessProbe": {"tcpSocket": {"port": 2020}},
    "startupProbe": {"tcpSocket": {"port": 2020}},
}


def _probe_ports(obj: dict[str, Any]) -> dict[str, Any]:
    shipper = next(c for c in obj["spec"]["initContainers"] if c["name"] == "shipper")
    probes = {k: v for k, v in shipper.items() if k.endswith("Probe")}
    return {k: (v.get("httpGet") or v.get("tcpSocket"))["port"] for k, v in probes.items()}


def test_a_users_native_sidecar_after_a_native_proxy_is_probed_through_the_agent() -> None:
    ports = _probe_ports(_inject(_pod(initContainers=[SIDECAR]), nativeSidecars="true"))
    assert ports == {"readinessProbe": 15020, "livenessProbe": 15020, "startupProbe": 15020}


@pytest.mark.parametrize(("native", "annotations"), [
    ("false", {}), ("true", {"sidecar.istio.io/init-containers-before-proxy": "shipper"})])
def test_a_users_native_sidecar_before_the_proxy_keeps_its_startup_probe(
        native: str, annotations: dict[str, str]) -> None:
    """Nothing after it starts until its startup probe passes, the proxy included: pointed at
    the agent, it would never pass. (An intended difference: Istio rewrites it.)"""
    ports = _probe_ports(_inject(_pod(annotations, initContainers=[SIDECAR]), nativeSidecars=native))
    assert ports == {"readinessProbe": 15020, "livenessProbe": 15020, "startupProbe": 2020}


def test_readiness_annotations_time_the_proxys_readiness_probe() -> None:
    obj = _pod({"readiness.status.sidecar.istio.io/initialDelaySeconds": "5",
                "readiness.status.sidecar.istio.io/periodSeconds": "30",
                "readiness.status.sidecar.istio.io/failureThreshold": "10"})
    probe = _proxy(_inject(obj))["readinessProbe"]
    assert (probe["initialDelaySeconds"], probe["periodSeconds"], probe["failureThreshold"]) == (5, 30, 10)
    default = _proxy(_inject(_pod()))["readinessProbe"]
    assert "initialDelaySeconds" not in default
    assert (default["periodSeconds"], default["failureThreshold"]) == (15, 4)


def test_agent_log_level_sets_pilot_agents_log_output() -> None:
    args = _proxy(_inject(_pod({"sidecar.istio.io/agentLogLevel": "default:debug,xds:warn"})))["args"]
    assert "--log_output_level=default:debug,xds:warn" in args
    assert "--log_output_level=default:info" in _proxy(_inject(_pod()))["args"]


def test_cap_net_bind_service_lets_the_proxy_bind_low_ports() -> None:
    """The proxy runs as root with NET_BIND_SERVICE, still in the proxy's group, which is what
    keeps its own traffic out of the redirect (the plugin exempts the group as well as the user)."""
    injected = _inject(_pod({"sidecar.istio.io/capNetBindService": "true"}))
    security = _proxy(injected)["securityContext"]
    assert security["capabilities"] == {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}
    assert (security["runAsUser"], security["runAsGroup"], security["runAsNonRoot"]) == (0, 1337, False)
    assert _annotations(injected)["traffic.mesh-injector.io/proxyGID"] == "1337"
    default = _proxy(_inject(_pod()))["securityContext"]
    assert default["capabilities"] == {"drop": ["ALL"]}
    assert (default["runAsUser"], default["runAsNonRoot"]) == (1337, True)


def test_bootstrap_override_mounts_the_configmap_and_points_the_agent_at_it() -> None:
    injected = _inject(_pod({"sidecar.istio.io/bootstrapOverride": "my-bootstrap"}))
    proxy = _proxy(injected)
    assert _env(proxy)["ISTIO_BOOTSTRAP_OVERRIDE"] == "/etc/istio/custom-bootstrap/custom_bootstrap.json"
    mount = {"mountPath": "/etc/istio/custom-bootstrap", "name": "custom-bootstrap-volume"}
    assert mount in proxy["volumeMounts"]
    volume = {"name": "custom-bootstrap-volume", "configMap": {"name": "my-bootstrap"}}
    assert volume in injected["spec"]["volumes"]
    plain = _inject(_pod())
    assert "ISTIO_BOOTSTRAP_OVERRIDE" not in _env(_proxy(plain))
    assert "custom-bootstrap-volume" not in {v["name"] for v in plain["spec"]["volumes"]}


def test_user_volumes_are_added_to_the_pod_and_mounted_into_the_proxy() -> None:
    injected = _inject(_pod({
        "sidecar.istio.io/userVolume": '{"certs": {"secret": {"secretName": "tls"}}, "b": {"emptyDir": {}}}',
        "sidecar.istio.io/userVolumeMount": '{"certs": {"mountPath": "/etc/certs", "readOnly": true}}',
    }))
    volumes = injected["spec"]["volumes"]
    assert volumes[-2:] == [{"name": "b", "emptyDir": {}},
                            {"name": "certs", "secret": {"secretName": "tls"}}]
    mount = {"name": "certs", "mountPath": "/etc/certs", "readOnly": True}
    assert _proxy(injected)["volumeMounts"][-1] == mount
    status = json.loads(_annotations(injected)[ann.STATUS])
    assert {"b", "certs"} <= set(status["volumes"])  # taken out again on re-injection
    again = inject(injected, namespace_labels={"istio-injection": "enabled"})
    assert again.mutated == injected and not again.patch


@pytest.mark.parametrize(("key", "value"), [
    *(("readiness.status.sidecar.istio.io/periodSeconds", v) for v in ("0", "-1", "ten", "86401", "٣")),
    ("sidecar.istio.io/agentLogLevel", "default:debug --other"),
    ("sidecar.istio.io/bootstrapOverride", "../Etc"),
    ("sidecar.istio.io/userVolume", "not json"),
    ("sidecar.istio.io/userVolume", '{"Bad_Name": {"emptyDir": {}}}'),
    ("sidecar.istio.io/userVolume", '{"istio-envoy": {"emptyDir": {}}}'),
    ("sidecar.istio.io/userVolumeMount", '{"x": {"readOnly": true}}'),
    ("sidecar.istio.io/userVolume", '{"x": {"emptyDir": {}}, "pad": "' + "a" * 70000 + '"}'),
])
def test_unusable_annotation_values_are_refused_naming_the_annotation(key: str, value: str) -> None:
    result = inject(_pod({key: value}), namespace_labels={"istio-injection": "enabled"})
    assert result.decision is Decision.REJECT
    assert key in result.reason.message


def test_the_scraped_annotations_come_before_the_probers_in_the_proxys_env() -> None:
    """Istio's order, so a $(VAR) reference or a diff against Istio's pod reads the same."""
    app = {"name": "app", "image": "x", "readinessProbe": {"httpGet": {"path": "/", "port": 80}}}
    obj = _pod({"prometheus.io/port": "9090"}, containers=[app])
    names = [e["name"] for e in _proxy(_inject(obj))["env"]]
    assert names[-2:] == ["ISTIO_PROMETHEUS_ANNOTATIONS", "ISTIO_KUBE_APP_PROBERS"]


def test_grpc_agent_readiness_and_hold_ask_the_agent_not_envoy() -> None:
    """Proxyless gRPC runs pilot-agent without Envoy, so nothing answers on 15021: readiness,
    the declared port and the hold command must use the agent's status server (15020), or the
    pod never turns Ready and a held app never starts."""
    obj = _pod({"inject.istio.io/templates": "grpc-agent",
                "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"})
    proxy = next(c for c in _inject(obj)["spec"]["containers"] if c["name"] == "istio-proxy")
    assert proxy["readinessProbe"]["httpGet"]["port"] == 15020
    assert {"containerPort": 15020, "name": "mesh-metrics", "protocol": "TCP"} in proxy["ports"]
    assert "--url=http://localhost:15020/healthz/ready" in proxy["lifecycle"]["postStart"]["exec"]["command"]
    assert "ISTIO_META_NODE_NAME" in {e["name"] for e in proxy["env"]}


def test_a_users_own_proxy_env_keeps_the_users_order() -> None:
    """A variable the user adds to istio-proxy goes before the next one the user also overrides
    (Istio's strategic merge), so ``$(EXTRA)`` in the user's CLUSTER_ID resolves: the kubelet
    expands only variables defined earlier in the list."""
    own = {"name": "istio-proxy", "image": "auto", "env": [
        {"name": "EXTRA", "value": "east"}, {"name": "ISTIO_META_CLUSTER_ID", "value": "$(EXTRA)"}]}
    env = [e["name"] for e in _proxy(_inject(_pod(containers=[{"name": "app", "image": "x"}, own])))["env"]]
    assert env.index("EXTRA") == env.index("ISTIO_META_CLUSTER_ID") - 1
    assert env.index("EXTRA") < env.index("TRUST_DOMAIN")  # not appended after ours
    assert len(env) == len(set(env))


def _workload(meta: dict[str, Any]) -> tuple[str, str]:
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "ns", **meta},
           "spec": {"containers": [{"name": "app", "image": "x"}]}}
    env = {e["name"]: e.get("value") for e in _proxy(_inject(obj))["env"]}
    return env["ISTIO_META_WORKLOAD_NAME"], env["ISTIO_META_OWNER"]


def _owned(kind: str, name: str, api: str = "apps/v1") -> list[dict[str, Any]]:
    return [{"apiVersion": api, "kind": kind, "name": name, "uid": "u", "controller": True}]


@pytest.mark.parametrize(("meta", "want"), [
    ({"name": "db-0", "ownerReferences": _owned("StatefulSet", "db")},
     ("db-0", "kubernetes://apis/v1/namespaces/ns/pods/db-0")),
    ({"generateName": "backup-29412345-", "ownerReferences": _owned("Job", "backup-29412345", "batch/v1")},
     ("backup", "kubernetes://apis/batch/v1/namespaces/ns/cronjobs/backup")),
    ({"generateName": "once-12-", "ownerReferences": _owned("Job", "once-12", "batch/v1")},
     ("once-12", "kubernetes://apis/batch/v1/namespaces/ns/jobs/once-12")),
    ({"generateName": "web-5d8f-", "labels": {"rollouts-pod-template-hash": "5d8f"},
      "ownerReferences": _owned("ReplicaSet", "web-5d8f")},
     ("web", "kubernetes://apis/v1alpha1/namespaces/ns/rollouts/web")),
])
def test_a_pods_workload_is_resolved_as_istios_webhook_resolves_it(
        meta: dict[str, Any], want: tuple[str, str]) -> None:
    """Telemetry and dashboards built on Istio's workload names keep working: a named pod
    (a StatefulSet's) is its own workload; a Job named after a CronJob's schedule is the CronJob."""
    assert _workload(meta) == want
