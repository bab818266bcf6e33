"""Kubernetes Events for rejected pods and warned skips, posted off the admission hot path.

The webhook only enqueues (``put_nowait`` on a bounded queue: a full queue drops the event and
counts it). A daemon thread resolves the owning workload (Pod -> ReplicaSet -> Deployment,
Pod -> Job -> CronJob) and posts a ``v1`` Event on it, because the rejected pod never exists
and the workload is where a user looks (``kubectl describe deployment``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import queue
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from injector.metrics import InjectorMetrics

log = logging.getLogger("injector.events")

COMPONENT = "mesh-injector"
#: Owner kinds whose own controller we follow one step further up.
_OWNER_GROUPS = {"ReplicaSet": ("apps", "v1", "replicasets"), "Job": ("batch", "v1", "jobs")}


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str = ""


@dataclass(frozen=True)
class PendingEvent:
    namespace: str
    pod: Mapping[str, Any]  # the pod as submitted (it may never exist)
    event_type: str  # Warning | Normal
    reason: str
    message: str


def api_client(kubeconfig: str | None) -> Any:
    """A kubernetes ApiClient from a kubeconfig path, in-cluster credentials, or None if neither."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    return None


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with ``controller: true`` (or the only one), if any."""
    meta = obj.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, Mapping) else None
    if not isinstance(refs, list) or not refs:
        return None
    for ref in refs:
        if isinstance(ref, Mapping) and ref.get("controller"):
            return ref
    return refs[0] if len(refs) == 1 and isinstance(refs[0], Mapping) else None


def owning_workload(api: Any, namespace: str, pod: Mapping[str, Any]) -> ObjectRef:
    """Walk controller references to the top-level workload (one API read per step)."""
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    ref = controller_of(pod)
    if ref is None:
        return ObjectRef("v1", "Pod", namespace, str(meta.get("name") or meta.get("generateName") or ""),
                         str(meta.get("uid") or ""))
    current = ObjectRef(str(ref.get("apiVersion", "")), str(ref.get("kind", "")), namespace,
                        str(ref.get("name", "")), str(ref.get("uid", "")))
    for _ in range(3):
        step = _OWNER_GROUPS.get(current.kind)
        if step is None or api is None:
            break
        group, version, plural = step
        try:
            from kubernetes import client

            owner = client.CustomObjectsApi(api).get_namespaced_custom_object(
                group, version, namespace, plural, current.name
            )
        except Exception:  # not found / forbidden: the step we know is the best answer
            break
        up = controller_of(owner)
        if up is None:
            break
        current = ObjectRef(str(up.get("apiVersion", "")), str(up.get("kind", "")), namespace,
                            str(up.get("name", "")), str(up.get("uid", "")))
    return current


def event_body(target: ObjectRef, event: PendingEvent, *, now: dt.datetime | None = None) -> dict[str, Any]:
    when = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    base = (target.name or "pod").rstrip("-.")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{base}.{uuid.uuid4().hex[:16]}", "namespace": target.namespace},
        "involvedObject": {"apiVersion": target.api_version, "kind": target.kind, "name": target.name,
                           "namespace": target.namespace, **({"uid": target.uid} if target.uid else {})},
        "reason": event.reason,
        "message": event.message[:1024],
        "type": event.event_type,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": 1,
    }


class EventRecorder:
    """Bounded queue + one daemon thread. ``record`` never blocks and never raises."""

    def __init__(self, api: Any, metrics: InjectorMetrics, *, max_queue: int = 256) -> None:
        self.api = api
        self.metrics = metrics
        self.queue: queue.Queue[PendingEvent | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.api is not None

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mesh-injector-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self.queue.put(None, timeout=timeout)
            self._thread.join(timeout)
            self._thread = None

    def record(self, event: PendingEvent) -> None:
        if not self.enabled:
            return
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.metrics.events.inc("dropped")

    def _run(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                target = owning_workload(self.api, item.namespace, item.pod)
                core.create_namespaced_event(item.namespace, event_body(target, item))
                self.metrics.events.inc("sent")
            except Exception as exc:
                self.metrics.events.inc("failed")
                log.warning("could not post event", extra={"namespace": item.namespace, "error": str(exc)})
