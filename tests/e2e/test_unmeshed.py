"""Nothing runs unmeshed by accident, on the real node.

- A pod in a namespace without istio-injection=enabled is stored untouched by the webhook and
  runs with no redirect: no `inet mesh_cni` table in its network namespace.
- An injected pod that starts while our plugin is not in the chain (the installer stopped and
  uninstalled, as when its DaemonSet pod is gone) does not run: its `istio-validation` init
  container fails with a message that says so, the app and the proxy never start; once the
  installer is back its repair loop acts as configured (here: label, with a Warning Event).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni.repair.repair import REPAIR_LABEL
from tests.conftest import require_root
from tests.e2e.mesh import (
    Installer,
    Webhook,
    app_pod,
    container_status,
    create,
    force_delete_pods,
    get_pod,
    netns_tables,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.node, pytest.mark.root]


def test_pod_in_unlabelled_namespace_runs_untouched_and_unredirected(
    control_plane: Any, node: Any, mesh: Installer, webhook: Webhook
) -> None:
    require_root()
    plain_ns, mesh_ns = webhook.namespace(meshed=False), webhook.namespace(meshed=True)
    try:
        create(control_plane, plain_ns, app_pod("plain"))
        create(control_plane, mesh_ns, app_pod("meshed"))
        plain = wait_ready(control_plane, plain_ns, "plain")
        wait_ready(control_plane, mesh_ns, "meshed")

        assert [c["name"] for c in plain["spec"]["containers"]] == ["app"]
        assert not plain["spec"].get("initContainers")
        assert "sidecar.istio.io/status" not in (plain["metadata"].get("annotations") or {})
        assert "table inet mesh_cni" not in netns_tables(node.pod_netns(plain_ns, "plain"))
        # The same check sees the table where it is: the probe is not blind.
        assert "table inet mesh_cni" in netns_tables(node.pod_netns(mesh_ns, "meshed"))
    finally:
        for ns in (plain_ns, mesh_ns):
            force_delete_pods(control_plane, ns)
            control_plane.delete_namespace(ns)


def _validation_failed(pod: dict[str, Any]) -> dict[str, Any] | None:
    status = container_status(pod, "istio-validation")
    for key in ("state", "lastState"):
        terminated = (status.get(key) or {}).get("terminated")
        if terminated and terminated.get("exitCode", 0) != 0:
            return terminated
    return None


def test_pod_without_redirect_fails_validation_and_is_repaired(
    control_plane: Any, node: Any, installer: Installer, webhook: Webhook
) -> None:
    require_root()
    assert installer.repair == "label"
    ns = webhook.namespace(meshed=True)
    try:
        installer.start()
        assert installer.stop() == 0
        assert not installer.installed(), "SIGTERM uninstalled: our plugin is out of the chain"

        create(control_plane, ns, app_pod("orphan"))
        failed = wait_for(
            "istio-validation to fail",
            lambda: _validation_failed(get_pod(control_plane, ns, "orphan")),
            timeout=90,
        )
        assert failed["exitCode"] == 1, failed
        logs = control_plane.kubectl("logs", "-n", ns, "orphan", "-c", "istio-validation", check=False)
        if not logs.stdout.strip():  # between restarts: the last terminated run
            logs = control_plane.kubectl("logs", "-n", ns, "orphan", "-c", "istio-validation", "--previous")
        assert "traffic is NOT redirected" in logs.stdout, logs
        assert "the CNI plugin did not program this pod's network namespace" in logs.stdout
        pod = get_pod(control_plane, ns, "orphan")
        assert pod["status"]["phase"] == "Pending"
        for name in ("app", "istio-proxy"):
            assert "running" not in container_status(pod, name).get("state", {}), f"{name} must not run"
        assert "table inet mesh_cni" not in netns_tables(node.pod_netns(ns, "orphan"))

        installer.start()  # the DaemonSet is back: install, then the repair loop finds the pod

        def labelled() -> bool:
            labels = get_pod(control_plane, ns, "orphan")["metadata"].get("labels") or {}
            return labels.get(REPAIR_LABEL) == "true"

        wait_for(f"{REPAIR_LABEL}=true on the pod", labelled, timeout=30)
        events = json.loads(control_plane.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
        ours = [e for e in events if (e.get("source") or {}).get("component") == "mesh-cni"]
        assert [e["reason"] for e in ours] == ["UnmeshedPodRepaired"]
        assert "istio-validation exited 1" in ours[0]["message"] and ours[0]["type"] == "Warning"
        print(ours[0]["message"])
    finally:
        force_delete_pods(control_plane, ns)
        control_plane.delete_namespace(ns)
        installer.start()
