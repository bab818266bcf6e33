"""End to end through a real kube-apiserver (+ etcd, controller-manager) on loopback.

The webhook is registered with the selectors from ``injector.selectors`` (via
``injector.manifests.webhook_configuration``), a URL to our loopback HTTPS server and the test
CA as caBundle. Each webhook configuration also requires a per-session namespace label, so it
only ever sees this module's namespaces (the control plane is shared by the whole test session).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from injector.config import compile_config
from injector.core import inject
from injector.manifests import webhook_configuration
from injector.result import Decision, ReasonCode
from tests.server.helpers import RunningServer, start_server
from tests.testbed.controlplane import ControlPlane
from tests.testbed.proc import wait_for

pytestmark = pytest.mark.apiserver

SCOPE_LABEL = "mesh-injector.test/server-e2e"
UNSCHEDULABLE = {"mesh-injector.test/no-such-node": "true"}  # pods stay Pending even with a node


def scoped_webhooks(name: str, url: str, ca_pem: bytes, scope: str, **kwargs: Any) -> dict[str, Any]:
    config = webhook_configuration(name=name, url=url, ca_bundle=base64.b64encode(ca_pem).decode(), **kwargs)
    for webhook in config["webhooks"]:
        webhook["namespaceSelector"].setdefault("matchLabels", {})[SCOPE_LABEL] = scope
        # We post Events (skipped for dry runs): the honest declaration.
        webhook["sideEffects"] = "NoneOnDryRun"
    return config


class Cluster:
    """The control plane plus our registered webhook server, and helpers the tests share."""

    def __init__(self, plane: ControlPlane, server: RunningServer, scope: str) -> None:
        self.plane = plane
        self.server = server
        self.scope = scope
        self.namespaces: list[str] = []

    def namespace(self, labels: dict[str, str] | None = None) -> str:
        ns = self.plane.create_namespace(labels={SCOPE_LABEL: self.scope, **(labels or {})}, prefix="srv")
        self.namespaces.append(ns)
        return ns

    def apply(self, obj: dict[str, Any], *args: str, check: bool = True) -> Any:
        return self.plane.kubectl("create", "-f", "-", *args, input=json.dumps(obj), check=check)

    def get(self, kind: str, namespace: str, name: str = "") -> Any:
        out = self.plane.kubectl("get", kind, *([name] if name else []), "-n", namespace, "-o", "json").stdout
        return json.loads(out)


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = Path(tmp_path_factory.mktemp("e2e"))
    server = start_server(workdir, extra_args=["--kubeconfig", str(control_plane.kubeconfig)])
    scope = uuid.uuid4().hex[:10]
    config = scoped_webhooks(f"mesh-injector-e2e-{scope}", f"{server.url}/inject",
                             server.pki.ca.cert_pem, scope)
    control_plane.kubectl("create", "-f", "-", input=json.dumps(config))
    state = Cluster(control_plane, server, scope)
    try:
        yield state
    finally:
        control_plane.kubectl("delete", "mutatingwebhookconfiguration", config["metadata"]["name"],
                              "--ignore-not-found", check=False)
        for ns in state.namespaces:
            control_plane.delete_namespace(ns)
        server.stop()


def pod(name: str, *, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        host_network: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": UNSCHEDULABLE,
        "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}],
    }
    if host_network:
        spec["hostNetwork"] = True
    meta: dict[str, Any] = {"name": name, "labels": labels or {"app": name}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def pod_template(name: str, **kwargs: Any) -> dict[str, Any]:
    """The pod as a workload's template (no name, no apiVersion/kind)."""
    template = pod(name, **kwargs)
    del template["apiVersion"], template["kind"], template["metadata"]["name"]
    return template


def container_names(obj: dict[str, Any]) -> list[str]:
    spec = obj["spec"]
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]


def is_injected(obj: dict[str, Any]) -> bool:
    return "istio-proxy" in container_names(obj) and \
        "sidecar.istio.io/status" in (obj["metadata"].get("annotations") or {})


