"""Events never slow admission: the queue is bounded and a full queue drops (and counts) events."""

from __future__ import annotations

import time

from injector.events import EventRecorder, ObjectRef, PendingEvent, event_body, owning_workload
from injector.metrics import InjectorMetrics


def pending(i: int) -> PendingEvent:
    pod = {"metadata": {"generateName": f"web-{i}-", "ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc", "uid": "u", "controller": True}]}}
    return PendingEvent("shop", pod, "Warning", "InjectionRejected", "bad annotation")


def test_full_queue_drops_without_blocking() -> None:
    metrics = InjectorMetrics()
    # The worker is not started, so nothing drains the queue; the API object is never used.
    recorder = EventRecorder(api=object(), metrics=metrics, max_queue=3)
    started = time.perf_counter()
    for i in range(50):
        recorder.record(pending(i))
    assert time.perf_counter() - started < 0.5
    assert recorder.queue.qsize() == 3
    assert metrics.events.get("dropped") == 47
    assert 'mesh_injector_events_total{result="dropped"} 47' in metrics.render()


def test_without_api_access_nothing_is_queued() -> None:
    recorder = EventRecorder(api=None, metrics=InjectorMetrics())
    recorder.record(pending(1))
    assert recorder.queue.qsize() == 0 and not recorder.enabled


def test_event_names_the_owner_when_it_cannot_be_resolved_further() -> None:
    target = owning_workload(None, "shop", pending(1).pod)  # no API: stop at the first owner
    assert target == ObjectRef("apps/v1", "ReplicaSet", "shop", "web-abc", "u")
    bare = owning_workload(None, "shop", {"metadata": {"name": "solo"}})
    assert (bare.kind, bare.name) == ("Pod", "solo")
    body = event_body(target, pending(1))
    assert body["involvedObject"]["kind"] == "ReplicaSet" and body["type"] == "Warning"
    assert body["metadata"]["name"].startswith("web-abc.")
