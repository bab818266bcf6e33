"""Filling a real API server with Pending pods fast (tests and bench/scale_audit.py share this)."""

from __future__ import annotations

import copy
import json
import ssl
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

UNSCHEDULABLE = {"mesh-injector.test/no-such-node": "true"}  # Pending even where a node runs


def pending_pod(name: str, *, labels: Mapping[str, str] | None = None,
                owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A small realistic pod that never runs (no node matches its selector)."""
    meta: dict[str, Any] = {"name": name, "labels": dict(labels or {"app": name.rsplit("-", 1)[0]})}
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {
            "nodeSelector": UNSCHEDULABLE,
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}],
        },
    }


def injected(pod: Mapping[str, Any], revision: str = "default") -> dict[str, Any]:
    """The pod as the injector of ``revision`` (built-in config) would have admitted it."""
    from injector.configwatch import builtin_config
    from injector.core import inject
    from injector.documents import config_for_revision

    config = config_for_revision(builtin_config(), revision)
    result = inject(copy.deepcopy(dict(pod)), config=config, namespace_labels={"istio.io/rev": revision},
                    namespace="default")
    assert result.decision.value == "inject", result.reasons
    mutated = result.mutated
    mutated["metadata"].pop("namespace", None)
    return mutated


class Api:
    """Plain HTTPS to the API server with the admin token; keep-alive connections shared by threads."""

    def __init__(self, server: str, token: str, ca_file: str, workers: int = 16) -> None:
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        self.client = httpx.Client(base_url=server, verify=ssl.create_default_context(cafile=ca_file),
                                   limits=limits, timeout=60.0, headers={"authorization": f"Bearer {token}"})
        self.workers = workers

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        content = json.dumps(body).encode() if body is not None else None
        response = self.client.request(method, path, content=content,
                                       headers={"content-type": "application/json"}, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def create_pods(self, namespace: str, pods: Iterable[Mapping[str, Any]]) -> int:
        """Create pods concurrently (``workers`` requests in flight); returns how many."""
        path = f"/api/v1/namespaces/{namespace}/pods"

        def create(pod: Mapping[str, Any]) -> None:
            response = self.client.post(path, content=json.dumps(pod).encode(),
                                        headers={"content-type": "application/json"})
            if response.status_code != 201:
                raise RuntimeError(f"creating pod {pod['metadata']['name']}: {response.status_code} "
                                   f"{response.text[:300]}")

        count = 0
        with ThreadPoolExecutor(self.workers) as pool:
            for _ in pool.map(create, pods):
                count += 1
        return count
