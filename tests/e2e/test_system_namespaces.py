"""System namespaces are excluded at the webhook, not by our server (issue 15).

The namespaceSelector of every webhook (injector.manifests, from the core's selector
definition) excludes the system namespaces by `kubernetes.io/metadata.name`, the label the API
server sets on every namespace and nobody can change. So the API server never calls us for a
pod in kube-system, even with every label our selectors look for on that namespace: a pod
created there is stored untouched and our server's request log has no line for it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.e2e.mesh import SCOPE_LABEL, Webhook, create, get_pod, wait_for

pytestmark = [pytest.mark.node, pytest.mark.root]

#: Matches no node: the pods need only be admitted, never run.
UNSCHEDULABLE = {"mesh-injector.test/no-such-node": "true"}


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": UNSCHEDULABLE,
            "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"]}],
        },
    }


def test_pod_in_kube_system_never_reaches_our_server(control_plane: Any, webhook: Webhook) -> None:
    registered = control_plane.get_json(
        f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{webhook.name}"
    )
    for hook in registered["webhooks"]:
        exclusion = next(
            e
            for e in hook["namespaceSelector"]["matchExpressions"]
            if e["key"] == "kubernetes.io/metadata.name"
        )
        assert exclusion["operator"] == "NotIn" and "kube-system" in exclusion["values"], hook["name"]

    labels = {SCOPE_LABEL: webhook.scope, "istio-injection": "enabled"}
    control_plane.kubectl(
        "label", "namespace", "kube-system", "--overwrite", *(f"{k}={v}" for k, v in labels.items())
    )
    meshed = webhook.namespace(meshed=True, prefix="sysns")
    name = f"sys-{uuid.uuid4().hex[:6]}"
    try:
        create(control_plane, "kube-system", _pod(name))
        create(control_plane, meshed, _pod(name))  # the same pod where the selectors do match

        def answered() -> list[dict[str, Any]]:
            return [e for e in webhook.server.logs() if e.get("namespace") == meshed and e.get("pod") == name]

        wait_for("our server's line for the pod in the meshed namespace", answered, timeout=30)
        assert "sidecar.istio.io/status" in (get_pod(control_plane, meshed, name)["metadata"]["annotations"])

        stored = get_pod(control_plane, "kube-system", name)
        assert "sidecar.istio.io/status" not in (stored["metadata"].get("annotations") or {})
        assert [c["name"] for c in stored["spec"]["containers"]] == ["app"]
        assert not stored["spec"].get("initContainers")
        calls = [e for e in webhook.server.logs() if e.get("namespace") == "kube-system"]
        assert calls == [], f"the API server called us for kube-system: {calls}"
    finally:
        control_plane.kubectl("label", "namespace", "kube-system", *(f"{k}-" for k in labels), check=False)
        control_plane.kubectl(
            "delete", "pod", name, "-n", "kube-system", "--grace-period=0", "--force", check=False
        )
        control_plane.delete_namespace(meshed)
