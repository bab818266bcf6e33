"""Which pods repair touches, and the requests it sends, as data (the API tests run them for real)."""

from __future__ import annotations

import copy
from typing import Any

from cni.install.kubeconfig import render_kubeconfig
from cni.repair.repair import REPAIR_LABEL, broken_pod, label_patch, repair_event
from cni.repair.taint import NOT_READY_TAINT_KEY, taints_without_not_ready


def _pod(
    state: dict[str, Any], last: dict[str, Any] | None = None, *, injected: bool = True
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "7"}
    if injected:
        meta["annotations"] = {"sidecar.istio.io/status": "{}"}
    status = {"name": "istio-validation", "state": state, "lastState": last or {}}
    return {"metadata": meta, "status": {"initContainerStatuses": [status]}}


FAILED = {"terminated": {"exitCode": 1}}
CRASHLOOP = {"waiting": {"reason": "CrashLoopBackOff"}}


def test_failed_validation_of_an_injected_pod_is_broken() -> None:
    found = broken_pod(_pod(CRASHLOOP, FAILED))
    assert found is not None and (found.uid, found.resource_version, found.exit_code) == ("u1", "7", 1)
    assert broken_pod(_pod(FAILED)) is not None


def test_pods_left_alone() -> None:
    assert broken_pod(_pod(FAILED, injected=False)) is None, "not injected: not ours"
    assert broken_pod(_pod({"terminated": {"exitCode": 0}}, FAILED)) is None, "failed once, then passed"
    assert broken_pod(_pod({"running": {}})) is None, "still validating"
    deleting = _pod(FAILED)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert broken_pod(deleting) is None
    other = _pod(FAILED)
    other["status"]["initContainerStatuses"][0]["name"] = "some-other-init"
    assert broken_pod(other) is None


def test_exit_code_filter() -> None:
    assert broken_pod(_pod(FAILED), frozenset({126})) is None
    assert broken_pod(_pod({"terminated": {"exitCode": 126}}), frozenset({126})) is not None


def test_label_patch_carries_preconditions_and_creates_labels_when_missing() -> None:
    found = broken_pod(_pod(FAILED))
    assert found is not None
    ops = label_patch(found, has_labels=False)
    assert ops[:2] == [
        {"op": "test", "path": "/metadata/uid", "value": "u1"},
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
    ]
    assert ops[2] == {"op": "add", "path": "/metadata/labels", "value": {}}
    assert ops[3]["path"] == "/metadata/labels/" + REPAIR_LABEL.replace("/", "~1")
    event = repair_event(found, action="delete", node="n1")
    assert event["involvedObject"]["uid"] == "u1" and "deleted" in event["message"]


def test_only_our_taint_is_dropped() -> None:
    taints = [{"key": NOT_READY_TAINT_KEY, "effect": "NoSchedule"}, {"key": "x", "effect": "NoExecute"}]
    before = copy.deepcopy(taints)
    assert taints_without_not_ready(taints) == [{"key": "x", "effect": "NoExecute"}]
    assert taints == before
    assert taints_without_not_ready([{"key": "x"}]) is None
    assert taints_without_not_ready(None) is None


def test_kubeconfig_is_json_with_embedded_ca_and_bracketed_ipv6() -> None:
    import json

    from cni.install.kubeconfig import api_server_url

    body = json.loads(render_kubeconfig(server=api_server_url("fd00::1", 443), token="t\n", ca_pem=b"PEM"))
    assert body["clusters"][0]["cluster"]["server"] == "https://[fd00::1]:443"
    assert body["clusters"][0]["cluster"]["certificate-authority-data"] == "UEVN"
    assert body["users"][0]["user"]["token"] == "t"


class _ClosingApi:
    """An API server (or proxy) that answers the pod list but ends every watch at once."""

    def __init__(self) -> None:
        self.lists = 0

    def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.lists += 1
        return {"items": [], "metadata": {"resourceVersion": "1"}}

    def watch(self, path: str, **kwargs: Any) -> Any:
        return iter(())


def test_watches_ended_at_once_do_not_make_the_repair_loop_relist_hot() -> None:
    import threading

    from cni.repair import Signals, WorkerConfig, repair_loop

    api, stop, valid = _ClosingApi(), threading.Event(), threading.Event()
    valid.set()
    config = WorkerConfig(node="n", repair_mode="label", retry_s=0.1, max_retry_s=0.4)
    thread = threading.Thread(target=repair_loop, args=(api, config, Signals(stop, valid, lambda _: None)))
    thread.start()
    stop.wait(2.0)
    stop.set()
    thread.join(5)
    # Waits 0.1, 0.2, 0.4, 0.4, ... (x0.8..1.2): at most ~7 lists in 2 s; a hot loop makes thousands.
    assert 2 <= api.lists <= 8, api.lists
