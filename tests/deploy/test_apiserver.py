"""The manifests and the certificate machinery against the real kube-apiserver on loopback.

The test bed's API server is the newest Kubernetes we support (tools/kube: 1.37); every
object applies as rendered. cert-manager's Certificate/Issuer are not applied
(their CRDs are not available offline). See `tests.deploy.cluster` for how the real apply is
kept from affecting other tests sharing the control plane.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from injector import certs
from tests.deploy.cluster import (
    RUN_LABEL,
    apply,
    cli,
    delete,
    harmless,
    run_cli,
    write_kubeconfig,
)
from tests.deploy.manifests import CRD_KINDS, TARGETS, find, objects, to_yaml

pytestmark = pytest.mark.apiserver

RUN_ID = uuid.uuid4().hex[:10]
INJECTOR_SA = "system:serviceaccount:mesh-system:mesh-injector"
CNI_SA = "system:serviceaccount:mesh-system:mesh-cni"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Installed:
    objects: list[dict[str, Any]]
    webhook_port: int
    injector_kubeconfig: Path
    workdir: Path


@pytest.fixture(scope="module")
def mesh_system(control_plane: Any) -> None:
    apply(control_plane, [find(objects("base"), "Namespace", "mesh-system")])


@pytest.fixture(scope="module")
def installed(
    control_plane: Any, mesh_system: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    """The kind overlay applied for real (made harmless to the shared control plane)."""
    port = free_port()
    objs = harmless(objects("overlays/kind"), run_id=RUN_ID, webhook_url=f"https://127.0.0.1:{port}/inject")
    apply(control_plane, objs)
    workdir = tmp_path_factory.mktemp("deploy")
    token = control_plane.service_account_token("mesh-system", "mesh-injector")
    kubeconfig = write_kubeconfig(workdir / "mesh-injector.kubeconfig", control_plane, token)
    try:
        yield Installed(objs, port, kubeconfig, workdir)
    finally:
        delete(control_plane, objs)


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_objects_apply_to_the_real_api_server(
    control_plane: Any, mesh_system: None, target: str
) -> None:
    objs = [o for o in objects(target) if (o["apiVersion"], o["kind"]) not in CRD_KINDS]
    out = control_plane.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=deploy-test",
        "-f",
        "-",
        input=to_yaml(objs),
    ).stdout
    assert out.count("(server dry run)") == len(objs), out


def test_the_api_server_rejects_what_it_does_not_know(control_plane: Any, mesh_system: None) -> None:
    """The dry run above can fail: a misspelt field is refused, not silently dropped."""
    deployment = [find(objects("base"), "Deployment", "mesh-injector")]
    deployment[0]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = (
        "/readyz"
    )
    done = control_plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-", input=to_yaml(deployment), check=False
    )
    assert done.returncode != 0


# --- RBAC: exactly what each service account needs ---------------------------------------------

# (verb, resource[/name][#subresource], namespace or "*" for all namespaces or "" for cluster-scoped, allowed)
INJECTOR_CAN = [
    ("list", "pods", "*", True),
    ("list", "pods", "default", True),
    ("get", "namespaces", "", True),
    ("list", "namespaces", "", True),
    ("list", "replicasets.apps", "*", True),
    ("list", "jobs.batch", "*", True),
    ("get", "replicasets.apps", "default", True),
    ("get", "jobs.batch", "default", True),
    ("create", "tokenreviews.authentication.k8s.io", "", True),
    ("create", "subjectaccessreviews.authorization.k8s.io", "", True),
    ("create", "events", "default", True),
    ("get", "mutatingwebhookconfigurations.admissionregistration.k8s.io/mesh-injector", "", True),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io/mesh-injector", "", True),
    ("get", "secrets/mesh-injector-tls", "mesh-system", True),
    ("update", "secrets/mesh-injector-tls", "mesh-system", True),
    ("patch", "secrets/mesh-injector-tls", "mesh-system", True),
    # ... and nothing next to it:
    ("get", "pods", "default", False),
    ("watch", "pods", "*", False),
    ("create", "pods", "default", False),
    ("patch", "pods", "default", False),
    ("delete", "pods", "default", False),
    ("get", "secrets", "mesh-system", False),
    ("list", "secrets", "mesh-system", False),
    ("create", "secrets", "mesh-system", False),
    ("delete", "secrets/mesh-injector-tls", "mesh-system", False),
    ("get", "secrets/mesh-injector-tls", "default", False),
    ("get", "configmaps", "mesh-system", False),
    ("list", "mutatingwebhookconfigurations.admissionregistration.k8s.io", "", False),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io/istio-sidecar-injector", "", False),
    ("delete", "mutatingwebhookconfigurations.admissionregistration.k8s.io/mesh-injector", "", False),
    ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/mesh-injector", "", False),
    ("list", "deployments.apps", "*", False),
    ("patch", "nodes", "", False),
    ("patch", "events", "default", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "", False),
    ("impersonate", "users", "", False),
]
CNI_CAN = [
    ("get", "pods", "*", True),
    ("list", "pods", "*", True),
    ("watch", "pods", "*", True),
    ("patch", "pods", "default", True),
    ("delete", "pods", "default", True),
    ("get", "nodes", "", True),
    ("patch", "nodes", "", True),
    ("create", "events", "default", True),
    # ... and nothing next to it:
    ("create", "pods", "default", False),
    ("update", "pods", "default", False),
    ("patch", "pods#status", "default", False),
    ("create", "pods#exec", "default", False),
    ("create", "pods#eviction", "default", False),
    ("list", "nodes", "", False),
    ("update", "nodes", "", False),
    ("delete", "nodes", "", False),
    ("get", "secrets", "*", False),
    ("get", "configmaps", "mesh-system", False),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io/mesh-injector", "", False),
    ("create", "tokenreviews.authentication.k8s.io", "", False),
]


def can_i(control_plane: Any, user: str, verb: str, resource: str, namespace: str) -> bool:
    scope = ["--all-namespaces"] if namespace == "*" else (["-n", namespace] if namespace else [])
    resource, _, subresource = resource.partition("#")
    sub = [f"--subresource={subresource}"] if subresource else []
    done = control_plane.kubectl("auth", "can-i", verb, resource, *sub, *scope, f"--as={user}", check=False)
    answer = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert answer in ("yes", "no"), done.stdout + done.stderr
    return answer == "yes"


@pytest.mark.parametrize(
    ("user", "table"), [(INJECTOR_SA, INJECTOR_CAN), (CNI_SA, CNI_CAN)], ids=["injector", "cni"]
)
def test_service_account_can_do_what_it_needs(
    control_plane: Any, installed: Installed, user: str, table: list
) -> None:
    wrong = [
        f"{verb} {resource} in {ns or 'cluster'}: expected {'yes' if allowed else 'no'}"
        for verb, resource, ns, allowed in table
        if can_i(control_plane, user, verb, resource, ns) is not allowed
    ]
    assert not wrong, "\n".join(wrong)


# What `kubectl auth can-i --list` shows beyond the discovery rules every account has:
# (resource, resource names) -> verbs, merged over rules (kubectl may print them merged or not).
INJECTOR_RULES = {
    ("pods", ""): {"list"},
    ("namespaces", ""): {"get", "list"},
    ("replicasets.apps", ""): {"get", "list"},
    ("jobs.batch", ""): {"get", "list"},
    ("tokenreviews.authentication.k8s.io", ""): {"create"},
    ("subjectaccessreviews.authorization.k8s.io", ""): {"create"},
    ("events", ""): {"create"},
    ("mutatingwebhookconfigurations.admissionregistration.k8s.io", "mesh-injector"): {"get", "patch"},
    ("secrets", "mesh-injector-tls"): {"get", "update", "patch"},
}
CNI_RULES = {
    ("pods", ""): {"get", "list", "watch", "patch", "delete"},
    ("nodes", ""): {"get", "patch"},
    ("events", ""): {"create"},
}
RULE_ROW = re.compile(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")
#: A service account no role names: what it may do, every account may (the built-in discovery
#: rules, which grow with Kubernetes releases: self reviews, ClusterTrustBundles, ...).
NOBODY_SA = "system:serviceaccount:mesh-system:no-roles-at-all"


def _listed_rules(control_plane: Any, user: str) -> dict[tuple[str, str], set[str]]:
    listing = control_plane.kubectl("auth", "can-i", "--list", "-n", "mesh-system", f"--as={user}").stdout
    rules: dict[tuple[str, str], set[str]] = {}
    for line in listing.splitlines()[1:]:
        match = RULE_ROW.match(line)
        if match:
            rules.setdefault((match.group(1), match.group(3)), set()).update(match.group(4).split())
    return rules


@pytest.mark.parametrize(
    ("user", "expected"), [(INJECTOR_SA, INJECTOR_RULES), (CNI_SA, CNI_RULES)], ids=["injector", "cni"]
)
def test_service_account_can_do_nothing_more(
    control_plane: Any, installed: Installed, user: str, expected: dict
) -> None:
    everyone = _listed_rules(control_plane, NOBODY_SA)
    assert ("selfsubjectaccessreviews.authorization.k8s.io", "") in everyone, everyone
    rules = {
        key: verbs - everyone.get(key, set())
        for key, verbs in _listed_rules(control_plane, user).items()
        if verbs - everyone.get(key, set())
    }
    assert rules == expected


# --- certificates through the API, as the injector's own service account -------------------------


def _webhook_bundles(control_plane: Any, name: str) -> tuple[list[bytes], str]:
    mwc = control_plane.get_json(
        f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
    )
    bundles = [base64.b64decode(w["clientConfig"].get("caBundle", "")) for w in mwc["webhooks"]]
    return bundles, mwc["metadata"]["resourceVersion"]


def _secret(control_plane: Any) -> dict[str, Any]:
    return control_plane.get_json("/api/v1/namespaces/mesh-system/secrets/mesh-injector-tls")


def test_certs_bootstrap_patches_only_our_webhook_and_only_when_changed(
    control_plane: Any, installed: Installed
) -> None:
    foreign_name = f"deploy-test-foreign-{RUN_ID}"
    foreign_ca = certs.bootstrap(certs.CertPolicy(names=("x",)), dt.datetime.now(dt.UTC)).bundle
    foreign = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": foreign_name},
        "webhooks": [
            {
                "name": "foreign.deploy-test.mesh-injector.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "NoneOnDryRun",
                "clientConfig": {
                    "url": "https://127.0.0.1:1/never",
                    "caBundle": base64.b64encode(foreign_ca).decode(),
                },
                "namespaceSelector": {"matchLabels": {RUN_LABEL: "never"}},
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ],
            }
        ],
    }
    apply(control_plane, [foreign])
    try:
        _, foreign_rv = _webhook_bundles(control_plane, foreign_name)
        tls_dir = installed.workdir / "bootstrap-tls"
        args = (
            "certs",
            "--kubeconfig",
            str(installed.injector_kubeconfig),
            "--ip",
            "127.0.0.1",
            "--write-dir",
            str(tls_dir),
        )
        first = run_cli(*args)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "bootstrap" in first.stdout
        secret = _secret(control_plane)
        bundle = base64.b64decode(secret["data"]["ca-bundle.crt"])
        bundles, rv = _webhook_bundles(control_plane, "mesh-injector")
        assert bundles and all(b == bundle for b in bundles)
        assert _webhook_bundles(control_plane, foreign_name)[1] == foreign_rv, (
            "someone else's webhook touched"
        )
        # The published files are a pair the caBundle vouches for.
        served = (tls_dir / "tls.crt").read_bytes()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
        assert any(certs.signed_by(served, ca) for ca in certs.split_pem_bundle(bundle))
        assert "127.0.0.1" in certs.cert_names(served)
        assert "mesh-injector.mesh-system.svc" in certs.cert_names(served)

        second = run_cli(*args)
        assert second.returncode == 0 and "actions: none" in second.stdout, second.stdout + second.stderr
        assert _secret(control_plane)["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
        assert _webhook_bundles(control_plane, "mesh-injector")[1] == rv, "unchanged caBundle patched again"

        # A user re-applying the manifests (`kubectl apply -k` again, e.g. an upgrade) keeps the
        # certificates and the caBundle: neither is in the manifests.
        apply(control_plane, installed.objects)
        assert _secret(control_plane)["data"] == secret["data"]
        assert _webhook_bundles(control_plane, "mesh-injector")[0] == bundles
    finally:
        control_plane.kubectl(
            "delete", "mutatingwebhookconfiguration", foreign_name, "--ignore-not-found", check=False
        )


# --- end to end: injected pods through the API server, and a rotation under a burst ------------


def _start_server(installed: Installed, tls_dir: Path) -> subprocess.Popen[bytes]:
    config_dir = installed.workdir / "config"
    config_dir.mkdir(exist_ok=True)
    for key, text in find(installed.objects, "ConfigMap", "mesh-injector-config")["data"].items():
        (config_dir / key).write_text(text)
    log = (installed.workdir / "server.log").open("wb")
    return subprocess.Popen(
        cli(
            "serve",
            "--address",
            "127.0.0.1",
            "--port",
            str(installed.webhook_port),
            "--tls-cert-file",
            str(tls_dir / "tls.crt"),
            "--tls-key-file",
            str(tls_dir / "tls.key"),
            "--tls-reload-interval",
            "0.2",
            "--config-dir",
            str(config_dir),
            "--kubeconfig",
            str(installed.injector_kubeconfig),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(port: int, bundle: bytes, process: subprocess.Popen[bytes], log: Path) -> None:
    ctx = ssl.create_default_context(cadata=bundle.decode())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if tls.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("server not ready:\n" + log.read_text())


def _presented_certificate(port: int) -> bytes:
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return certs.split_pem_bundle(pem.encode())[0]


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "burst"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "busybox:1.36",
                    "command": ["sleep", "3600"],
                    "ports": [{"containerPort": 8080}],
                }
            ]
        },
    }


def _injected(pod: dict[str, Any]) -> bool:
    return "sidecar.istio.io/status" in (pod["metadata"].get("annotations") or {})


def test_end_to_end_injection_and_rotation_under_a_burst(control_plane: Any, installed: Installed) -> None:
    from kubernetes import client, config

    tls_dir = installed.workdir / "tls"
    boot = run_cli(
        "certs",
        "--kubeconfig",
        str(installed.injector_kubeconfig),
        "--ip",
        "127.0.0.1",
        "--write-dir",
        str(tls_dir),
    )
    assert boot.returncode == 0, boot.stdout + boot.stderr
    server = _start_server(installed, tls_dir)
    namespace = None
    try:
        _wait_ready(
            installed.webhook_port,
            (tls_dir / "ca.crt").read_bytes(),
            server,
            installed.workdir / "server.log",
        )
        namespace = control_plane.create_namespace(
            labels={"istio-injection": "enabled", RUN_LABEL: RUN_ID}, prefix="deploy-e2e"
        )

        # A Deployment in a labelled namespace: the controller-manager's pods come back injected.
        control_plane.kubectl(
            "create", "deployment", "web", "--image=busybox:1.36", "--replicas=2", "-n", namespace
        )
        deadline = time.monotonic() + 60
        while True:
            pods = control_plane.get_json(f"/api/v1/namespaces/{namespace}/pods?labelSelector=app%3Dweb")[
                "items"
            ]
            if len(pods) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(pods) == 2, f"Deployment made {len(pods)} pods"
        for pod in pods:
            assert _injected(pod), pod["metadata"]
            assert len(pod["spec"]["containers"]) > 1 or pod["spec"].get("initContainers")

        # A burst of pod creations while the CA and the serving certificate rotate.
        api = config.new_client_from_config(config_file=str(installed.injector_kubeconfig))
        policy = certs.CertPolicy(
            names=(*certs.service_dns_names("mesh-injector", "mesh-system"), "127.0.0.1"),
            settle=dt.timedelta(seconds=1),
            overlap=dt.timedelta(seconds=2),
        )
        rotator = certs.ClusterCerts(
            api, "mesh-system", "mesh-injector-tls", "mesh-injector", policy, tls_dir
        )
        old_ca = rotator.reconcile_once().state.ca.cert_pem

        stop = threading.Event()
        created: list[str] = []
        failures: list[str] = []

        def burst(worker: int) -> None:
            admin = client.CoreV1Api(control_plane.api_client())
            i = 0
            while not stop.is_set():
                name = f"burst-{worker}-{i}"
                i += 1
                try:
                    admin.create_namespaced_pod(namespace, _pod(name))
                    created.append(name)
                except Exception as exc:  # every failure counts, whatever its kind
                    failures.append(f"{name}: {exc}")

        workers = [threading.Thread(target=burst, args=(w,)) for w in range(3)]
        for w in workers:
            w.start()
        try:
            time.sleep(1.0)
            before_rotation = len(created)
            result = rotator.reconcile_once(rotate_ca=True)
            assert "rotate-ca" in result.actions
            new_ca = result.state.ca.cert_pem
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.25)
                result = rotator.reconcile_once()
                state = result.state
                if state.trusted == (new_ca,) and certs.signed_by(state.serving.cert_pem, new_ca):
                    break
            else:
                raise AssertionError(f"rotation did not complete: {result}")
            during_rotation = len(created) - before_rotation
            time.sleep(1.5)  # keep creating with only the new CA trusted
        finally:
            stop.set()
            for w in workers:
                w.join(30)

        print(
            f"burst: {len(created)} pods created, {during_rotation} while the CA rotated, "
            f"{len(failures)} failed; rotation: {result.actions or 'done'}"
        )
        assert not failures, f"{len(failures)} pod creations failed, e.g. {failures[:3]}"
        assert during_rotation >= 10, f"only {during_rotation} pods were created during the rotation"
        stored = {
            p["metadata"]["name"]: p
            for p in control_plane.get_json(f"/api/v1/namespaces/{namespace}/pods?labelSelector=app%3Dburst")[
                "items"
            ]
        }
        assert set(created) <= set(stored), "a created pod is missing"
        assert all(_injected(stored[name]) for name in created), "a pod was stored without injection"

        # The server now presents a certificate from the new CA only, and the API server trusts only it.
        presented = _presented_certificate(installed.webhook_port)
        assert certs.signed_by(presented, new_ca) and not certs.signed_by(presented, old_ca)
        bundles, _ = _webhook_bundles(control_plane, "mesh-injector")
        assert all(certs.split_pem_bundle(b) == (new_ca,) for b in bundles)
        after = client.CoreV1Api(control_plane.api_client()).create_namespaced_pod(
            namespace, _pod("after-rotation")
        )
        assert "sidecar.istio.io/status" in (after.metadata.annotations or {})
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        if namespace:
            control_plane.delete_namespace(namespace)


@pytest.mark.parametrize(("kind", "name"), [("Deployment", "mesh-injector"), ("DaemonSet", "mesh-cni-node")])
def test_the_pods_the_controllers_would_create_are_admitted(
    control_plane: Any, installed: Installed, kind: str, name: str
) -> None:
    """Pod-level admission (priority classes outside kube-system, service accounts, security
    contexts) for the pods our workloads make, which the test bed never runs (no images)."""
    template = find(objects("overlays/kind"), kind, name)["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-admission-check", "namespace": "mesh-system", **template["metadata"]},
        "spec": template["spec"],
    }
    done = control_plane.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
    admitted = json.loads(done.stdout)
    assert admitted["spec"]["priority"] >= 2_000_000_000, "a system-* priority class was applied"
    assert admitted["spec"]["serviceAccountName"] == pod["spec"]["serviceAccountName"]


def test_certs_watch_mode_completes_a_rotation_and_stops_on_sigterm(
    control_plane: Any, installed: Installed
) -> None:
    """The in-cluster sidecar: `certs --watch --rotate-ca` walks the whole rotation by itself."""
    tls_dir = installed.workdir / "watch-tls"
    boot = run_cli("certs", "--kubeconfig", str(installed.injector_kubeconfig), "--ip", "127.0.0.1")
    assert boot.returncode == 0, boot.stdout + boot.stderr
    old_ca = base64.b64decode(_secret(control_plane)["data"]["ca.crt"])
    watcher = subprocess.Popen(
        cli(
            "certs",
            "--kubeconfig",
            str(installed.injector_kubeconfig),
            "--ip",
            "127.0.0.1",
            "--watch",
            "--interval",
            "0.2",
            "--settle",
            "0.5s",
            "--overlap",
            "1s",
            "--rotate-ca",
            "--write-dir",
            str(tls_dir),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        done = False
        while time.monotonic() < deadline and not done:
            time.sleep(0.3)
            data = _secret(control_plane)["data"]
            ca = base64.b64decode(data["ca.crt"])
            bundles, _ = _webhook_bundles(control_plane, "mesh-injector")
            done = (
                ca != old_ca
                and all(certs.split_pem_bundle(b) == (ca,) for b in bundles)
                and certs.signed_by(base64.b64decode(data["tls.crt"]), ca)
                and (tls_dir / "tls.crt").is_file()
                and (tls_dir / "tls.crt").read_bytes() == base64.b64decode(data["tls.crt"])
            )
        assert done, "rotation not completed by the watcher"
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=15)
    assert watcher.returncode == 0, out
    assert "rotate-ca" in out and "retire-ca" in out, out
