"""Scale curves: the webhook at 1-256 connections with 1 and 2 workers, then the other sections.

Webhook: ``mesh-injector serve --workers W`` on loopback HTTPS, driven by ``wrk`` (keep-alive,
typical pod review, as bench_server.py) at 1, 16, 64 and 256 connections. Per point: reviews/s,
p50/p99, the server's CPU per review, and how much CPU ``wrk`` itself took (it shares the cores
with the server: on 2 cores, every core-second it uses is one the server did not get).

Other sections, each run when its file exists (interface 6 of the team contracts):
``bench/scale_audit.py`` (audit at 100-20,000 pods) and ``bench/scale_kube_inject.py``
(kube-inject at 10-10,000 objects), each exposing ``run() -> None``.

    .venv/bin/python bench/bench_scale.py [--duration 5] [--only webhook|audit|kube-inject]
        [--baseline REV] [--variant NAME=FLAGS ...] [--rounds N] [--connections 1,16,64,256]
        [--wrk-threads 1] [--pods replicas|distinct]

``--baseline REV`` runs that revision's server beside this tree's, alternating at every point,
and prints the ratio of their server CPU per review: on a shared machine wall-clock numbers
move with the other load, CPU per review much less. ``--variant NAME=FLAGS`` does the same for
this tree's server started with extra ``serve`` flags (an A/B of one setting on the same code),
e.g. ``--variant shared=--no-reuse-port``.

Each point also prints how wrk's connections were spread over the workers, 0.5 s into the run
and half-way (``ss``): a worker holding more than its share serves each of them more slowly;
and the VM's steal time (``/proc/stat``): the share of the machine's CPU time the hypervisor
gave to other guests while the point ran.

Targets (issue 17, 2 cores, 2 workers): p99 <= 20 ms at 64 connections; reviews/s at 16
connections >= 1.6x the one-worker figure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shlex
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_server as bs  # noqa: E402

CONNECTIONS = (1, 16, 64, 256)
WORKERS = (1, 2)
TARGET_P99_MS = 20.0
TARGET_SPEEDUP = 1.6


Point = tuple[str, int, int]  # (code, workers, connections)
#: (name, tree of another revision or None for this one, extra serve flags)
Code = tuple[str, Path | None, tuple[str, ...]]


def connections_per_worker(port: int, server: Any) -> list[int]:
    """Established connections to ``port`` held by each worker process (from ``ss -p``)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=5).stdout
        return [len(re.findall(rf"pid={pid},", out)) for pid in bs.server_pids(server.pid)[1:]]
    return []


def cpu_jiffies() -> tuple[int, int]:
    """(all, stolen) CPU time of the machine so far, from /proc/stat: on a VM the hypervisor's
    other guests take cores away (steal), and every point should say how much."""
    with contextlib.suppress(OSError, ValueError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields), fields[7]
    return 0, 0


