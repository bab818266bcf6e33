"""Injection core speed: median in-process inject() time beside orjson parse+serialize of the same pod.

Run: .venv/bin/python bench/bench_inject.py [--rounds N]
Targets (2-core machine): typical pod <= 0.3 ms; 2,000-env pod <= 5x its own parse+serialize.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from injector.config import default_config
from injector.core import inject


def typical_pod() -> dict[str, Any]:
    def container(name: str, port: int, probe: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "image": f"example/{name}:1.0",
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            "env": [{"name": f"{name.upper()}_{i}", "value": str(i)} for i in range(5)],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            "readinessProbe": probe,
            "livenessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 10},
        }

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "shop-7d9f8b6c5-",
            "namespace": "shop",
            "labels": {"app": "shop", "version": "v1", "pod-template-hash": "7d9f8b6c5"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "shop-7d9f8b6c5",
                    "uid": "1",
                    "controller": True,
                }
            ],
        },
        "spec": {
            "serviceAccountName": "shop",
            "containers": [
                container("web", 8080, {"httpGet": {"path": "/ready", "port": "http"}}),
                container("api", 9090, {"grpc": {"port": 9090}}),
                container("cache", 6379, {"tcpSocket": {"port": 6379}}),
            ],
        },
    }


def env_pod(count: int = 2000) -> dict[str, Any]:
    pod = typical_pod()
    pod["spec"]["containers"][0]["env"] = [
        {"name": f"SETTING_{i:04d}", "value": f"value-{i:04d}-abcdefghijklmnopqrstuvwx"} for i in range(count)
    ]
    return pod


def median_seconds(fn: Callable[[], Any], rounds: int) -> float:
    for _ in range(min(50, rounds)):
        fn()
    samples = []
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return statistics.median(samples)


def measure(name: str, pod: dict[str, Any], rounds: int) -> tuple[float, float]:
    config = default_config()
    raw = orjson.dumps(pod)
    result = inject(copy.deepcopy(pod), config=config)
    assert result.decision.value == "inject", result.reasons
    t_inject = median_seconds(lambda: inject(pod, config=config), rounds)
    t_json = median_seconds(lambda: orjson.dumps(orjson.loads(raw)), rounds)
    # For context: what a webhook does around the core (parse the pod, serialize the patch; the
    # core already serialized it to measure it against limits.maxPatchBytes: patch_json).
    def round_trip() -> bytes:
        out = inject(orjson.loads(raw), config=config)
        return out.patch_json if out.patch_json is not None else orjson.dumps(out.patch)

    t_round = median_seconds(round_trip, rounds)
    print(
        f"{name:<22} size {len(raw) / 1024:6.1f} KiB | inject {t_inject * 1e3:6.3f} ms | "
        f"orjson loads+dumps {t_json * 1e3:6.3f} ms | ratio {t_inject / t_json:5.1f}x | "
        f"loads+inject+dumps(patch) {t_round * 1e3:6.3f} ms | patch ops {len(result.patch)}"
    )
    return t_inject, t_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} CPUs, load average {load:.2f}"
        + (" (busy machine: numbers are inflated)" if load > 1 else "")
    )
    typical, _ = measure("typical (3 containers)", typical_pod(), args.rounds)
    big, big_json = measure("2,000 env vars", env_pod(), max(200, args.rounds // 10))
    print(
        f"typical pod: {typical * 1e3:.3f} ms (target <= 0.300 ms) -> "
        f"{'OK' if typical <= 0.0003 else 'MISSED'}"
    )
    print(
        f"2,000-env pod: {big / big_json:.1f}x parse+serialize (target <= 5x) -> "
        f"{'OK' if big <= 5 * big_json else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
