"""Background threads of the agent that talk to the API: taint removal and pod repair.

Kept out of the install loop so a slow or unreachable API server never delays re-chaining.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from cni.install_kube import ApiError, KubeApi, repair_pod

if TYPE_CHECKING:
    from cni.install_agent import Agent

log = logging.getLogger("mesh-cni.install")


def api_for(agent: Agent) -> KubeApi | None:
    config = agent.config
    if not config.api_server:
        return None
    ca = str(config.ca_file) if config.ca_file and config.ca_file.exists() else None
    return KubeApi(config.api_server, str(config.token_file), ca)


def start_workers(agent: Agent) -> list[threading.Thread]:
    api = api_for(agent)
    node = agent.config.node_name
    threads: list[threading.Thread] = []
    if api is None or not node:
        if agent.config.remove_taint or agent.config.repair_mode != "off":
            log.warning("no API server or NODE_NAME: taint removal and repair are off")
        return threads
    if agent.config.remove_taint:
        threads.append(
            threading.Thread(target=taint_loop, args=(agent, api, node), name="taint", daemon=True)
        )
    if agent.config.repair_mode != "off":
        threads.append(
            threading.Thread(target=repair_loop, args=(agent, api, node), name="repair", daemon=True)
        )
    for thread in threads:
        thread.start()
    return threads


def taint_loop(agent: Agent, api: KubeApi, node: str) -> None:
    """Once the install is valid, remove the not-ready taint from our own node; re-check slowly."""
    while not agent._stop.is_set():
        if not agent._valid.wait(timeout=1.0):
            continue
        try:
            if api.remove_not_ready_taint(node):
                agent.status.count("mesh_cni_taint_removed_total")
                log.info("removed taint cni.istio.io/not-ready from node %s", node)
            wait = agent.config.taint_recheck_s
        except (ApiError, OSError) as err:
            log.warning("taint removal on node %s failed: %s", node, err)
            wait = 2.0
        agent._stop.wait(wait)


def repair_loop(agent: Agent, api: KubeApi, node: str) -> None:
    """List then watch this node's pods; label or delete injected pods that started unmeshed."""
    mode = agent.config.repair_mode
    while not agent._stop.is_set():
        # Repair only while our install is valid: a pod deleted now would be recreated unmeshed.
        if not agent._valid.wait(timeout=1.0):
            continue
        try:
            pods, version = api.pods_on_node(node)
            for pod in pods:
                _repair(agent, api, pod, mode, node)
            for event in api.watch_pods_on_node(node, version, timeout_s=30):
                if agent._stop.is_set():
                    return
                kind = event.get("type")
                if kind == "ERROR":
                    break  # expired resourceVersion: relist
                if kind in ("ADDED", "MODIFIED"):
                    _repair(agent, api, event.get("object") or {}, mode, node)
        except (ApiError, OSError, ValueError) as err:
            log.warning("pod repair on node %s: %s", node, err)
            agent._stop.wait(2.0)


def _repair(agent: Agent, api: KubeApi, pod: dict, mode: str, node: str) -> None:
    while not agent._valid.wait(timeout=1.0):
        if agent._stop.is_set():
            return
    done = repair_pod(api, pod, mode=mode, node=node, exit_codes=agent.config.repair_exit_codes)
    if done:
        meta = pod.get("metadata") or {}
        agent.status.count(f"mesh_cni_repair_pods_total|{done}")
        log.warning(
            "repaired pod %s/%s (%s): its redirect was missing", meta.get("namespace"), meta.get("name"), done
        )