def test_deployment_in_labelled_namespace_gets_injected_pods(cluster: Cluster) -> None:
    ns = cluster.namespace({"istio-injection": "enabled"})
    template = pod_template("web")
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": template},
    }
    cluster.apply(deployment)
    def three_pods() -> list[dict[str, Any]] | None:
        items = cluster.get("pods", ns)["items"]
        return items if len(items) == 3 else None

    pods = wait_for("3 pods", three_pods)
    for stored in pods:
        assert is_injected(stored), container_names(stored)
        app = next(c for c in stored["spec"]["containers"] if c["name"] == "app")
        assert app["readinessProbe"]["httpGet"]["path"] == "/app-health/app/readyz"
        status = json.loads(stored["metadata"]["annotations"]["sidecar.istio.io/status"])
        assert status["revision"] == "default"
    # The API server names a pod and gives it a uid after admission: the replicas reached the
    # webhook differing only in their token volume's name and managedFields; the memo kept the
    # answer at the second miss and answered the third from it.
    reviews = [line.get("memo") for line in cluster.server.logs()
               if line.get("namespace") == ns and line.get("operation") == "CREATE"]
    assert reviews == ["miss", "miss", "hit"], reviews


def test_pods_outside_selection_are_stored_untouched(cluster: Cluster) -> None:
    plain_ns = cluster.namespace()
    cluster.apply(pod("plain"), "-n", plain_ns)
    mesh_ns = cluster.namespace({"istio-injection": "enabled"})
    cluster.apply(pod("optout-label", labels={"sidecar.istio.io/inject": "false"}), "-n", mesh_ns)
    cluster.apply(pod("optout-annotation", annotations={"sidecar.istio.io/inject": "false"}), "-n", mesh_ns)
    cluster.apply(pod("hostnet", host_network=True), "-n", mesh_ns)
    assert container_names(cluster.get("pod", plain_ns, "plain")) == ["app"]
    for name in ("optout-label", "optout-annotation", "hostnet"):
        stored = cluster.get("pod", mesh_ns, name)
        assert container_names(stored) == ["app"], name
        assert "sidecar.istio.io/status" not in (stored["metadata"].get("annotations") or {})
    # Reached us (object selector passed) and were skipped by policy, with the reason logged.
    reasons = {(e.get("pod"), e.get("reason")) for e in cluster.server.logs()
               if e.get("namespace") == mesh_ns}
    assert ("optout-annotation", "PodOptedOut") in reasons and ("hostnet", "HostNetwork") in reasons
    assert not any(p == "optout-label" for p, _ in reasons)  # filtered by the API server's selector


def test_bad_traffic_annotation_is_refused_with_the_message(cluster: Cluster) -> None:
    ns = cluster.namespace({"istio-injection": "enabled"})
    bad = pod("bad", annotations={"traffic.sidecar.istio.io/excludeInboundPorts": "8080,nope"})
    result = cluster.apply(bad, "-n", ns, check=False)
    assert result.returncode != 0
    assert "denied the request" in result.stderr
    assert "traffic.sidecar.istio.io/excludeInboundPorts" in result.stderr and "nope" in result.stderr
    assert cluster.plane.kubectl("get", "pod", "bad", "-n", ns, check=False).returncode != 0


def test_server_side_dry_run_shows_the_injected_pod(cluster: Cluster) -> None:
    ns = cluster.namespace({"istio-injection": "enabled"})
    out = cluster.apply(pod("preview"), "-n", ns, "--dry-run=server", "-o", "json").stdout
    preview = json.loads(out)
    assert is_injected(preview)
    assert cluster.plane.kubectl("get", "pod", "preview", "-n", ns, check=False).returncode != 0
    dry_lines = [e for e in cluster.server.logs() if e.get("namespace") == ns and e.get("pod") == "preview"]
    assert dry_lines and dry_lines[-1]["dry_run"] is True


