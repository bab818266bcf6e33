"""The agent's Kubernetes side: the plugin's kubeconfig, the node taint, and pod repair.

Standard library HTTP on purpose: the agent idles on every node for the node's lifetime, and the
``kubernetes`` client costs ~40 MiB RSS and half a second of imports for five REST calls.
Decisions (is this pod broken? what is the new taint list? what does the kubeconfig say?) are
pure functions; ``KubeApi`` only moves JSON.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

NOT_READY_TAINT_KEY = "cni.istio.io/not-ready"
VALIDATION_CONTAINER = "istio-validation"
REPAIR_LABEL = "cni.istio.io/uninitialized"
STATUS_ANNOTATION = "sidecar.istio.io/status"
EVENT_SOURCE = "mesh-cni"


# --- kubeconfig ---------------------------------------------------------------------------------


def api_server_url(host: str, port: str | int, scheme: str = "https") -> str:
    """``https://host:port`` with IPv6 literals bracketed (KUBERNETES_SERVICE_HOST may be one)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def render_kubeconfig(*, server: str, token: str, ca_pem: bytes | None, insecure: bool = False) -> bytes:
    """The plugin's kubeconfig as JSON (valid YAML too): the stdlib-only plugin parses it with ``json``.

    The CA and token are embedded, not referenced: the plugin runs on the host, where the
    agent's mounted service-account files do not exist.
    """
    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    body = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "mesh-cni", "user": {"token": token.strip()}}],
        "contexts": [{"name": "mesh-cni", "context": {"cluster": "local", "user": "mesh-cni"}}],
        "current-context": "mesh-cni",
    }
    return (json.dumps(body, indent=2) + "\n").encode()


# --- pure decisions -----------------------------------------------------------------------------


def taints_without_not_ready(taints: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The node's taints minus ours, or None when there is nothing to remove."""
    taints = taints or []
    kept = [t for t in taints if t.get("key") != NOT_READY_TAINT_KEY]
    return None if len(kept) == len(taints) else kept


@dataclass(frozen=True)
class BrokenPod:
    """An injected pod that started without its traffic redirect, and the evidence."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    exit_code: int
    message: str


def broken_pod(pod: Mapping[str, Any], exit_codes: frozenset[int] | None = None) -> BrokenPod | None:
    """A pod whose ``istio-validation`` init container failed: the CNI redirect was not in place.

    Only injected pods (status annotation) count; pods being deleted are left alone. A
    validation that failed once and then passed (current state: terminated with 0) is fine.
    ``exit_codes``: only these codes mean "no redirect" (None: any non-zero code).
    """
    meta = pod.get("metadata") or {}
    if STATUS_ANNOTATION not in (meta.get("annotations") or {}):
        return None
    if meta.get("deletionTimestamp"):
        return None
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if status.get("name") != VALIDATION_CONTAINER:
            continue
        current = (status.get("state") or {}).get("terminated")
        if current and int(current.get("exitCode", 0)) == 0:
            return None
        terminated = current or (status.get("lastState") or {}).get("terminated")
        if not terminated:
            return None
        code = int(terminated.get("exitCode", 0))
        if code == 0 or (exit_codes is not None and code not in exit_codes):
            return None
        return BrokenPod(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
            exit_code=code,
            message=(
                f"init container {VALIDATION_CONTAINER} exited {code}: the pod started "
                "without its traffic redirect (was mesh-cni missing from the node's CNI chain?)"
            ),
        )
    return None


def needs_label(pod: Mapping[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(REPAIR_LABEL) != "true"


def label_patch(pod: BrokenPod, has_labels: bool) -> list[dict[str, Any]]:
    """JSON patch with uid/resourceVersion preconditions (``test`` ops): a changed pod is not touched."""
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/uid", "value": pod.uid},
        {"op": "test", "path": "/metadata/resourceVersion", "value": pod.resource_version},
    ]
    if not has_labels:
        ops.append({"op": "add", "path": "/metadata/labels", "value": {}})
    ops.append({"op": "add", "path": "/metadata/labels/" + REPAIR_LABEL.replace("/", "~1"), "value": "true"})
    return ops


def repair_event(pod: BrokenPod, *, action: str, node: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """A core/v1 Event on the pod saying what we did and why."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    verb = {"label": f"labelled {REPAIR_LABEL}=true", "delete": "deleted it so it is recreated"}[action]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{pod.name}.", "namespace": pod.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": pod.namespace,
            "name": pod.name,
            "uid": pod.uid,
            "resourceVersion": pod.resource_version,
        },
        "reason": "UnmeshedPodRepaired",
        "message": f"{pod.message}; mesh-cni {verb}",
        "type": "Warning",
        "source": {"component": EVENT_SOURCE, "host": node},
        "reportingComponent": EVENT_SOURCE,
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


