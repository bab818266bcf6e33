"""The agent's API-side workers: taint removal (cni.repair.taint) and pod repair (cni.repair.repair).

Each runs on its own thread, so a slow or unreachable API server never delays re-chaining. A
worker sees the agent only through ``Signals``: when to stop, whether the install is valid now,
and where to count what it did.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cni.kube import ApiError, KubeApi
from cni.repair.repair import pods_on_node, repair_pod, watch_pods_on_node
from cni.repair.taint import remove_not_ready_taint

log = logging.getLogger("mesh-cni.install")


@dataclass(frozen=True)
class Signals:
    """The agent's side of a worker: ``stop`` set once on shutdown, ``valid`` set while the
    install is valid (repairing or untainting before that would recreate pods unmeshed)."""

    stop: threading.Event
    valid: threading.Event
    count: Callable[[str], None]

    def wait_valid(self) -> bool:
        """Block until the install is valid (True) or the agent stops (False)."""
        while not self.valid.wait(timeout=1.0):
            if self.stop.is_set():
                return False
        return not self.stop.is_set()


@dataclass(frozen=True)
class WorkerConfig:
    node: str
    remove_taint: bool = True
    repair_mode: str = "off"  # off | label | delete
    repair_exit_codes: frozenset[int] | None = None
    taint_recheck_s: float = 60.0
    retry_s: float = 2.0  # first wait after a failure; doubles per failure in a row
    max_retry_s: float = 30.0  # the doubling's cap: an API server down for long costs 2 calls/min
    watch_timeout_s: int = 30
    #: A watch the server ends sooner than this, with no event, counts as a failure: an API
    #: server shutting down (or a proxy) closing every watch at once must not make us relist hot.
    min_watch_s: float = 1.0


class Backoff:
    """Waits between retries: ``retry_s`` doubling to ``max_retry_s``, +-20% jitter (so a
    restarted API server is not hit by every node in the same second); reset by a success."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0

    def failed(self) -> float:
        """The wait before the next try, after one more failure."""
        import random

        wait = min(self.max_s, self.first_s * 2 ** min(self.failures, 16))
        self.failures += 1
        return wait * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.failures = 0


def start_workers(api: KubeApi, config: WorkerConfig, signals: Signals) -> list[threading.Thread]:
    threads: list[threading.Thread] = []
    if config.remove_taint:
        threads.append(threading.Thread(target=taint_loop, args=(api, config, signals), name="taint",
                                        daemon=True))
    if config.repair_mode != "off":
        threads.append(threading.Thread(target=repair_loop, args=(api, config, signals), name="repair",
                                        daemon=True))
    for thread in threads:
        thread.start()
    return threads


def taint_loop(api: KubeApi, config: WorkerConfig, signals: Signals) -> None:
    """Once the install is valid, remove the not-ready taint from our own node; re-check slowly."""
    backoff = Backoff(config.retry_s, config.max_retry_s)
    while signals.wait_valid():
        try:
            if remove_not_ready_taint(api, config.node):
                signals.count("mesh_cni_taint_removed_total")
                log.info("removed taint cni.istio.io/not-ready from node %s", config.node)
            backoff.reset()
            wait = config.taint_recheck_s
        except (ApiError, OSError) as err:
            wait = backoff.failed()
            log.warning("taint removal on node %s failed (retry in %.1f s): %s", config.node, wait, err)
        signals.stop.wait(wait)


def repair_loop(api: KubeApi, config: WorkerConfig, signals: Signals) -> None:
    """List then watch this node's pods; label or delete injected pods that started unmeshed."""
    backoff = Backoff(config.retry_s, config.max_retry_s)
    while signals.wait_valid():
        try:
            pods, version = pods_on_node(api, config.node)
            for pod in pods:
                _repair(api, pod, config, signals)
            started, events = time.monotonic(), 0
            for event in watch_pods_on_node(api, config.node, version, config.watch_timeout_s):
                if signals.stop.is_set():
                    return
                kind = event.get("type")
                if kind == "ERROR":
                    break  # expired resourceVersion: relist (an ERROR alone is no progress)
                events += 1
                if kind in ("ADDED", "MODIFIED"):
                    _repair(api, event.get("object") or {}, config, signals)
        except (ApiError, OSError, ValueError) as err:
            wait = backoff.failed()
            log.warning("pod repair on node %s (retry in %.1f s): %s", config.node, wait, err)
            signals.stop.wait(wait)
            continue
        if events or time.monotonic() - started >= config.min_watch_s:
            backoff.reset()
        else:
            wait = backoff.failed()
            log.warning("pod watch on node %s ended at once (retry in %.1f s)", config.node, wait)
            signals.stop.wait(wait)


def _repair(api: KubeApi, pod: dict[str, Any], config: WorkerConfig, signals: Signals) -> None:
    if not signals.wait_valid():
        return
    done = repair_pod(api, pod, mode=config.repair_mode, node=config.node,
                      exit_codes=config.repair_exit_codes)
    if done:
        meta = pod.get("metadata") or {}
        signals.count(f"mesh_cni_repair_pods_total|{done}")
        log.warning("repaired pod %s/%s (%s): its redirect was missing", meta.get("namespace"),
                    meta.get("name"), done)