def test_rejection_posts_an_event_on_the_deployment(cluster: Cluster) -> None:
    ns = cluster.namespace({"istio-injection": "enabled"})
    template = pod_template("broken",
                            annotations={"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/99"})
    cluster.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "broken", "namespace": ns},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "broken"}}, "template": template},
    })

    def deployment_events() -> list[dict[str, Any]]:
        return [e for e in cluster.get("events", ns)["items"]
                if e["involvedObject"]["kind"] == "Deployment"
                and e["source"].get("component") == "mesh-injector"]

    events = wait_for("a mesh-injector Event on the Deployment", deployment_events)
    assert events[0]["involvedObject"]["name"] == "broken"
    assert events[0]["type"] == "Warning"
    assert "10.0.0.0/99" in events[0]["message"]


class _AddContainerWebhook(http.server.BaseHTTPRequestHandler):
    """Another vendor's mutating webhook: appends a container (with an HTTP probe) to every pod."""

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["content-length"])))
        request = review["request"]
        names = [c["name"] for c in request["object"]["spec"]["containers"]]
        response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
        if "late-agent" not in names:
            container = {"name": "late-agent", "image": "busybox", "command": ["sleep", "3600"],
                         "readinessProbe": {"httpGet": {"path": "/healthy", "port": 9090}}}
            patch = [{"op": "add", "path": "/spec/containers/-", "value": container}]
            encoded = base64.b64encode(json.dumps(patch).encode()).decode()
            response.update(patchType="JSONPatch", patch=encoded)
        body = json.dumps({"apiVersion": review["apiVersion"], "kind": "AdmissionReview",
                           "response": response}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_reinvocation_with_a_second_webhook_adding_a_container(cluster: Cluster, tmp_path: Path) -> None:
    serving = cluster.server.pki.serving()
    (tmp_path / "tls.crt").write_bytes(serving.cert_pem)
    (tmp_path / "tls.key").write_bytes(serving.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AddContainerWebhook)
    other.socket = ctx.wrap_socket(other.socket, server_side=True)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    ns = cluster.namespace({"istio-injection": "enabled", "late-agent": "yes"})
    # "zz-" sorts after ours: the API server calls us first, then it, then us again (IfNeeded).
    name = f"zz-late-agent-{cluster.scope}"
    other_config = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "late-agent.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"url": f"https://127.0.0.1:{other.server_address[1]}/",
                             "caBundle": base64.b64encode(cluster.server.pki.ca.cert_pem).decode()},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"late-agent": "yes", SCOPE_LABEL: cluster.scope}},
            "failurePolicy": "Fail", "reinvocationPolicy": "Never",
        }],
    }
    cluster.plane.kubectl("create", "-f", "-", input=json.dumps(other_config))
    try:
        cluster.apply(pod("reinvoked"), "-n", ns)
        stored = cluster.get("pod", ns, "reinvoked")
    finally:
        cluster.plane.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)
        other.shutdown()
    names = container_names(stored)
    assert names.count("istio-proxy") == 1 and "late-agent" in names and "app" in names
    late = next(c for c in stored["spec"]["containers"] if c["name"] == "late-agent")
    # Our second pass handled the container the other webhook added: its probe goes via the agent.
    assert late["readinessProbe"]["httpGet"]["path"] == "/app-health/late-agent/readyz"
    proxy = next(c for c in stored["spec"].get("initContainers", []) + stored["spec"]["containers"]
                 if c["name"] == "istio-proxy")
    probers = json.loads(next(e["value"] for e in proxy["env"] if e["name"] == "ISTIO_KUBE_APP_PROBERS"))
    assert "/app-health/late-agent/readyz" in probers and "/app-health/app/readyz" in probers
    seen = [e for e in cluster.server.logs() if e.get("namespace") == ns and e.get("pod") == "reinvoked"]
    assert len(seen) >= 2  # called again after the other webhook's change