# --- I/O shell ----------------------------------------------------------------------------------


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"API answered {status}: {body[:300]}")


@dataclass
class KubeApi:
    """Minimal JSON-over-HTTPS client with a bearer token re-read on every call (it rotates)."""

    server: str
    token_file: str
    ca_file: str | None
    timeout_s: float = 10.0

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        url = urllib.parse.urlsplit(self.server)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        if url.scheme == "http":
            return http.client.HTTPConnection(host, port, timeout=timeout)
        context = (
            ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()
        )
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        with open(self.token_file) as handle:
            token = handle.read().strip()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> dict[str, Any]:
        conn = self._connection(self.timeout_s)
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=payload, headers=self._headers(content_type if payload else None))
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        if response.status >= 400:
            raise ApiError(response.status, text)
        return json.loads(text) if text else {}

    def watch(self, path: str, *, timeout_s: int = 60) -> Iterator[dict[str, Any]]:
        """Stream watch events (one JSON object per line) until the server ends the watch."""
        sep = "&" if "?" in path else "?"
        conn = self._connection(timeout_s + 10)
        try:
            conn.request(
                "GET", f"{path}{sep}watch=true&timeoutSeconds={timeout_s}", headers=self._headers(None)
            )
            response = conn.getresponse()
            if response.status >= 400:
                raise ApiError(response.status, response.read().decode())
            while True:
                line = response.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

    # --- operations the agent performs (and RBAC must allow) ---

    def remove_not_ready_taint(self, node: str) -> bool:
        """Drop our taint from ``node`` only; a ``test`` op makes a concurrent edit fail, not vanish."""
        current = self.request("GET", f"/api/v1/nodes/{node}")
        taints = (current.get("spec") or {}).get("taints")
        kept = taints_without_not_ready(taints)
        if kept is None:
            return False
        patch = [
            {"op": "test", "path": "/spec/taints", "value": taints},
            {"op": "replace", "path": "/spec/taints", "value": kept},
        ]
        self.request("PATCH", f"/api/v1/nodes/{node}", patch, content_type="application/json-patch+json")
        return True

    def pods_on_node(self, node: str) -> tuple[list[dict[str, Any]], str]:
        selector = urllib.parse.quote(f"spec.nodeName={node}")
        listing = self.request("GET", f"/api/v1/pods?fieldSelector={selector}")
        return listing.get("items") or [], (listing.get("metadata") or {}).get("resourceVersion", "")

    def watch_pods_on_node(
        self, node: str, resource_version: str, timeout_s: int
    ) -> Iterator[dict[str, Any]]:
        selector = urllib.parse.quote(f"spec.nodeName={node}")
        return self.watch(
            f"/api/v1/pods?fieldSelector={selector}&resourceVersion={resource_version}"
            "&allowWatchBookmarks=true",
            timeout_s=timeout_s,
        )

    def label_pod(self, pod: BrokenPod, has_labels: bool) -> None:
        self.request(
            "PATCH",
            f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}",
            label_patch(pod, has_labels),
            content_type="application/json-patch+json",
        )

    def delete_pod(self, pod: BrokenPod) -> None:
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": pod.uid, "resourceVersion": pod.resource_version},
        }
        self.request("DELETE", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}", options)

    def post_event(self, event: dict[str, Any]) -> None:
        namespace = event["metadata"]["namespace"]
        self.request("POST", f"/api/v1/namespaces/{namespace}/events", event)


def repair_pod(
    api: KubeApi, pod: Mapping[str, Any], *, mode: str, node: str, exit_codes: frozenset[int] | None = None
) -> str | None:
    """Label or delete one pod if it is broken; returns what was done, or None.

    A pod that changed since ``pod`` was read makes the API answer 409/422 (precondition) and is
    left as it is: the watch will deliver its new version and we decide again.
    """
    broken = broken_pod(pod, exit_codes)
    if broken is None or mode == "off":
        return None
    if mode == "label" and not needs_label(pod):
        return None
    try:
        if mode == "delete":
            api.delete_pod(broken)
        else:
            api.label_pod(broken, bool((pod.get("metadata") or {}).get("labels")))
    except ApiError as err:
        if err.status in (404, 409, 422):
            return None
        raise
    api.post_event(repair_event(broken, action=mode, node=node))
    return mode
