"""The loopback control plane behaves like a cluster: controllers run, RBAC and tokens work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, require
from tests.testbed.controlplane import ControlPlane, missing_binaries
from tests.testbed.proc import KUBE_VERSION, wait_for

pytestmark = pytest.mark.apiserver

#: Matches no node, so the pods stay Pending even when the session also runs the real node.
UNSCHEDULABLE = {"mesh-injector.test/no-such-node": "true"}


def _items(control_plane: ControlPlane, kind: str, namespace: str) -> list[dict[str, Any]]:
    out = control_plane.kubectl("get", kind, "-n", namespace, "-o", "json").stdout
    return json.loads(out)["items"]


def test_deployment_yields_replicaset_and_pending_pods_with_token(control_plane: ControlPlane) -> None:
    ns = control_plane.create_namespace(prefix="smoke")
    try:
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "nodeSelector": UNSCHEDULABLE,
                        "containers": [{"name": "web", "image": "busybox", "command": ["sleep", "3600"]}],
                    },
                },
            },
        }
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(deployment))

        replicasets = wait_for("a ReplicaSet", lambda: _items(control_plane, "replicasets", ns))
        assert replicasets[0]["metadata"]["ownerReferences"][0]["name"] == "web"
        pods = wait_for("2 pods", lambda: p if len(p := _items(control_plane, "pods", ns)) == 2 else None)
        for pod in pods:
            assert pod["metadata"]["ownerReferences"][0]["name"] == replicasets[0]["metadata"]["name"]
            assert pod["status"]["phase"] == "Pending"
            # The ServiceAccount admission plugin added the projected token volume: a bound token,
            # the namespace's kube-root-ca.crt and the namespace (no token Secret since 1.24).
            mounts = pod["spec"]["containers"][0].get("volumeMounts", [])
            mount = next(
                m for m in mounts if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
            )
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
            sources = volume["projected"]["sources"]
            assert sources[0]["serviceAccountToken"]["path"] == "token"
            assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"

        root_ca = control_plane.get_json(f"/api/v1/namespaces/{ns}/configmaps/kube-root-ca.crt")
        assert root_ca["data"]["ca.crt"] == control_plane.ca_file.read_text()
    finally:
        control_plane.delete_namespace(ns)


def test_kubectl_and_server_report_the_pinned_release(control_plane: ControlPlane) -> None:
    """Both carry the release stamp of tools/kube/go.mod (GET /version is what `serve` reads)."""
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"] == version["serverVersion"]["gitVersion"] == KUBE_VERSION
    major, minor = KUBE_VERSION.lstrip("v").split(".")[:2]
    assert control_plane.get_json("/version")["major"] == major
    assert control_plane.get_json("/version")["minor"] == minor


def test_api_client_and_rbac(control_plane: ControlPlane) -> None:
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client())
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "kube-system"} <= names

    plain = client.CoreV1Api(control_plane.api_client(token=control_plane.user_tokens["mesh-user-a"]))
    with pytest.raises(client.ApiException) as denied:
        plain.list_namespaced_pod("default")
    assert denied.value.status == 403

    ns = control_plane.create_namespace(prefix="rbac")
    try:
        reader = control_plane.service_account_token(ns, "reader")
        control_plane.kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", ns)
        control_plane.kubectl(
            "create",
            "rolebinding",
            "pod-reader",
            "--role=pod-reader",
            f"--serviceaccount={ns}:reader",
            "-n",
            ns,
        )
        as_reader = client.CoreV1Api(control_plane.api_client(token=reader))
        assert as_reader.list_namespaced_pod(ns).items == []
        with pytest.raises(client.ApiException) as other_ns:
            as_reader.list_namespaced_pod("default")
        assert other_ns.value.status == 403
    finally:
        control_plane.delete_namespace(ns)


def _port_open(url: str) -> bool:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def test_cli_up_and_down_leave_nothing_running(tmp_path: Path) -> None:
    require(not missing_binaries(), "needs the Kubernetes binaries from scripts/setup.d/30-kube.sh")
    workdir = tmp_path / "cp"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MESH_CONTROL_PLANE", None)
    cli = [sys.executable, "-m", "tests.testbed.controlplane"]
    up = subprocess.run(
        [*cli, "up", "--dir", str(workdir)], capture_output=True, text=True, env=env, timeout=180, check=False
    )
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={workdir}/admin.kubeconfig" in up.stdout
    plane = ControlPlane.attach(workdir)
    try:
        assert all(d.alive() for d in plane.daemons)
        assert [d.name for d in plane.daemons] == ["etcd", "kube-apiserver", "kube-controller-manager"]
        assert (
            plane.kubectl("get", "namespace", "default", "-o", "name").stdout.strip() == "namespace/default"
        )
    finally:
        down = subprocess.run(
            [*cli, "down", "--dir", str(workdir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    assert not any(d.alive() for d in plane.daemons)
    assert not _port_open(plane.server) and not _port_open(plane.etcd_url)
    assert not workdir.exists()
