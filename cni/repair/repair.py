"""Pods that started without their redirect: found from the validation init container's exit,
then labelled ``cni.istio.io/uninitialized=true`` or deleted (so their owner recreates them on a
node where the plugin is chained), each with an Event saying why.

Decisions are pure functions over pod JSON; the API calls carry uid/resourceVersion
preconditions so a pod that changed since it was read is left for the next watch event.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cni import annotations as vocabulary
from cni.kube import ApiError, KubeApi

REPAIR_LABEL = "cni.istio.io/uninitialized"
STATUS_ANNOTATION = vocabulary.STATUS
VALIDATION_CONTAINER = vocabulary.VALIDATION_CONTAINER
EVENT_SOURCE = "mesh-cni"
MODES = ("off", "label", "delete")


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


# --- API calls (what RBAC must allow) -------------------------------------------------------------


def pods_on_node(api: KubeApi, node: str) -> tuple[list[dict[str, Any]], str]:
    selector = urllib.parse.quote(f"spec.nodeName={node}")
    listing = api.request("GET", f"/api/v1/pods?fieldSelector={selector}")
    return listing.get("items") or [], (listing.get("metadata") or {}).get("resourceVersion", "")


def watch_pods_on_node(api: KubeApi, node: str, resource_version: str, timeout_s: int
                       ) -> Iterator[dict[str, Any]]:
    selector = urllib.parse.quote(f"spec.nodeName={node}")
    return api.watch(
        f"/api/v1/pods?fieldSelector={selector}&resourceVersion={resource_version}&allowWatchBookmarks=true",
        timeout_s=timeout_s,
    )


def label_pod(api: KubeApi, pod: BrokenPod, has_labels: bool) -> None:
    api.request(
        "PATCH",
        f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}",
        label_patch(pod, has_labels),
        content_type="application/json-patch+json",
    )


def delete_pod(api: KubeApi, pod: BrokenPod) -> None:
    options = {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "preconditions": {"uid": pod.uid, "resourceVersion": pod.resource_version},
    }
    api.request("DELETE", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}", options)


def post_event(api: KubeApi, event: dict[str, Any]) -> None:
    api.request("POST", f"/api/v1/namespaces/{event['metadata']['namespace']}/events", event)


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
            delete_pod(api, broken)
        else:
            label_pod(api, broken, bool((pod.get("metadata") or {}).get("labels")))
    except ApiError as err:
        if err.status in (404, 409, 422):
            return None
        raise
    post_event(api, repair_event(broken, action=mode, node=node))
    return mode
