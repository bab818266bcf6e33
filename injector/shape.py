"""Shape checks for the parts of an object the core reads, so malformed input gets a reason, not a crash.

Objects from the API server are always well-typed; files given to the CLI or the dry-run
endpoint may not be. Only what the core actually reads is checked, so the cost stays small
(a 2,000-entry env list is not walked).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
_HANDLERS = ("httpGet", "tcpSocket", "grpc", "exec")


def _string_map(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"{where} must be a mapping"
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            return f"{where} must map strings to strings ({key!r} does not)"
    return None


def _container(c: Any, where: str) -> str | None:
    if not isinstance(c, dict):
        return f"{where} must be a mapping"
    if not isinstance(c.get("name"), str):
        return f"{where}.name must be a string"
    where = f"{where} ({c['name']})"
    for key in ("ports", "env", "volumeMounts"):
        items = c.get(key)
        if items is not None and not isinstance(items, list):
            return f"{where}.{key} must be a list"
    for port in c.get("ports") or ():
        if not isinstance(port, dict):
            return f"{where}.ports items must be mappings"
    for key in ("securityContext", "resources", "lifecycle"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            return f"{where}.{key} must be a mapping"
    for key in _PROBES:
        probe = c.get(key)
        if probe is None:
            continue
        if not isinstance(probe, dict):
            return f"{where}.{key} must be a mapping"
        for handler in _HANDLERS:
            if probe.get(handler) is not None and not isinstance(probe[handler], dict):
                return f"{where}.{key}.{handler} must be a mapping"
    return None


def pod_shape_problem(pod: Mapping[str, Any]) -> str | None:
    """A message for the first part of the pod (or pod template) that has the wrong shape, else None."""
    meta = pod.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return "metadata must be a mapping"
    meta = meta or {}
    for key in ("labels", "annotations"):
        problem = _string_map(meta.get(key), f"metadata.{key}")
        if problem:
            return problem
    for key in ("name", "generateName", "namespace"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"metadata.{key} must be a string"
    owners = meta.get("ownerReferences")
    if owners is not None and (not isinstance(owners, list) or not all(isinstance(o, dict) for o in owners)):
        return "metadata.ownerReferences must be a list of mappings"
    spec = pod.get("spec")
    if spec is not None and not isinstance(spec, dict):
        return "spec must be a mapping"
    spec = spec or {}
    for key in ("containers", "initContainers", "volumes", "imagePullSecrets"):
        items = spec.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            return f"spec.{key} must be a list"
        for i, item in enumerate(items):
            if key in ("containers", "initContainers"):
                problem = _container(item, f"spec.{key}[{i}]")
                if problem:
                    return problem
            elif not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return f"spec.{key}[{i}] must be a mapping with a string name"
    if spec.get("securityContext") is not None and not isinstance(spec["securityContext"], dict):
        return "spec.securityContext must be a mapping"
    return None
