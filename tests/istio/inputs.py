"""Inputs for the differential: the golden inputs, one object of every workload kind, and
hypothesis-generated pods over the annotations, probes and fields injection reads."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

APP_POD: dict[str, Any] = {
    "metadata": {"name": "web", "labels": {"app": "web", "version": "v1"}},
    "spec": {"containers": [{
        "name": "web", "image": "nginx:1.27",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
        "livenessProbe": {"tcpSocket": {"port": 8080}},
    }]},
}


def golden_inputs() -> list[tuple[str, dict[str, Any]]]:
    """Every golden input (tests/golden/<case>.yaml), by case name."""
    out = []
    for path in sorted(GOLDEN.glob("*.yaml")):
        if path.name == "cases.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                out.append((path.stem, doc))
    return out


def workload_kinds() -> list[tuple[str, dict[str, Any]]]:
    """The same pod as a Pod and as the pod template of every workload kind Istio injects."""
    pod = copy.deepcopy(APP_POD)
    template = {"metadata": pod["metadata"], "spec": pod["spec"]}
    selector = {"matchLabels": {"app": "web"}}
    kinds: list[tuple[str, str, dict[str, Any]]] = [
        ("apps/v1", "Deployment", {"selector": selector, "template": template}),
        ("apps/v1", "StatefulSet", {"selector": selector, "serviceName": "web", "template": template}),
        ("apps/v1", "DaemonSet", {"selector": selector, "template": template}),
        ("apps/v1", "ReplicaSet", {"selector": selector, "template": template}),
        ("v1", "ReplicationController", {"selector": {"app": "web"}, "template": template}),
        ("batch/v1", "Job", {"template": {
            **template, "spec": {**template["spec"], "restartPolicy": "Never"}}}),
        ("batch/v1", "CronJob", {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": {
            **template, "spec": {**template["spec"], "restartPolicy": "OnFailure"}}}}}),
    ]
    out = [("Pod", {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(pod)})]
    for api, kind, spec in kinds:
        out.append((kind, {"apiVersion": api, "kind": kind,
                           "metadata": {"name": "web", "namespace": "shop"}, "spec": copy.deepcopy(spec)}))
    return out


# --- hypothesis ---------------------------------------------------------------------------------

PORT_NAMES = ("http", "grpc", "metrics", "admin")
#: Annotation -> the values worth trying (valid, edge and a few Istio accepts that we may not).
ANNOTATIONS: dict[str, tuple[str, ...]] = {
    "sidecar.istio.io/inject": ("true", "false"),
    "sidecar.istio.io/proxyCPU": ("50m", "1"),
    "sidecar.istio.io/proxyMemory": ("64Mi", "1Gi"),
    "sidecar.istio.io/proxyCPULimit": ("500m", "2"),
    "sidecar.istio.io/proxyMemoryLimit": ("256Mi", "2Gi"),
    "sidecar.istio.io/proxyImage": ("docker.io/istio/proxyv2:1.29.0", "example.com/mesh/proxy:7"),
    "sidecar.istio.io/logLevel": ("debug", "info", "error"),
    "sidecar.istio.io/componentLogLevel": ("misc:info", "upstream:debug"),
    "sidecar.istio.io/agentLogLevel": ("default:debug",),
    "sidecar.istio.io/rewriteAppHTTPProbers": ("true", "false"),
    "sidecar.istio.io/nativeSidecar": ("true", "false"),
    "sidecar.istio.io/interceptionMode": ("REDIRECT", "NONE"),
    "sidecar.istio.io/statsInclusionPrefixes": ("cluster.outbound",),
    "sidecar.istio.io/userVolume": ('{"extra":{"emptyDir":{}}}',),
    "sidecar.istio.io/userVolumeMount": ('{"extra":{"mountPath":"/extra"}}',),
    "sidecar.istio.io/bootstrapOverride": ("custom-bootstrap",),
    "sidecar.istio.io/capNetBindService": ("true",),
    "proxy.istio.io/config": ("holdApplicationUntilProxyStarts: true", "concurrency: 2",
                              '{"holdApplicationUntilProxyStarts": false}'),
    "traffic.sidecar.istio.io/includeOutboundIPRanges": ("*", "10.0.0.0/8", ""),
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": ("192.168.0.0/16",),
    "traffic.sidecar.istio.io/includeInboundPorts": ("*", "8080", ""),
    "traffic.sidecar.istio.io/excludeInboundPorts": ("9090", "9090,9091"),
    "traffic.sidecar.istio.io/includeOutboundPorts": ("443",),
    "traffic.sidecar.istio.io/excludeOutboundPorts": ("5432",),
    "traffic.sidecar.istio.io/excludeInterfaces": ("eth1",),
    "traffic.sidecar.istio.io/kubevirtInterfaces": ("net1",),
    "status.sidecar.istio.io/port": ("15020", "16000", "0"),
    "readiness.status.sidecar.istio.io/periodSeconds": ("30",),
    "inject.istio.io/templates": ("sidecar",),
    "prometheus.io/scrape": ("true", "false"),
    "prometheus.io/port": ("9090",),
    "kubectl.kubernetes.io/default-container": ("web",),
}
LABELS: dict[str, tuple[str, ...]] = {
    "app": ("web", "api"),
    "version": ("v1", "v2"),
    "app.kubernetes.io/name": ("shop",),
    "app.kubernetes.io/version": ("1.0",),
    "service.istio.io/canonical-name": ("canon",),
    "sidecar.istio.io/inject": ("true", "false"),
    "security.istio.io/tlsMode": ("disabled",),
}


@st.composite
def _probe(draw: st.DrawFn, ports: list[dict[str, Any]]) -> dict[str, Any]:
    names = [p["name"] for p in ports]
    numbers = [p["containerPort"] for p in ports] or [8080]
    port: Any = draw(st.sampled_from(names + numbers) if names else st.sampled_from(numbers))
    kind = draw(st.sampled_from(("httpGet", "httpsGet", "tcpSocket", "grpc", "exec")))
    if kind == "httpGet":
        action: dict[str, Any] = {"httpGet": {"path": draw(st.sampled_from(("/", "/healthz"))), "port": port}}
    elif kind == "httpsGet":
        action = {"httpGet": {"path": "/secure", "port": port, "scheme": "HTTPS"}}
    elif kind == "tcpSocket":
        action = {"tcpSocket": {"port": port}}
    elif kind == "grpc":
        action = {"grpc": {"port": draw(st.sampled_from(numbers))}}
    else:
        action = {"exec": {"command": ["cat", "/tmp/ready"]}}
    if draw(st.booleans()):
        action["periodSeconds"] = draw(st.integers(1, 30))
    return action


@st.composite
def _container(draw: st.DrawFn, name: str, *, init: bool = False) -> dict[str, Any]:
    port_names = draw(st.lists(st.sampled_from(PORT_NAMES), max_size=2, unique=True))
    ports = [{"name": n, "containerPort": 8080 + i, "protocol": "TCP"} for i, n in enumerate(port_names)]
    c: dict[str, Any] = {"name": name, "image": f"example.com/{name}:1"}
    if ports:
        c["ports"] = ports
    native = init and draw(st.booleans())
    if native:
        c["restartPolicy"] = "Always"
    if not init or native:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if draw(st.booleans()):
                c[probe] = draw(_probe(ports))
    if draw(st.booleans()):
        c["resources"] = {"requests": {"cpu": "10m", "memory": "16Mi"}}
    uid = draw(st.sampled_from((None, None, 1000, 0, 1337)))
    if uid is not None:
        c["securityContext"] = {"runAsUser": uid}
    return c


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    """A valid pod drawing from everything injection reads."""
    names = draw(st.lists(st.sampled_from(("web", "api", "worker", "log")),
                          min_size=1, max_size=3, unique=True))
    inits = draw(st.lists(st.sampled_from(("setup", "migrate", "agent")), max_size=2, unique=True))
    keys = draw(st.lists(st.sampled_from(sorted(ANNOTATIONS)), max_size=5, unique=True))
    annotations = {k: draw(st.sampled_from(ANNOTATIONS[k])) for k in keys}
    label_keys = draw(st.lists(st.sampled_from(sorted(LABELS)), max_size=3, unique=True))
    labels = {k: draw(st.sampled_from(LABELS[k])) for k in label_keys}
    spec: dict[str, Any] = {"containers": [draw(_container(n)) for n in names]}
    if inits:
        spec["initContainers"] = [draw(_container(n, init=True)) for n in inits]
    if draw(st.booleans()):
        spec["securityContext"] = {"runAsUser": draw(st.sampled_from((1000, 1337))), "fsGroup": 2000}
    if draw(st.booleans()):
        spec["serviceAccountName"] = "shop"
    meta: dict[str, Any] = {"name": "p", "namespace": "shop"}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def describe(obj: dict[str, Any]) -> str:
    """A generated pod's name: its JSON (differences.yaml's input globs match on it)."""
    return json.dumps(obj, sort_keys=True)
