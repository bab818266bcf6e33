"""`helm install` / `helm uninstall` of the CNI DaemonSet on the real node (kubelet + containerd).

The chart's DaemonSet runs for real: the mesh-cni image built from the working tree is imported
into the node, and the release's values aim the DaemonSet's host paths at the test node's CNI
dirs (and at a scratch dir of this test for the agent's own dirs), so the machine's /etc/cni,
/opt/cni and /var/lib stay untouched. Stated differences from a user's install:
- `images.pullPolicy=Never` (no registry here) and `cni.apiServer` (the test bed has no
  kube-proxy, so the kubernetes Service is not reachable from the host network);
- the injector as in test_helm_apiserver.py: a loopback server, the Deployment scaled to 0,
  webhooks limited to this test's namespaces.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector import manifests
from tests.conftest import require_root
from tests.deploy.test_helm_apiserver import Helm, PodCreator, stop_with_the_deployment
from tests.install.conftest import snapshot
from tests.testbed import images
from tests.testbed.proc import free_port, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.node, pytest.mark.root]

TAINT = "cni.istio.io/not-ready"
CNI_POD = "app.kubernetes.io/name=mesh-cni"


class Deletions(threading.Thread):
    """Watches one kind of object from a known resourceVersion and records the resourceVersion of
    each DELETED event: the API server's own order of deletions (one etcd revision counter)."""

    def __init__(self, plane: Any, path: str, selector: str) -> None:
        super().__init__(daemon=True)
        listed = plane.get_json(f"{path}?{selector}")
        self.plane, self.path, self.selector = plane, path, selector
        self.start_rv = listed["metadata"]["resourceVersion"]
        self.deleted: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        query = f"{self.selector}&watch=1&resourceVersion={self.start_rv}&timeoutSeconds=120"
        request = urllib.request.Request(
            f"{self.plane.server}{self.path}?{query}", headers={"Authorization": f"Bearer {self.plane.token}"}
        )
        try:
            with urllib.request.urlopen(request, context=self.plane.ssl_context(), timeout=130) as stream:
                for line in stream:
                    event = json.loads(line)
                    if event["type"] == "DELETED":
                        meta = event["object"]["metadata"]
                        self.deleted[meta["name"]] = int(meta["resourceVersion"])
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def chained(conf_dir: Path) -> bool:
    """Our plugin is the last of the conflist containerd uses (the lexically first)."""
    first = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conflist", ".conf"))[0]
    plugins = json.loads(first.read_bytes()).get("plugins", [])
    return bool(plugins) and plugins[-1].get("type") == "mesh-cni"


def node_taints(plane: Any, node: str) -> set[str]:
    return {t["key"] for t in plane.get_json(f"/api/v1/nodes/{node}")["spec"].get("taints") or []}


def agent_report(plane: Any, namespace: str) -> str:
    """The DaemonSet pod's status and its containers' last log lines, for a failure message."""
    out = plane.kubectl("get", "pods", "-n", namespace, "-l", CNI_POD, "-o", "yaml", check=False).stdout
    for container in ("install-cni", "node-agent"):
        args = ("logs", "-n", namespace, "-l", CNI_POD, "-c", container, "--tail=40")
        logs = plane.kubectl(*args, check=False)
        out += f"\n--- {container}:\n{logs.stdout}{logs.stderr}"
    return out


