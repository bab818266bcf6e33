"""The real node runs pods: CNI gives them an IP, exec and logs work, the scheduler places pods.

The host is checked for leftovers when the session's `node` fixture is torn down (see
tests/testbed/plugin.py): an unrestored sysctl, cgroup, mount or log entry is a session error.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from typing import Any

import pytest

from tests.testbed import images
from tests.testbed.controlplane import ControlPlane
from tests.testbed.node import Node

pytestmark = [pytest.mark.node, pytest.mark.root]


def _busybox_pod(name: str, node_name: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "main",
                "image": images.BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo started-$(hostname); exec sleep 3600"],
            }
        ],
    }
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _wait_gone(control_plane: ControlPlane, namespace: str, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while control_plane.kubectl("get", "pod", name, "-n", namespace, check=False).returncode == 0:
        assert time.monotonic() < deadline, f"pod {namespace}/{name} not deleted within {timeout}s"
        time.sleep(0.5)


def test_pod_with_node_name_runs_with_cni_ip_and_exec(control_plane: ControlPlane, node: Node) -> None:
    ns = control_plane.create_namespace(prefix="node")
    try:
        control_plane.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(_busybox_pod("bb", node.name)))
        pod = node.wait_for_pod(ns, "bb", timeout=90)

        pod_ip = ipaddress.ip_address(pod["status"]["podIP"])
        assert pod_ip in ipaddress.ip_network(node.pod_subnet)
        # The IP the API reports is the one on the pod's interface (set up by bridge + host-local).
        addr = control_plane.kubectl("exec", "-n", ns, "bb", "--", "ip", "-4", "-o", "addr", "show", "eth0")
        assert f"inet {pod_ip}/" in addr.stdout
        route = control_plane.kubectl("exec", "-n", ns, "bb", "--", "ip", "route").stdout
        assert "default via 10.233.0.1" in route

        # The same interface, seen from the host through the sandbox's network namespace.
        netns = node.pod_netns(ns, "bb")
        host_view = subprocess.run(
            ["nsenter", f"--net={netns}", "ip", "-4", "-o", "addr", "show", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"inet {pod_ip}/" in host_view

        logs = control_plane.kubectl("logs", "-n", ns, "bb").stdout
        assert "started-bb" in logs

        control_plane.kubectl("delete", "pod", "bb", "-n", ns, "--wait=false")
        _wait_gone(control_plane, ns, "bb")
    finally:
        control_plane.delete_namespace(ns)


def test_scheduler_places_deployment_pods_on_the_node(control_plane: ControlPlane, node: Node) -> None:
    ns = control_plane.create_namespace(prefix="sched")
    try:
        control_plane.kubectl(
            "create", "deployment", "bb", "-n", ns, f"--image={images.BUSYBOX_IMAGE}", "--", "sleep", "3600"
        )
        control_plane.kubectl(
            "patch",
            "deployment",
            "bb",
            "-n",
            ns,
            "--type=json",
            "-p",
            json.dumps(
                [
                    {
                        "op": "add",
                        "path": "/spec/template/spec/containers/0/imagePullPolicy",
                        "value": "Never",
                    },
                    {"op": "add", "path": "/spec/template/spec/terminationGracePeriodSeconds", "value": 1},
                ]
            ),
        )
        control_plane.kubectl("rollout", "status", "deployment/bb", "-n", ns, "--timeout=90s", timeout=120)
        pods = json.loads(control_plane.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        assert running and all(p["spec"]["nodeName"] == node.name for p in running)
    finally:
        control_plane.delete_namespace(ns)


def test_python_image_runs_our_code_as_the_proxy_uid(control_plane: ControlPlane, node: Node) -> None:
    """The image built from this machine's Python runs our `cni` package under contract 3's limits."""
    node.import_image(images.mesh_cni_image())
    ns = control_plane.create_namespace(prefix="pyimg")
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "py"},
            "spec": {
                "nodeName": node.name,
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "py",
                        "image": images.MESH_CNI_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": [
                            "python3",
                            "-c",
                            "import os, pyroute2, cni.annotations, shutil; "
                            "print('uid', os.getuid(), 'launcher', shutil.which('mesh-cni'))",
                        ],
                        "securityContext": {
                            "runAsUser": 1337,
                            "runAsGroup": 1337,
                            "runAsNonRoot": True,
                            "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
        control_plane.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(pod))
        node.wait_for_pod(ns, "py", phase="Succeeded", timeout=90)
        logs = control_plane.kubectl("logs", "-n", ns, "py").stdout
        assert "uid 1337 launcher /usr/local/bin/mesh-cni" in logs
    finally:
        control_plane.delete_namespace(ns)


def test_kubelet_restarts_with_evented_pleg_and_relists_on_an_init_containers_exit(
    control_plane: ControlPlane, node: Node
) -> None:
    """bench_pod_start's extra rows: the kubelet with EventedPLEG on relists a pod as soon as
    containerd reports a container's exit (here: an init container), not at its next 1 s relist."""
    kubelet_log = next(d for d in node.daemons if d.name == "kubelet").log
    node.restart_kubelet(feature_gates={"EventedPLEG": True}, verbosity=4)
    ns = control_plane.create_namespace(prefix="evented")
    try:
        pod = _busybox_pod("init", node.name)
        pod["spec"]["initContainers"] = [
            {"name": "first", "image": images.BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": ["true"]}
        ]
        control_plane.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(pod))
        running = node.wait_for_pod(ns, "init", timeout=90)
        uid = running["metadata"]["uid"]
        log = kubelet_log.read_text(errors="replace")
        assert "--v=4" in " ".join(_kubelet_argv(node))
        assert any(
            "Evented PLEG: requested pod relist after container termination" in line and uid in line
            for line in log.splitlines()
        ), "no relist request for the init container's exit"
        control_plane.kubectl("delete", "pod", "init", "-n", ns, "--wait=false")
        _wait_gone(control_plane, ns, "init")
    finally:
        control_plane.delete_namespace(ns)
        node.restart_kubelet()
    assert "--v=1" in " ".join(_kubelet_argv(node))


def _kubelet_argv(node: Node) -> list[str]:
    pid = next(d for d in node.daemons if d.name == "kubelet").pid
    return open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
