"""The real images, built from Dockerfile.cni / Dockerfile.injector by buildah (no Docker engine),
run on the node: the CNI image installs our plugin as the DaemonSet's container would (host
dirs mounted at the same paths), an injected-by-hand pod's `istio-validation` from that image
passes through the plugin it installed, and its `mesh-cni uninstall` restores the conflist byte
for byte. The injector image starts its CLI and imports the server.

Opt-in: build the archives with tests/e2e/build_images_buildah.sh (debootstrap + buildah, a few
minutes, needs the Debian mirror and PyPI) and point MESH_BUILDAH_IMAGES at their directory.
Without it the test is not collected (tests/e2e/conftest.py): the script-built images
(tests/testbed/images.py) are the tested path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_root
from tests.e2e.mesh import Installer, container_status, create, force_delete_pods, get_pod, wait_for
from tests.install.conftest import snapshot

pytestmark = [pytest.mark.node, pytest.mark.root]

CNI_IMAGE = "docker.io/mesh-injector/mesh-cni:buildah"
INJECTOR_IMAGE = "docker.io/mesh-injector/mesh-injector:buildah"
STATUS = json.dumps({"initContainers": ["istio-validation"], "containers": ["istio-proxy"]})
LOCKED_DOWN = {
    "runAsUser": 1337,
    "runAsGroup": 1337,
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _archives() -> Path:
    directory = os.environ.get("MESH_BUILDAH_IMAGES")
    if not directory:
        pytest.skip("set MESH_BUILDAH_IMAGES to the output of tests/e2e/build_images_buildah.sh")
    path = Path(directory)
    for name in ("mesh-cni-buildah.tar", "mesh-injector-buildah.tar"):
        require((path / name).exists(), f"{path / name} (tests/e2e/build_images_buildah.sh)")
    return path


def _host_pod(name: str, argv: list[str], mounts: list[Path]) -> dict[str, Any]:
    """A root pod with host dirs mounted at their own paths, as the CNI DaemonSet mounts them."""
    volumes = [{"name": f"v{i}", "hostPath": {"path": str(p)}} for i, p in enumerate(mounts)]
    container = {
        "name": "main",
        "image": CNI_IMAGE,
        "imagePullPolicy": "Never",
        "command": argv,
        "securityContext": {"runAsUser": 0},
        "volumeMounts": [{"name": f"v{i}", "mountPath": str(p)} for i, p in enumerate(mounts)],
    }
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [container],
            "volumes": volumes}  # fmt: skip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _succeeded(plane: Any, ns: str, name: str) -> str:
    def done() -> dict[str, Any] | None:
        pod = get_pod(plane, ns, name)
        phase = pod["status"].get("phase")
        assert phase != "Failed", plane.kubectl("logs", "-n", ns, name, check=False).stdout
        return pod if phase == "Succeeded" else None

    wait_for(f"pod {name} Succeeded", done, timeout=90)
    return plane.kubectl("logs", "-n", ns, name).stdout


def test_buildah_built_images_install_validate_and_uninstall_on_the_node(
    control_plane: Any, node: Any, installer: Installer, tmp_path: Path
) -> None:
    require_root()
    archives = _archives()
    for name in ("mesh-cni-buildah.tar", "mesh-injector-buildah.tar"):
        node.import_image(archives / name)
    installer.stop()  # one installer at a time on the node; `mesh` restarts the session's
    before = snapshot(node.cni_conf_dir, node.cni_bin_dir)
    host = tmp_path / "host"
    host.mkdir()
    mounts = [node.cni_bin_dir, node.cni_conf_dir, host]
    flags = [
        "--cni-bin-dir", str(node.cni_bin_dir), "--cni-net-dir", str(node.cni_conf_dir),
        "--runtime-dir", str(host / "opt-mesh-cni"), "--state-dir", str(host / "state"),
        "--kubeconfig", str(host / "state" / "kubeconfig"), "--health-port", "-1",
        "--plugin-log-file", str(host / "plugin.log"),
        "--plugin-extra-json", json.dumps({"kubeconfig": ""}),
    ]  # fmt: skip
    ns = control_plane.create_namespace(prefix="buildah")
    try:
        create(control_plane, ns, _host_pod("install", ["mesh-cni", "install", "--once", *flags], mounts))
        assert "install valid" in _succeeded(control_plane, ns, "install")
        plugins = json.loads(node.primary_conflist.read_bytes())["plugins"]
        assert [p["type"] for p in plugins] == ["bridge", "mesh-cni"]

        validation = {
            "name": "istio-validation",
            "image": CNI_IMAGE,
            "imagePullPolicy": "Never",
            "command": ["mesh-cni", "validate"],
            "securityContext": LOCKED_DOWN,
        }
        app = {
            "name": "app",
            "image": INJECTOR_IMAGE,
            "imagePullPolicy": "Never",
            "command": [
                "sh",
                "-c",
                "python -c 'import injector.server' && mesh-injector --help && exec sleep 3600",
            ],
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "meshed", "annotations": {"sidecar.istio.io/status": STATUS}},
            "spec": {"terminationGracePeriodSeconds": 1, "initContainers": [validation], "containers": [app]},
        }
        create(control_plane, ns, pod)
        node.wait_for_pod(ns, "meshed", timeout=90)
        assert (
            container_status(get_pod(control_plane, ns, "meshed"), "istio-validation")["state"]["terminated"][
                "exitCode"
            ]
            == 0
        )
        logs = control_plane.kubectl("logs", "-n", ns, "meshed", "-c", "istio-validation").stdout
        assert "redirect in place" in logs
        assert "redirect programmed" in (host / "plugin.log").read_text()
        wait_for("the injector image's CLI", lambda: "usage: mesh-injector" in control_plane.kubectl(
            "logs", "-n", ns, "meshed", "-c", "app").stdout, timeout=30)  # fmt: skip

        create(control_plane, ns, _host_pod("uninstall", ["mesh-cni", "uninstall", *flags], mounts))
        assert "uninstalled mesh-cni" in _succeeded(control_plane, ns, "uninstall")
        assert snapshot(node.cni_conf_dir, node.cni_bin_dir) == before
    finally:
        force_delete_pods(control_plane, ns)
        control_plane.delete_namespace(ns)
