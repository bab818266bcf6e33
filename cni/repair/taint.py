"""The node taint ``cni.istio.io/not-ready``: removed from our own node once the install is valid.

Nodes are created with the taint (kubelet ``--register-with-taints``) so nothing is scheduled
before the plugin is chained; the agent's taint worker removes it and re-checks slowly.
"""

from __future__ import annotations

from typing import Any

from cni.kube import KubeApi

NOT_READY_TAINT_KEY = "cni.istio.io/not-ready"


def taints_without_not_ready(taints: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The node's taints minus ours, or None when there is nothing to remove."""
    taints = taints or []
    kept = [t for t in taints if t.get("key") != NOT_READY_TAINT_KEY]
    return None if len(kept) == len(taints) else kept


def remove_not_ready_taint(api: KubeApi, node: str) -> bool:
    """Drop our taint from ``node`` only; a ``test`` op makes a concurrent edit fail, not vanish."""
    current = api.request("GET", f"/api/v1/nodes/{node}")
    taints = (current.get("spec") or {}).get("taints")
    kept = taints_without_not_ready(taints)
    if kept is None:
        return False
    patch = [
        {"op": "test", "path": "/spec/taints", "value": taints},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]
    api.request("PATCH", f"/api/v1/nodes/{node}", patch, content_type="application/json-patch+json")
    return True
