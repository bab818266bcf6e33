"""Offline injection side by side: `mesh-injector kube-inject` vs the pinned `istioctl kube-inject`.

Same machine, same 100-object file (Deployments, StatefulSets, Jobs, CronJobs and Pods with
probes and named ports), each tool's own equivalent configuration (Istio's generated at run time
by `istioctl manifest generate`, CNI mode). Wall time per whole run, median of N runs, process
start included, as a user runs them; the two run in turn (interleaved) so a change in the machine's
load hits both alike, and each run's CPU time (all threads: istioctl's Go runtime uses several)
is printed beside the wall time, which a shared machine makes noisy.

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


def run(cmd: list[str], rounds: int) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of the process and its threads) per run."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - start
            if os.waitstatus_to_exitcode(status) != 0:
                err.seek(0)
                raise SystemExit(f"{cmd[0]} failed: {err.read().decode()[-1000:]}")
        times.append((elapsed, usage.ru_utime + usage.ru_stime))
    return times


def interleaved(commands: list[list[str]], rounds: int) -> list[list[tuple[float, float]]]:
    """Each command once per round, in turn, so a change in the machine's load hits both alike."""
    results: list[list[tuple[float, float]]] = [[] for _ in commands]
    for _ in range(rounds):
        for i, cmd in enumerate(commands):
            results[i] += run(cmd, 1)
    return results


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
        ours_cmd = [str(REPO / ".venv" / "bin" / "mesh-injector"), "kube-inject", "-f", str(src)]
        istio_cmd = [str(tool), "kube-inject", "--revision", "default", "-f", str(src),
                     "--injectConfigFile", str(files / "inject-config.yaml"),
                     "--meshConfigFile", str(files / "mesh.yaml"),
                     "--valuesFile", str(files / "values.json")]
        run(ours_cmd, 1)  # warm the page cache and .pyc files for both
        run(istio_cmd, 1)
        ours, istio = interleaved([ours_cmd, istio_cmd], args.rounds)
    load = os.getloadavg()[0]
    print(f"kube-inject, 100 objects, median of {args.rounds} interleaved runs "
          f"(load average {load:.2f} on {os.cpu_count()} cores):")
    print(f"  {'':28} {'wall ms':>9} {'(min)':>9} {'CPU ms':>9} {'(min)':>9}")
    rows = (("mesh-injector kube-inject", ours), (f"istioctl {oracle.version()}", istio))
    for name, times in rows:
        walls, cpus = [t[0] * 1000 for t in times], [t[1] * 1000 for t in times]
        print(f"  {name:28} {statistics.median(walls):9.1f} {min(walls):9.1f} "
              f"{statistics.median(cpus):9.1f} {min(cpus):9.1f}")
    wall_ratio = statistics.median(t[0] for t in ours) / statistics.median(t[0] for t in istio)
    cpu_ratio = statistics.median(t[1] for t in ours) / statistics.median(t[1] for t in istio)
    print(f"  ratio ours/istioctl: wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x (target: wall <= 1.00x)")


if __name__ == "__main__":
    main()
