"""``mesh-injector kube-inject`` at scale: wall time and peak RSS for 10 to 10,000 Deployments.

Each size is one multi-document YAML file run through the console command in a fresh process
(output to /dev/null), so the numbers include start-up, parsing, injection and writing.
Run: .venv/bin/python bench/scale_kube_inject.py [--sizes 10,100,1000,10000] [--rounds 1] [--baseline REV]
Target (issue 17): <= 1 ms per object at 10,000 and peak RSS flat (streaming, one document at a time).
``--baseline REV`` runs the code of git revision REV (``git archive``) in turn with this tree on the
same files, both as ``python -S`` with the venv's packages on PYTHONPATH (an editable install would
otherwise import this tree for both; each runs in its own directory, as ``-m`` puts the working
directory first on the path), and prints both curves and the CPU ratio per size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
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


def measure(path: Path, tree: Path | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one kube-inject run on ``path``; ``tree``
    runs another checkout's code (see --baseline)."""
    if tree is None:
        cmd, env = [sys.executable], {**os.environ, "PYTHONPATH": str(REPO)}
    else:
        paths = sysconfig.get_paths()
        packages = dict.fromkeys([str(tree), paths["purelib"], paths["platlib"]])
        cmd, env = [sys.executable, "-S"], {**os.environ, "PYTHONPATH": os.pathsep.join(packages)}
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        proc = subprocess.Popen([*cmd, "-m", "injector.cli", "kube-inject", "-f", str(path)],
                                stdout=sink, stderr=subprocess.PIPE, env=env, cwd=tree or REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"kube-inject failed ({proc.returncode}): {proc.stderr.read().decode()[-500:]}")
    proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


Row = tuple[int, float, float, float]


def curve(name: str, rows: list[Row]) -> None:
    print(f"{name}:")
    print(f"{'objects':>8} {'wall s':>8} {'ms/object':>10} {'CPU s':>8} {'CPU ms/object':>14} "
          f"{'peak RSS MiB':>13}")
    for size, wall, cpu, rss in rows:
        print(f"{size:>8} {wall:>8.2f} {wall / size * 1000:>10.3f} {cpu:>8.2f} {cpu / size * 1000:>14.3f} "
              f"{rss:>13.1f}")
    if len(rows) >= 2:
        (n0, t0, c0, r0), (n1, t1, c1, r1) = rows[-2], rows[-1]
        slope, cpu_slope = ((t1 - t0) / (n1 - n0) * 1000, (c1 - c0) / (n1 - n0) * 1000)
        print(f"slope {n0}->{n1}: {slope:.3f} ms/object wall, {cpu_slope:.3f} ms/object CPU "
              f"(target <= 1: ratio {cpu_slope:.2f}); peak RSS {r0:.1f} -> {r1:.1f} MiB "
              f"({(r1 / r0 - 1) * 100:+.0f}%; target flat)")


def run(sizes: tuple[int, ...] = SIZES, rounds: int = 1, baseline: str | None = None) -> None:
    print("kube-inject: Deployments in one multi-document file, fresh process per run "
          f"(best of {rounds})")
    trees: dict[str, Path | None] = {"this tree": None}
    with tempfile.TemporaryDirectory() as tmp:
        if baseline:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            trees = {f"baseline {baseline}": base, "this tree": REPO}
        rows: dict[str, list[Row]] = {name: [] for name in trees}
        for size in sizes:
            path = Path(tmp) / f"deployments-{size}.yaml"
            write_input(path, size)
            runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
            for _ in range(rounds):
                for name, tree in trees.items():  # in turn: a change in load hits both alike
                    runs[name].append(measure(path, tree))
            for name, got in runs.items():
                best = (min(r[0] for r in got), min(r[1] for r in got), max(r[2] for r in got))
                rows[name].append((size, *best))
            path.unlink()
    for name, got in rows.items():
        curve(name, got)
    if baseline:
        base_rows, ours = rows[f"baseline {baseline}"], rows["this tree"]
        print("CPU this tree / baseline: " + ", ".join(
            f"{b[0]}: {o[2] / b[2]:.2f}x" for b, o in zip(base_rows, ours, strict=True)))
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also run git revision REV's code, in turn with this tree")
    args = parser.parse_args()
    run(tuple(int(s) for s in args.sizes.split(",")), args.rounds, args.baseline)


if __name__ == "__main__":
    main()
