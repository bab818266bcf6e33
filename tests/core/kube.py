"""Strict schema validation of Kubernetes objects (kubernetes-validate), shared by the core tests."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

#: A recent Kubernetes version whose schema the output must satisfy (native sidecars included).
KUBE_VERSION = "1.33.0"


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Strict validation errors (first line each); a List is checked item by item."""
    if obj.get("kind") == "List":
        return [e for item in obj.get("items") or () for e in schema_errors(item)]
    if obj.get("kind") == "DeploymentConfig":  # OpenShift's, not in Kubernetes' schema: its pod template
        meta = {"name": (obj.get("metadata") or {}).get("name") or "dc"}
        template = (obj.get("spec") or {}).get("template")
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": template}
        return schema_errors(pod_template)
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = "/".join(str(p) for p in getattr(err, "path", ()) or ())
        return [f"{obj.get('kind')} {path}: {str(err).splitlines()[0]}"]
    return []
