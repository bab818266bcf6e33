"""``mesh-injector kube-inject`` at scale: wall time and peak RSS for 10 to 10,000 Deployments.

Each size is one multi-document YAML file run through the console command in a fresh process
(output to /dev/null), so the numbers include start-up, parsing, injection and writing.
Run: .venv/bin/python bench/scale_kube_inject.py [--sizes 10,100,1000,10000] [--rounds 1]
Target (issue 17): <= 1 ms per object at 10,000 and peak RSS flat (streaming, one document at a time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from injector import yamlio  # noqa: E402

SIZES = (10, 100, 1000, 10_000)


def deployment(i: int) -> dict[str, Any]:
    """A typical web Deployment: one app container with ports, env, probes and resources."""
    name = f"web-{i}"
    container = {
        "name": "app",
        "image": "example/web:1.0",
        "ports": [{"name": "http", "containerPort": 8080}],
        "env": [{"name": f"SETTING_{n}", "value": str(n)} for n in range(5)],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": 8080}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, "version": "v1"}},
                         "spec": {"containers": [container]}},
        },
    }


def write_input(path: Path, count: int) -> None:
    with path.open("w") as out:
        for chunk in yamlio.dump_stream(deployment(i) for i in range(count)):
            out.write(chunk)


def measure(path: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one kube-inject run on ``path``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "kube-inject", "-f", str(path)],
                                stdout=sink, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"kube-inject failed ({proc.returncode}): {proc.stderr.read().decode()[-500:]}")
    proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def run(sizes: tuple[int, ...] = SIZES, rounds: int = 1) -> None:
    print("kube-inject: Deployments in one multi-document file, fresh process per run "
          f"(best of {rounds})")
    print(f"{'objects':>8} {'wall s':>8} {'ms/object':>10} {'CPU s':>8} {'CPU ms/object':>14} "
          f"{'peak RSS MiB':>13}")
    rows: list[tuple[int, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = Path(tmp) / f"deployments-{size}.yaml"
            write_input(path, size)
            runs = [measure(path) for _ in range(rounds)]
            wall, cpu, rss = min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs)
            rows.append((size, wall, cpu, rss))
            per_wall, per_cpu = wall / size * 1000, cpu / size * 1000
            print(f"{size:>8} {wall:>8.2f} {per_wall:>10.3f} {cpu:>8.2f} {per_cpu:>14.3f} {rss:>13.1f}")
            path.unlink()
    if len(rows) >= 2:
        (n0, t0, c0, r0), (n1, t1, c1, r1) = rows[-2], rows[-1]
        slope, cpu_slope = ((t1 - t0) / (n1 - n0) * 1000, (c1 - c0) / (n1 - n0) * 1000)
        print(f"slope {n0}->{n1}: {slope:.3f} ms/object wall, {cpu_slope:.3f} ms/object CPU (target <= 1); "
              f"peak RSS {r0:.1f} -> {r1:.1f} MiB ({(r1 / r0 - 1) * 100:+.0f}%; target flat)")
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    run(tuple(int(s) for s in args.sizes.split(",")), args.rounds)


if __name__ == "__main__":
    main()
