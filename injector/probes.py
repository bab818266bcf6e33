"""Probe rewriting: the kubelet probes the agent's status port, the agent probes the app.

With mTLS on inbound traffic the kubelet's plain HTTP/TCP/gRPC probes would fail, so each app
probe becomes ``httpGet`` on the status port at ``/app-health/<container>/<kind>`` and the
original (named ports resolved) goes to the proxy as JSON in ``ISTIO_KUBE_APP_PROBERS``.
``restore_probes`` undoes it from that JSON, which makes re-injection idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson

PROBE_KINDS: tuple[tuple[str, str], ...] = (
    ("readinessProbe", "readyz"),
    ("livenessProbe", "livez"),
    ("startupProbe", "startupz"),
)
_HANDLERS = ("httpGet", "tcpSocket", "grpc")


def prober_path(container: str, kind: str) -> str:
    return f"/app-health/{container}/{kind}"


def _resolve_port(port: Any, container: Mapping[str, Any]) -> Any:
    """A named port becomes its number; an unknown name is kept (the kubelet would fail it too)."""
    if isinstance(port, str) and not (port.isascii() and port.isdigit()):
        for item in container.get("ports") or ():
            if item.get("name") == port:
                return item.get("containerPort")
        return port
    if isinstance(port, str):
        return int(port)
    return port


def _original(probe: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any] | None:
    """The prober entry for one probe, or None for probes we leave alone (exec, none)."""
    entry: dict[str, Any]
    if probe.get("httpGet") is not None:  # a null handler is an absent one
        action = dict(probe["httpGet"])
        action["port"] = _resolve_port(action.get("port"), container)
        entry = {"httpGet": action}
    elif probe.get("tcpSocket") is not None:
        action = dict(probe["tcpSocket"])
        action["port"] = _resolve_port(action.get("port"), container)
        entry = {"tcpSocket": action}
    elif probe.get("grpc") is not None:
        entry = {"grpc": dict(probe["grpc"])}
    else:
        return None
    if "timeoutSeconds" in probe:
        entry["timeoutSeconds"] = probe["timeoutSeconds"]
    return entry


def rewrite_probes(
    container: Mapping[str, Any],
    status_port: int,
    probers: dict[str, Any],
    kinds: tuple[tuple[str, str], ...] = PROBE_KINDS,
) -> dict[str, Any] | None:
    """``container`` with rewritten probes (originals recorded in ``probers``); None if unchanged."""
    name = container.get("name", "")
    out: dict[str, Any] | None = None
    for field, kind in kinds:
        probe = container.get(field)
        if not probe:
            continue
        entry = _original(probe, container)
        if entry is None:
            continue
        path = prober_path(name, kind)
        probers[path] = entry
        rewritten = {k: v for k, v in probe.items() if k not in _HANDLERS}
        http_get: dict[str, Any] = {"path": path, "port": status_port, "scheme": "HTTP"}
        headers = (probe.get("httpGet") or {}).get("httpHeaders")
        if headers:
            http_get["httpHeaders"] = headers
        rewritten["httpGet"] = http_get
        if out is None:
            out = dict(container)
        out[field] = rewritten
    return out


def restore_probes(
    container: Mapping[str, Any], status_port: int, probers: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Undo ``rewrite_probes`` for one container using the recorded originals; None if nothing to undo."""
    name = container.get("name", "")
    out: dict[str, Any] | None = None
    for field, kind in PROBE_KINDS:
        probe = container.get(field)
        if not probe or not isinstance(probe.get("httpGet"), dict):
            continue
        path = prober_path(name, kind)
        action = probe["httpGet"]
        if action.get("path") != path or action.get("port") != status_port or path not in probers:
            continue
        entry = probers[path]
        original = {k: v for k, v in probe.items() if k not in _HANDLERS}
        for handler in _HANDLERS:
            if handler in entry:
                original[handler] = entry[handler]
        if out is None:
            out = dict(container)
        out[field] = original
    return out


def probers_json(probers: Mapping[str, Any]) -> str | None:
    """Istio's ISTIO_KUBE_APP_PROBERS value: compact JSON, keys sorted; None when empty."""
    if not probers:
        return None
    try:
        return orjson.dumps(probers, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # values orjson refuses (64-bit overflow) in hand-written input
        return json.dumps(probers, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def parse_probers(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        body = json.loads(value)
    except (ValueError, RecursionError):  # a nesting deeper than the parser's recursion
        return {}
    return body if isinstance(body, dict) else {}


#: What a native sidecar (user init container, ``restartPolicy: Always``) that starts before the
#: proxy gets rewritten: readiness and liveness. Its startup probe gates the containers after it,
#: the proxy among them: pointed at the agent, it would wait for itself. Started after a native
#: proxy, it gets all three rewritten, like an app container.
EARLY_SIDECAR_KINDS = PROBE_KINDS[:2]


def rewrite_app_probes(
    containers: list[dict[str, Any]], status_port: int, after_proxy: frozenset[str] = frozenset()
) -> tuple[list[dict[str, Any]], dict[str, Any], list[tuple[str, str]]]:
    """Rewrite the probes of the app containers and of the native sidecars (user init
    containers with ``restartPolicy: Always``) given; a native sidecar's startup probe only
    when it is named in ``after_proxy`` (it starts after a running proxy).

    Returns the containers (unchanged ones as they were), the recorded originals, and
    (prober path, port name) for each port no container port names (a warning each).
    """
    probers: dict[str, Any] = {}
    out = []
    for c in containers:
        early = is_native_sidecar(c) and c.get("name") not in after_proxy
        kinds = EARLY_SIDECAR_KINDS if early else PROBE_KINDS
        new = rewrite_probes(c, status_port, probers, kinds)
        out.append(new if new is not None else c)
    unresolved = []
    for path, entry in probers.items():
        port = (entry.get("httpGet") or entry.get("tcpSocket") or {}).get("port")
        if isinstance(port, str):
            unresolved.append((path, port))
    return out, probers, unresolved


def is_native_sidecar(container: Mapping[str, Any]) -> bool:
    """A user init container that keeps running beside the app (Kubernetes native sidecar)."""
    return container.get("restartPolicy") == "Always"
