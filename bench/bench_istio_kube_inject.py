"""Offline injection side by side: `mesh-injector kube-inject` vs the pinned `istioctl kube-inject`.

Same machine, same 100-object file (Deployments, StatefulSets, Jobs, CronJobs and Pods with
probes and named ports), each tool's own equivalent configuration (Istio's generated at run time
by `istioctl manifest generate`, CNI mode). Wall time per whole run, median of N runs, process
start included, as a user runs them.

Run: .venv/bin/python bench/bench_istio_kube_inject.py [--rounds N]
Needs the Istio build: bash scripts/setup.d/60-istio.sh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.istio import oracle  # noqa: E402
from tests.istio.inputs import workload_kinds  # noqa: E402


def hundred_objects() -> list[dict]:
    """100 objects: the workload kinds over and over, each with its own name."""
    kinds = [obj for _, obj in workload_kinds()]
    out = []
    for i in range(100):
        obj = yaml.safe_load(yaml.safe_dump(kinds[i % len(kinds)]))
        obj["metadata"]["name"] = f"web-{i}"
        out.append(obj)
    return out


def wall(cmd: list[str], rounds: int, env: dict[str, str] | None = None) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env={**os.environ, **(env or {})}, check=False)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed: {proc.stderr.decode()[-1000:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    tool = oracle.istioctl()
    if tool is None:
        raise SystemExit(f"istioctl missing in {oracle.bin_dir()}: run scripts/setup.d/60-istio.sh")
    files = oracle.istio_files("cni")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hundred.yaml"
        src.write_text(yaml.safe_dump_all(hundred_objects()))
        ours = wall([str(REPO / ".venv" / "bin" / "mesh-injector"), "kube-inject", "-f", str(src)],
                    args.rounds)
        istio = wall([str(tool), "kube-inject", "--revision", "default", "-f", str(src),
                      "--injectConfigFile", str(files / "inject-config.yaml"),
                      "--meshConfigFile", str(files / "mesh.yaml"),
                      "--valuesFile", str(files / "values.json")], args.rounds)
    load = os.getloadavg()[0]
    o, i = statistics.median(ours), statistics.median(istio)
    print(f"kube-inject, 100 objects, median of {args.rounds} runs (load {load:.2f}):")
    print(f"  mesh-injector kube-inject : {o * 1000:8.1f} ms  (min {min(ours) * 1000:.1f})")
    print(f"  istioctl {oracle.version():<16} : {i * 1000:8.1f} ms  (min {min(istio) * 1000:.1f})")
    print(f"  ratio ours/istioctl       : {o / i:8.2f}x")


if __name__ == "__main__":
    main()
