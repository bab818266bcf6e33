"""Overlay rules for containers and template fragments (strategic-merge-like, for the fields we touch).

Kubernetes merges lists of named things by key (env by name, ports by containerPort,
volumeMounts by mountPath, containers/volumes by name) and replaces other lists; mappings merge
recursively. We follow that, with two choices of our own: a probe that brings its own handler
replaces the probe (two handlers would be invalid), and ``image: auto`` keeps the rendered image.
All functions return new objects and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LIST_KEYS: dict[str, str] = {
    "env": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
}
_PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
_HANDLERS = ("httpGet", "tcpSocket", "grpc", "exec")


def merge_keyed(base: list[Any], over: list[Any], key: str, item_merge: Any = None) -> list[Any]:
    """Items of ``over`` replace (or merge into) same-keyed items of ``base`` in place; new ones append."""
    index = {item.get(key): i for i, item in enumerate(base) if isinstance(item, dict)}
    out = list(base)
    for item in over:
        k = item.get(key) if isinstance(item, dict) else None
        if k is not None and k in index:
            i = index[k]
            out[i] = item_merge(out[i], item) if item_merge else item
        else:
            index[k] = len(out)
            out.append(item)
    return out


def deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if key in out:
                if key in LIST_KEYS and isinstance(out[key], list) and isinstance(value, list):
                    merge = overlay_container if key in ("containers", "initContainers") else deep_merge
                    out[key] = merge_keyed(out[key], value, LIST_KEYS[key], merge)
                else:
                    out[key] = deep_merge(out[key], value)
            else:
                out[key] = value
        return out
    return over


def overlay_container(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """The rendered container ``base`` with the user's ``over`` laid on top, field by field."""
    out = dict(base)
    for key, value in over.items():
        if key == "image" and value == "auto":
            continue
        if key in out and key in LIST_KEYS and isinstance(value, list) and isinstance(out[key], list):
            out[key] = merge_keyed(out[key], value, LIST_KEYS[key], deep_merge)
        elif key in _PROBES and isinstance(value, dict) and any(h in value for h in _HANDLERS):
            out[key] = value
        elif key in out:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def overlay_user_container(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """The pod's own container ``over`` (e.g. its istio-proxy) laid over our rendered ``base``,
    its keyed lists (env, ports, volumeMounts) in the order Istio's injection gives them.

    Istio lays the template over the pod (strategic merge, the pod's list as the original), then
    the pod's container over that result again: a variable of the user's that we do not render
    goes before the next one the user also overrides, not at the end. The order matters to
    ``$(VAR)`` references. Values are overlay_container's.
    """
    out = overlay_container(base, over)
    for key, value in over.items():
        merged, rendered = out.get(key), base.get(key)
        if key in LIST_KEYS and all(isinstance(x, list) for x in (value, rendered, merged)):
            out[key] = _in_istio_order(merged, rendered, value, LIST_KEYS[key])
    return out


def _in_istio_order(merged: list[Any], rendered: list[Any], user: list[Any], key: str) -> list[Any]:
    keys = [_key_of(i, key) for i in merged]
    by_key = dict(zip(keys, merged, strict=True))
    user_keys = [_key_of(i, key) for i in user]
    if None in by_key or len(by_key) != len(keys) or len(set(user_keys)) != len(user_keys):
        return merged  # unkeyed or repeated items: leave overlay_container's order
    order = smp_order(smp_order(user_keys, [_key_of(i, key) for i in rendered]), user_keys)
    return [by_key[k] for k in order] if len(order) == len(keys) else merged


def _key_of(item: Any, key: str) -> Any:
    value = item.get(key) if isinstance(item, dict) else None
    return value if isinstance(value, (str, int)) else None


def smp_order(original: list[Any], patch: list[Any]) -> list[Any]:
    """The order of a merge-keyed list after a strategic merge of ``patch`` into ``original``
    (Kubernetes' rule, by key): the patch's items in its order, the original's other items
    inserted before the first patch item that comes after them in ``original``."""
    where = {k: i for i, k in reversed(list(enumerate(original)))}
    in_patch = set(patch)
    left = [k for k in original if k not in in_patch]
    out: list[Any] = []
    i = j = 0
    while i < len(left) and j < len(patch):
        right_at = where.get(patch[j])
        if right_at is not None and where[left[i]] < right_at:
            out.append(left[i])
            i += 1
        else:
            out.append(patch[j])
            j += 1
    return out + left[i:] + patch[j:]


def named(items: Any) -> list[dict[str, Any]]:
    """The mapping items of a pod-spec list (containers, volumes, ...); anything else is dropped."""
    return [i for i in items or () if isinstance(i, dict)]