@contextlib.contextmanager
def shared_mount(directory: Path) -> Iterator[Path]:
    """``directory`` as a shared bind mount of itself: the DaemonSet mounts the netns dir with
    HostToContainer propagation, which containerd refuses unless the host path's mount is shared
    or a slave (a node's / is; this machine's is private)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(directory)], check=True)
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_helm_uninstall_restores_the_node_and_never_fails_a_pod_create(
    node: Any, tmp_path: Path
) -> None:
    """What a user removing the mesh relies on: no pod create fails on the way (the webhook
    configuration goes first), and each node's CNI config ends as it was before the install."""
    require_root()
    plane = node.control_plane
    before = snapshot(node.cni_conf_dir, node.cni_bin_dir)
    assert not chained(node.cni_conf_dir)
    node.import_image(images.mesh_cni_image())
    host = tmp_path / "host"
    bed = Helm(plane, tmp_path / "helm")
    release = "mesh-node"

    def restored() -> bool:
        return snapshot(node.cni_conf_dir, node.cni_bin_dir) == before

    with contextlib.ExitStack() as cleanup:
        netns = cleanup.enter_context(shared_mount(host / "netns"))
        cleanup.callback(plane.kubectl, "taint", "node", node.name, f"{TAINT}-", check=False)
        cleanup.callback(plane.delete_namespace, bed.namespace)
        cleanup.callback(wait_for, "the node's CNI dirs restored after a failure", restored, timeout=60)
        cleanup.callback(bed.run, "uninstall", release, "--namespace", bed.namespace, "--wait", check=False)
        # Nodes are registered with the taint so nothing lands on them before the plugin is chained.
        plane.kubectl("taint", "node", node.name, f"{TAINT}=true:NoSchedule", "--overwrite")
        server = bed.server_for(release)
        cleanup.callback(server.stop)
        bed.run(
            "install", release, str(manifests.CHART), *bed.values(server), "--create-namespace",
            "--set", f"images.cni={images.MESH_CNI_IMAGE}", "--set", "images.pullPolicy=Never",
            "--set", f"cni.binDir={node.cni_bin_dir}", "--set", f"cni.netDir={node.cni_conf_dir}",
            "--set", f"cni.runtimeDir={host / 'opt-mesh-cni'}", "--set", f"cni.stateDir={host / 'state'}",
            "--set", f"cni.logDir={host / 'log'}", "--set", f"cni.agentSocketDir={host / 'run'}",
            "--set", f"cni.netnsDir={netns}", "--set", f"cni.apiServer={plane.server}",
            "--set", f"cni.healthPort={free_port()}",
        )  # fmt: skip
        pods = f"/api/v1/namespaces/{bed.namespace}/pods"

        def agent_ready() -> bool:
            items = plane.get_json(f"{pods}?labelSelector={urllib.parse.quote(CNI_POD)}")["items"]
            ready = [c for p in items for c in (p["status"].get("containerStatuses") or []) if c["ready"]]
            return len(ready) == 2 and chained(node.cni_conf_dir)

        try:
            wait_for("the DaemonSet's pod ready and our entry in the conflist", agent_ready, timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{agent_report(plane, bed.namespace)}") from None
        # The agent lifts the taint once its install is valid.
        wait_for("the not-ready taint removed", lambda: TAINT not in node_taints(plane, node.name), 30)
        assert snapshot(node.cni_conf_dir, node.cni_bin_dir) != before

        # helm uninstall while pods are being created; the API server's record of what went first.
        watches = [
            Deletions(plane, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                      "fieldSelector=metadata.name%3Dmesh-injector"),
            Deletions(plane, f"/apis/apps/v1/namespaces/{bed.namespace}/deployments",
                      "fieldSelector=metadata.name%3Dmesh-injector"),
            Deletions(plane, f"/apis/apps/v1/namespaces/{bed.namespace}/daemonsets",
                      "fieldSelector=metadata.name%3Dmesh-cni-node"),
            Deletions(plane, pods, f"labelSelector={urllib.parse.quote(CNI_POD)}"),
        ]  # fmt: skip
        for watch in watches:
            watch.start()
        ns = bed.labelled_namespace({"istio-injection": "enabled"})
        cleanup.callback(plane.delete_namespace, ns)
        creator = PodCreator(bed, ns, "during-uninstall")
        creator.start()
        stopper = stop_with_the_deployment(bed, server)
        wait_for("pods being created", lambda: len(creator.created) >= 2, timeout=30)
        bed.run("uninstall", release, "--namespace", bed.namespace, "--wait")
        wait_for("the DaemonSet's pod gone", lambda: all(w.deleted for w in watches), timeout=60)
        wait_for("the node's CNI dirs restored", restored, timeout=30)
        stopper.join(60)
        creator.finish()
        assert [w.error for w in watches] == [None] * len(watches)
        assert creator.failures == [] and len(creator.created) >= 3

        webhook, deployment, daemonset, agent_pod = (next(iter(w.deleted.values())) for w in watches)
        assert webhook < deployment and webhook < daemonset < agent_pod, "webhook configuration not first"
        assert not plane.get_json(f"{pods}?labelSelector={urllib.parse.quote(CNI_POD)}")["items"]
        # Byte for byte (and modes) as before the install; the agent's own dirs left empty.
        assert snapshot(node.cni_conf_dir, node.cni_bin_dir) == before
        assert not any((host / d).exists() and any((host / d).iterdir()) for d in ("opt-mesh-cni", "state"))
        # Uninstalling does not taint the node again (see manifests/README.md, "Node taint").
        assert TAINT not in node_taints(plane, node.name)
        print(f"{len(creator.created)} pods created during the uninstall, 0 failed; deletions at revisions "
              f"webhook {webhook} < deployment {deployment}, daemonset {daemonset} < agent pod {agent_pod}")