def _measure(wrk: str, url: str, ctx: ssl.SSLContext, script: Path, server: Any, duration: int,
             conns: int, threads: int = 2) -> dict[str, Any]:
    """One wrk run against one server: wrk's numbers plus the server's CPU per review, the
    cores each worker used and how wrk's connections were spread over the workers."""
    cpu_before, count_before = bs.cpu_seconds(server.pid), bs.answered(url, ctx)
    workers_before, started = bs.worker_cpu_seconds(server.pid), time.monotonic()
    port, spread, jiffies_before = int(url.rsplit(":", 1)[1]), [], cpu_jiffies()

    def sample() -> None:
        for at in (0.5, duration / 2):
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            spread.append(connections_per_worker(port, server))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    m: dict[str, Any] = bs.run_wrk(wrk, f"{url}/inject", script, duration, conns, min(threads, conns),
                                         quiet=True)
    wall = time.monotonic() - started
    sampler.join(5)
    m["spread"] = spread
    total, stolen = (after - before for after, before in zip(cpu_jiffies(), jiffies_before, strict=True))
    m["steal"] = 100.0 * stolen / total if total else float("nan")
    answered = max(bs.answered(url, ctx) - count_before, 1)
    m["answered"], m["cpu"] = float(answered), bs.cpu_seconds(server.pid) - cpu_before
    m["worker_cores"] = [(after - before) / wall for before, after in
                         zip(workers_before, bs.worker_cpu_seconds(server.pid), strict=False)]
    return m


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one point: mean throughput, median latencies, CPU per review over all of them."""
    mid = len(runs) // 2
    out: dict[str, Any] = {key: sorted(r[key] for r in runs)[mid] for key in ("p50", "p99", "p999")}
    out["rps"] = sum(r["rps"] for r in runs) / len(runs)
    out["errors"] = sum(r["non2xx"] + r["sockerr"] for r in runs)
    out["server_ms"] = sum(r["cpu"] for r in runs) * 1000 / sum(r["answered"] for r in runs)
    out["wrk_cores"] = sum(r["wrk_cores"] for r in runs) / len(runs)
    out["steal"] = sum(r["steal"] for r in runs) / len(runs)
    width = max(len(r["worker_cores"]) for r in runs)
    out["worker_cores"] = [sum(r["worker_cores"][i] for r in runs if i < len(r["worker_cores"])) / len(runs)
                           for i in range(width)]
    out["spread"] = " ".join("->".join("+".join(map(str, s)) for s in r["spread"]) for r in runs)
    return out


def webhook_curve(duration: int, connections: tuple[int, ...] = CONNECTIONS, rounds: int = 1,
                  baseline: str | None = None,
                  variants: tuple[tuple[str, tuple[str, ...]], ...] = (),
                  wrk_threads: int = 1, distinct: bool = False) -> dict[Point, dict[str, Any]]:
    """Every (code, workers, connections) point; with ``baseline`` (that revision's server) or
    ``variants`` (this tree's with extra flags), the servers run side by side and each point
    alternates between them (``rounds`` runs each, the order flipped every round), so all see
    the same machine."""
    wrk = bs.ensure_wrk()
    runs: dict[Point, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        _, script = bs.write_fixtures(tmp, distinct)
        ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        codes: list[Code] = [("new", None, ())]
        if baseline:
            codes.insert(0, ("base", bs.export_revision(baseline, tmp / "baseline"), ()))
        codes += [(name, None, flags) for name, flags in variants]
        for workers in WORKERS:
            servers: dict[str, tuple[str, Any, Any]] = {}
            try:
                for code, source, flags in codes:
                    url = f"https://127.0.0.1:{bs.free_port()}"
                    log_path = tmp / f"server-{code}-{workers}.log"
                    log = log_path.open("wb")
                    server = bs.start(tmp, int(url.rsplit(":", 1)[1]), workers, log, source, flags)
                    servers[code] = (url, server, log)
                    if not bs.wait_ready(url, ctx, server, log_path):
                        raise SystemExit(f"bench_scale: the {code} server did not start")
                time.sleep(1.0)  # every worker up
                for url, _, _ in servers.values():
                    bs.run_wrk(wrk, f"{url}/inject", script, 2, 16, 2, quiet=True)  # warm-up
                for conns in connections:
                    for round_ in range(rounds):
                        order = list(servers.items())
                        for code, (url, server, _) in order if round_ % 2 == 0 else order[::-1]:
                            m = _measure(wrk, url, ctx, script, server, duration, conns, wrk_threads)
                            runs.setdefault((code, workers, conns), []).append(m)
                            spread = "->".join("+".join(map(str, s)) for s in m["spread"])
                            print(f"  {code} workers {workers} connections {conns:3d}: {m['rps']:7.0f} "
                                  f"reviews/s, p99 {m['p99']:6.2f} ms, "
                                  f"{m['cpu'] * 1000 / m['answered']:.3f} ms CPU/review, connections "
                                  f"{spread}, load {os.getloadavg()[0]:.1f}, steal {m['steal']:.1f}%",
                                  flush=True)
            finally:
                for _, server, log in servers.values():
                    bs.stop(server)
                    log.close()
    return {point: _combine(found) for point, found in runs.items()}


def print_webhook(results: dict[Point, dict[str, Any]], duration: int, rounds: int,
                  baseline: str | None, variants: tuple[tuple[str, tuple[str, ...]], ...] = (),
                  wrk_threads: int = 1, distinct: bool = False) -> None:
    load = os.getloadavg()
    codes = sorted({code for code, _, _ in results}, key=lambda c: (c != "base", c != "new", c))
    print(f"\nWebhook curve ({os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min), "
          f"wrk -t<={wrk_threads} {duration} s per point x {rounds} round(s), HTTPS keep-alive, typical pod, "
          + ("every review a different pod" if distinct
             else "replicas: the same pod, its token volume named anew each time")
          + (f"; base = {baseline}" if baseline else "")
          + "".join(f"; {name} = this tree with {shlex.join(flags)}" for name, flags in variants)
          + ("; new = this tree, alternating" if baseline or variants else "") + "):")
    print("| code | workers | connections | reviews/s | p50 ms | p99 ms | p99.9 ms | errors "
          "| server CPU ms/review | cores per worker | connections per worker (0.5 s -> mid) "
          "| wrk CPU (cores) | VM steal % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    for (code, workers, conns), m in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2],
                                                                             codes.index(kv[0][0]))):
        split = "+".join(f"{c:.2f}" for c in m["worker_cores"])
        print(f"| {code} | {workers} | {conns} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | "
              f"{m['p999']:.2f} | {m['errors']:.0f} | {m['server_ms']:.3f} | {split} | {m['spread']} | "
              f"{m['wrk_cores']:.2f} | {m['steal']:.1f} |")
    for code in codes:
        print(f"{code}:")
        for workers in WORKERS:
            lo, hi = results.get((code, workers, 64)), results.get((code, workers, 256))
            if lo and hi:
                slope = (hi["p99"] - lo["p99"]) / (256 - 64)
                print(f"  p99 slope {workers} worker(s), 64 -> 256 connections: {slope:.3f} ms per "
                      "connection")
        two64 = results.get((code, 2, 64))
        if two64:
            print(f"  target p99 <= {TARGET_P99_MS:.0f} ms at 64 connections, 2 workers: "
                  f"{two64['p99']:.2f} ms (ratio {two64['p99'] / TARGET_P99_MS:.2f})")
        one16, two16 = results.get((code, 1, 16)), results.get((code, 2, 16))
        if one16 and two16:
            print(f"  target reviews/s at 16 connections, 2 workers >= {TARGET_SPEEDUP}x 1 worker: "
                  f"{two16['rps'] / one16['rps']:.2f}x ({one16['rps']:.0f} -> {two16['rps']:.0f}); "
                  f"server CPU per review {two16['server_ms'] / one16['server_ms']:.2f}x")
    for other in (c for c in codes if c != "new"):
        first, second = ("new", other) if other == "base" else (other, "new")
        print(f"{first} / {second}, server CPU per review (the load-robust number), and p99:")
        for (code, workers, conns), m in sorted(results.items()):
            ref = results.get((second, workers, conns))
            if code == first and ref:
                print(f"  workers {workers} connections {conns:3d}: {m['server_ms']:.3f} / "
                      f"{ref['server_ms']:.3f} ms = {m['server_ms'] / ref['server_ms']:.2f}; p99 "
                      f"{m['p99']:.2f} / {ref['p99']:.2f} ms = {m['p99'] / ref['p99']:.2f}")


def run_section(name: str) -> None:
    path = HERE / f"{name}.py"
    if not path.exists():
        print(f"\n({path.name} not present: section skipped)")
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per webhook point")
    parser.add_argument("--only", choices=["webhook", "audit", "kube-inject"], default=None)
    parser.add_argument("--connections", default=",".join(map(str, CONNECTIONS)),
                        help="webhook: comma-separated connection counts (default: %(default)s)")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="webhook: also run the server of git revision REV, alternating with this "
                             "tree's at every point (e.g. --baseline c9920ba)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="webhook: also run this tree's server with these extra serve flags, "
                             "alternating (repeatable; e.g. shared=--no-reuse-port)")
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="webhook: wrk threads (each one more runnable thread on the shared cores; "
                             "one drives 12k reviews/s at ~0.4 cores) (default: %(default)s)")
    parser.add_argument("--pods", choices=["replicas", "distinct"], default="replicas",
                        help="webhook: every review the same pod but for its token volume's name, as a "
                             "workload's replicas arrive from kube-apiserver "
                             "(answered from the answer memo after the first), or each a different "
                             "pod (every review through the core) (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="webhook: runs per point and server (default: 2 with --baseline or "
                             "--variant, else 1)")
    args = parser.parse_args(argv)
    variants: list[tuple[str, tuple[str, ...]]] = []
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in ("new", "base"):
            parser.error(f"--variant {spec!r}: expected NAME=FLAGS with a NAME other than new/base")
        variants.append((name, tuple(shlex.split(flags))))
    if args.only in (None, "webhook"):
        rounds = args.rounds or (2 if args.baseline or variants else 1)
        connections = tuple(int(c) for c in args.connections.split(","))
        distinct = args.pods == "distinct"
        results = webhook_curve(args.duration, connections, rounds, args.baseline, tuple(variants),
                                args.wrk_threads, distinct)
        print_webhook(results, args.duration, rounds, args.baseline, tuple(variants), args.wrk_threads,
                      distinct)
    if args.only in (None, "audit"):
        run_section("scale_audit")
    if args.only in (None, "kube-inject"):
        run_section("scale_kube_inject")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
