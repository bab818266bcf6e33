"""Deleting meshed pods on the real node leaves nothing behind.

The kubelet stops each sandbox, containerd calls CNI DEL through the chain (bridge + host-local,
then ours), and afterwards: the pods' network namespaces (and the rules in them) are gone, the
host-local store holds none of their IPs, and our install is byte for byte what it was before
the pods (conflist, launcher, runtime, state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root
from tests.e2e.mesh import (
    Installer,
    Webhook,
    app_pod,
    create,
    force_delete_pods,
    netns_tables,
    wait_for,
    wait_ready,
)
from tests.install.conftest import snapshot

pytestmark = [pytest.mark.node, pytest.mark.root]


def test_deleted_pods_leave_no_rules_ips_or_files(
    control_plane: Any, node: Any, mesh: Installer, webhook: Webhook
) -> None:
    require_root()
    ours = (node.cni_conf_dir, node.cni_bin_dir, mesh.runtime_dir, mesh.state_dir)
    installed = snapshot(*ours)
    ipam = node.workdir / "cni" / "ipam" / "mesh-testbed"
    mesh_ns, plain_ns = webhook.namespace(meshed=True), webhook.namespace(meshed=False)
    pods = [(mesh_ns, "meshed-a"), (mesh_ns, "meshed-b"), (plain_ns, "plain")]
    try:
        for ns, name in pods:
            create(control_plane, ns, app_pod(name))
        seen: dict[tuple[str, str], tuple[str, Path]] = {}
        for ns, name in pods:
            ip = wait_ready(control_plane, ns, name)["status"]["podIP"]
            seen[(ns, name)] = (ip, node.pod_netns(ns, name))
            assert (ipam / ip).exists(), f"host-local reserved {ip} for {name}"
        for ns, name in pods[:2]:
            assert "table inet mesh_cni" in netns_tables(seen[(ns, name)][1])

        for ns in (mesh_ns, plain_ns):
            force_delete_pods(control_plane, ns)

        def released() -> bool:
            return not any((ipam / ip).exists() or netns.exists() for ip, netns in seen.values())

        wait_for("the kubelet to tear down the sandboxes (CNI DEL)", released, timeout=90, interval=0.5)
        for ns, name in pods:
            dels = [line for line in mesh.plugin_lines(f" {ns}/{name} ") if " DEL " in line]
            assert dels, f"containerd called our DEL for {ns}/{name}"
        for ns, name in pods[:2]:
            removed = [line for line in mesh.plugin_lines(f" {ns}/{name} ") if "table removed" in line]
            gone = [
                line for line in mesh.plugin_lines(f" {ns}/{name} ") if "is gone: nothing to remove" in line
            ]
            assert removed or gone, f"our table in {name}'s netns removed (or went with the netns)"

        assert snapshot(*ours) == installed, "pods came and went: our install is unchanged"
    finally:
        for ns in (mesh_ns, plain_ns):
            force_delete_pods(control_plane, ns)
            control_plane.delete_namespace(ns)