GOLDEN = Path(__file__).resolve().parent.parent / "golden"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def typical_stored_pod(name: str) -> dict[str, Any]:
    """A pod with the things the API server fills in defaults for: ports without protocol,
    probes, an init container, a configMap volume, fieldRef env."""
    template = pod(name, labels={"app": name, "version": "v1"})
    spec = template["spec"]
    spec["containers"][0]["livenessProbe"] = {"tcpSocket": {"port": 8080}}
    spec["containers"][0]["env"] = [{"name": "MY_POD",
                                     "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    spec["containers"][0]["volumeMounts"] = [{"name": "settings", "mountPath": "/etc/settings"}]
    spec["containers"].append({"name": "worker", "image": "busybox", "command": ["sleep", "3600"],
                               "ports": [{"containerPort": 9100}]})
    spec["initContainers"] = [{"name": "migrate", "image": "busybox", "command": ["true"]}]
    spec["volumes"] = [{"name": "settings", "configMap": {"name": "settings"}}]
    return template


def test_reinvocation_finds_nothing_to_do(cluster: Cluster) -> None:
    """reinvocationPolicy IfNeeded (our manifests' setting) with no other webhook: the pod is
    stored with each container once, our containers carry the service-account token mount as the
    app's do (so the ServiceAccount plugin, re-run after our patch, changes nothing and we are
    called once), and injecting the stored pod again answers AlreadyInjected with no patch."""
    ns = cluster.namespace({"istio-injection": "enabled"})
    cluster.apply(typical_stored_pod("stored"), "-n", ns)
    # A plain GET: the object as the API server serialises it (its field order, as in a review).
    stored = cluster.plane.get_json(f"/api/v1/namespaces/{ns}/pods/stored")
    # nativeSidecars: auto on this (>= 1.29) API server: the proxy is a native sidecar, started
    # right after the validation container and before the app's own init containers (Istio's order).
    assert container_names(stored) == ["istio-validation", "istio-proxy", "migrate", "app", "worker"]
    spec = stored["spec"]
    for container in spec["initContainers"] + spec["containers"]:
        token_mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == TOKEN_PATH]
        assert len(token_mounts) == 1 and token_mounts[0]["readOnly"], container["name"]

    calls = [e for e in cluster.server.logs()
             if e.get("msg") == "admission" and e.get("namespace") == ns and e.get("pod") == "stored"]
    assert calls and calls[0]["reason"] == "Injected" and calls[0]["patched"]
    assert [(e["reason"], e["patched"]) for e in calls[1:]] == [("AlreadyInjected", False)] * (len(calls) - 1)
    assert len(calls) == 1, "called again: an in-tree plugin changed the pod after our patch"

    # What a reinvocation would be sent: our own output, defaulted by the API server, injected
    # with the config the server runs (the built-in one, with this cluster's version applied).
    version = cluster.plane.get_json("/version")["gitVersion"]
    running = compile_config({"values": {"mesh": {"kubernetesVersion": version}}})
    again = inject(stored, config=running)
    assert again.decision is Decision.INJECT
    assert again.reason.code is ReasonCode.ALREADY_INJECTED, again.reasons
    assert again.patch == []
    if os.environ.get("CAPTURE_GOLDEN"):  # refresh tests/golden/reinject-stored-by-apiserver.yaml
        status = json.loads(stored["metadata"]["annotations"]["sidecar.istio.io/status"])
        text = yaml.safe_dump(stored, sort_keys=False, width=120)
        text = text.replace(status["configHash"], "@CONFIG_HASH@")
        header = ("# A pod as kube-apiserver 1.20 stored it after our webhook (IfNeeded), captured by\n"
                  "# CAPTURE_GOLDEN=1 pytest tests/server/test_apiserver_e2e.py -k reinvocation_finds\n")
        (GOLDEN / "reinject-stored-by-apiserver.yaml").write_text(header + text)


def test_audit_requires_a_token_allowed_to_list_pods(cluster: Cluster) -> None:
    ns = cluster.namespace({"istio-injection": "enabled"})
    template = pod_template("audited")
    cluster.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "audited", "namespace": ns},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "audited"}}, "template": template},
    })
    cluster.apply(pod("bare"), "-n", ns)
    wait_for("the deployment's pod", lambda: len(cluster.get("pods", ns)["items"]) == 2)
    # A pod that predates the mesh label: should be injected, is not (needs a restart).
    cluster.plane.kubectl("label", "namespace", ns, "istio-injection-", check=False)
    cluster.apply(pod("old"), "-n", ns)
    cluster.plane.kubectl("label", "namespace", ns, "istio-injection=enabled")

    plane = cluster.plane
    auditor = plane.service_account_token(ns, "auditor")
    plane.kubectl("create", "role", "pod-lister", "--verb=list", "--resource=pods", "-n", ns)
    plane.kubectl("create", "rolebinding", "pod-lister", "--role=pod-lister",
                  f"--serviceaccount={ns}:auditor", "-n", ns)
    nobody = plane.service_account_token(ns, "nobody")

    with cluster.server.client() as client:
        def audit(token: str | None, namespace: str | None = ns) -> httpx.Response:
            headers = {"authorization": f"Bearer {token}"} if token else {}
            params = {"namespace": namespace} if namespace else {}
            return client.get("/audit", headers=headers, params=params)

        assert audit(None).status_code == 401
        assert audit("not-a-real-token").status_code == 401
        denied = audit(nobody)
        assert denied.status_code == 403 and "may not list pods" in denied.json()["error"]
        assert audit(auditor, namespace=None).status_code == 403  # only namespaced rights
        wait_for("RBAC to settle", lambda: audit(auditor).status_code == 200, timeout=20)
        report = audit(auditor).json()

    rows = {row["pod"]: row for row in report["pods"]}
    assert report["requestedBy"] == f"system:serviceaccount:{ns}:auditor"
    deployed = next(row for name, row in rows.items() if name.startswith("audited-"))
    assert deployed["owner"] == "Deployment/audited"
    assert deployed["shouldInject"] and deployed["injected"] and deployed["stale"] is False
    assert deployed["revision"] == "default" and not deployed["needsRestart"]
    assert rows["bare"]["owner"] is None and rows["bare"]["injected"]
    assert rows["old"]["shouldInject"] and not rows["old"]["injected"] and rows["old"]["needsRestart"]
    assert report["summary"]["missingSidecar"] == 1


