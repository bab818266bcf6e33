"""Our installer chains the plugin into containerd's conflist; containerd calls it on every pod
start, and the pod's annotations reach it through runtimeConfig, with no API call on that path.

The installed entry has no kubeconfig (see tests.e2e.mesh.Installer): the plugin could not ask
the API server even if it wanted to, and it fails a pod's ADD when the runtime passes no
annotations and it has no kubeconfig. So an injected pod whose redirect is programmed proves the
annotations came from the runtime. The plugin logs (debug) the API fallback when it takes it;
no such line may appear.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.conftest import require_root
from tests.e2e.mesh import Installer, Webhook, app_pod, create, force_delete_pods, wait_for, wait_ready

pytestmark = [pytest.mark.node, pytest.mark.root]


def test_installer_chains_our_plugin_last_in_the_conflist_containerd_uses(node: Any, mesh: Installer) -> None:
    require_root()
    configs = sorted(p.name for p in node.cni_conf_dir.iterdir() if p.suffix in (".conflist", ".conf"))
    assert configs[0] == node.primary_conflist.name, "containerd uses the lexically first file"
    body = json.loads(node.primary_conflist.read_bytes())
    assert [p["type"] for p in body["plugins"]] == ["bridge", "mesh-cni"]
    entry = body["plugins"][-1]
    assert entry["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    assert entry["kubeconfig"] == "", "the plugin gets no way to reach the API server"
    launcher = node.cni_bin_dir / "mesh-cni"
    assert os.access(launcher, os.X_OK)
    assert launcher.read_bytes().startswith(f"#!{mesh.runtime_dir}/".encode()), "runs the bundled Python"


def test_containerd_calls_the_plugin_on_every_pod_start_with_runtime_annotations(
    control_plane: Any, node: Any, mesh: Installer, webhook: Webhook
) -> None:
    require_root()
    plain_ns, mesh_ns = webhook.namespace(meshed=False), webhook.namespace(meshed=True)
    try:
        pods = [(plain_ns, "plain-1"), (plain_ns, "plain-2"), (mesh_ns, "meshed-1")]
        for ns, name in pods:
            create(control_plane, ns, app_pod(name))
        for ns, name in pods:
            wait_ready(control_plane, ns, name)

        def adds(ns: str, name: str) -> list[str]:
            return [line for line in mesh.plugin_lines(f" {ns}/{name} ") if " ADD " in line]

        for ns, name in pods:
            lines = wait_for(f"the plugin's ADD line for {ns}/{name}", lambda n=ns, p=name: adds(n, p), 10)
            assert len(lines) == 1, f"one ADD per pod start (one sandbox): {lines}"
        skipped = adds(plain_ns, "plain-1")[0]
        assert "not redirecting: pod has no sidecar.istio.io/status annotation" in skipped
        meshed_line = adds(mesh_ns, "meshed-1")[0]
        assert "redirect programmed in " in meshed_line, meshed_line
        # containerd's plugin process handed the pod to the resident node agent, as on a DaemonSet.
        assert mesh.node_agent is not None and f"mesh-cni[{mesh.node_agent.pid}]" in meshed_line
        # Never on this path: the plugin's fallback to the API server (a debug line) or an error.
        assert mesh.plugin_lines("asking the API server") == []
        assert [line for line in mesh.plugin_lines(" ERROR ")] == []
        print("\n".join(line for ns, name in pods for line in adds(ns, name)))
    finally:
        for ns in (plain_ns, mesh_ns):
            force_delete_pods(control_plane, ns)
            control_plane.delete_namespace(ns)
