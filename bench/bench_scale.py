"""Scale curves: the webhook at 1-256 connections with 1 and 2 workers, then the other sections.

Webhook: ``mesh-injector serve --workers W`` on loopback HTTPS, driven by ``wrk`` (keep-alive,
typical pod review, as bench_server.py) at 1, 16, 64 and 256 connections. Per point: reviews/s,
p50/p99, the server's CPU per review, and how much CPU ``wrk`` itself took (it shares the cores
with the server: on 2 cores, every core-second it uses is one the server did not get).

Other sections, each run when its file exists (interface 6 of the team contracts):
``bench/scale_audit.py`` (audit at 100-20,000 pods) and ``bench/scale_kube_inject.py``
(kube-inject at 10-10,000 objects), each exposing ``run() -> None``.

    .venv/bin/python bench/bench_scale.py [--duration 5] [--only webhook|audit|kube-inject]
        [--baseline REV] [--rounds N] [--connections 1,16,64,256]

``--baseline REV`` runs that revision's server beside this tree's, alternating at every point,
and prints the ratio of their server CPU per review: on a shared machine wall-clock numbers
move with the other load, CPU per review much less.

Targets (issue 17, 2 cores, 2 workers): p99 <= 20 ms at 64 connections; reviews/s at 16
connections >= 1.6x the one-worker figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import ssl
import sys
import tempfile
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


def _measure(wrk: str, url: str, ctx: ssl.SSLContext, script: Path, server: Any, duration: int,
             conns: int) -> dict[str, float]:
    """One wrk run against one server: wrk's numbers plus the server's CPU per review and the
    cores each worker used (how evenly the load spread)."""
    cpu_before, count_before = bs.cpu_seconds(server.pid), bs.answered(url, ctx)
    workers_before, started = bs.worker_cpu_seconds(server.pid), time.monotonic()
    m = bs.run_wrk(wrk, f"{url}/inject", script, duration, conns, min(2, conns), quiet=True)
    wall = time.monotonic() - started
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
    width = max(len(r["worker_cores"]) for r in runs)
    out["worker_cores"] = [sum(r["worker_cores"][i] for r in runs if i < len(r["worker_cores"])) / len(runs)
                           for i in range(width)]
    return out


def webhook_curve(duration: int, connections: tuple[int, ...] = CONNECTIONS, rounds: int = 1,
                  baseline: str | None = None) -> dict[Point, dict[str, Any]]:
    """Every (code, workers, connections) point; with ``baseline``, that revision's server runs
    beside this tree's and each point alternates between them (``rounds`` runs each, the order
    flipped every round), so both see the same machine."""
    wrk = bs.ensure_wrk()
    runs: dict[Point, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        _, script = bs.write_fixtures(tmp)
        ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        codes: list[tuple[str, Path | None]] = [("new", None)]
        if baseline:
            codes.insert(0, ("base", bs.export_revision(baseline, tmp / "baseline")))
        for workers in WORKERS:
            servers: dict[str, tuple[str, Any, Any]] = {}
            try:
                for code, source in codes:
                    url = f"https://127.0.0.1:{bs.free_port()}"
                    log_path = tmp / f"server-{code}-{workers}.log"
                    log = log_path.open("wb")
                    server = bs.start(tmp, int(url.rsplit(":", 1)[1]), workers, log, source)
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
                            m = _measure(wrk, url, ctx, script, server, duration, conns)
                            runs.setdefault((code, workers, conns), []).append(m)
                            print(f"  {code} workers {workers} connections {conns:3d}: {m['rps']:7.0f} "
                                  f"reviews/s, p99 {m['p99']:6.2f} ms, "
                                  f"{m['cpu'] * 1000 / m['answered']:.3f} ms CPU/review", flush=True)
            finally:
                for _, server, log in servers.values():
                    bs.stop(server)
                    log.close()
    return {point: _combine(found) for point, found in runs.items()}


def print_webhook(results: dict[Point, dict[str, Any]], duration: int, rounds: int,
                  baseline: str | None) -> None:
    load = os.getloadavg()[0]
    codes = sorted({code for code, _, _ in results}, key=lambda c: c != "base")
    print(f"\nWebhook curve ({os.cpu_count()} CPUs, load average {load:.2f}, wrk -t<=2 {duration} s per "
          f"point x {rounds} round(s), HTTPS keep-alive, typical pod"
          + (f"; base = {baseline}, new = this tree, alternating" if baseline else "") + "):")
    print("| code | workers | connections | reviews/s | p50 ms | p99 ms | p99.9 ms | errors "
          "| server CPU ms/review | cores per worker | wrk CPU (cores) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for (code, workers, conns), m in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2],
                                                                             codes.index(kv[0][0]))):
        split = "+".join(f"{c:.2f}" for c in m["worker_cores"])
        print(f"| {code} | {workers} | {conns} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | "
              f"{m['p999']:.2f} | {m['errors']:.0f} | {m['server_ms']:.3f} | {split} | "
              f"{m['wrk_cores']:.2f} |")
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
    if "base" in codes:
        print("new / base, server CPU per review (the load-robust number):")
        for (code, workers, conns), m in sorted(results.items()):
            base = results.get(("base", workers, conns))
            if code == "new" and base:
                print(f"  workers {workers} connections {conns:3d}: {m['server_ms']:.3f} / "
                      f"{base['server_ms']:.3f} ms = {m['server_ms'] / base['server_ms']:.2f}")


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
    parser.add_argument("--rounds", type=int, default=None,
                        help="webhook: runs per point and server (default: 2 with --baseline, else 1)")
    args = parser.parse_args(argv)
    if args.only in (None, "webhook"):
        rounds = args.rounds or (2 if args.baseline else 1)
        connections = tuple(int(c) for c in args.connections.split(","))
        results = webhook_curve(args.duration, connections, rounds, args.baseline)
        print_webhook(results, args.duration, rounds, args.baseline)
    if args.only in (None, "audit"):
        run_section("scale_audit")
    if args.only in (None, "kube-inject"):
        run_section("scale_kube_inject")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