def test_audit_cli_uses_the_current_kubeconfig(cluster: Cluster, tmp_path: Path) -> None:
    import subprocess

    from tests.server.helpers import serve_command

    ns = cluster.namespace({"istio-injection": "enabled"})
    cluster.apply(pod("meshed"), "-n", ns)
    cluster.plane.kubectl("label", "namespace", ns, "istio-injection-")
    cluster.apply(pod("unmeshed"), "-n", ns)  # created while the namespace was not selected
    env = {"KUBECONFIG": str(cluster.plane.kubeconfig), "PATH": "/usr/bin:/bin"}
    as_json = subprocess.run([*serve_command(), "audit", "-n", ns, "-o", "json"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    rows = {row["pod"]: row for row in json.loads(as_json.stdout)["pods"]}
    # The namespace is no longer selected: the injected pod carries a sidecar it should not have.
    assert rows["meshed"]["injected"] and not rows["meshed"]["shouldInject"]
    assert rows["meshed"]["reasons"][0]["code"] == "NamespaceNotSelected"
    assert not rows["unmeshed"]["injected"] and not rows["unmeshed"]["needsRestart"]
    table = subprocess.run([*serve_command(), "audit", "-n", ns], capture_output=True, text=True, env=env,
                           timeout=60)
    assert table.returncode == 0 and "NAMESPACE" in table.stdout and "meshed" in table.stdout
    assert "1 injected but not selected" in table.stdout
