"""Scale curves: the webhook at 1-256 connections with 1 and 2 workers, then the other sections.

Webhook: ``mesh-injector serve --workers W`` on loopback HTTPS, driven by ``wrk`` (keep-alive,
typical pod review, as bench_server.py) at 1, 16, 64 and 256 connections. Per point: reviews/s,
p50/p99, the server's CPU per review, and how much CPU ``wrk`` itself took (it shares the cores
with the server: on 2 cores, every core-second it uses is one the server did not get).

Other sections, each run when its file exists (interface 6 of the team contracts):
``bench/scale_audit.py`` (audit at 100-20,000 pods) and ``bench/scale_kube_inject.py``
(kube-inject at 10-10,000 objects), each exposing ``run() -> None``.

    .venv/bin/python bench/bench_scale.py [--duration 5] [--only webhook|audit|kube-inject]

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


def webhook_curve(duration: int) -> dict[tuple[int, int], dict[str, float]]:
    wrk = bs.ensure_wrk()
    results: dict[tuple[int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        _, script = bs.write_fixtures(tmp)
        ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        for workers in WORKERS:
            port = bs.free_port()
            url = f"https://127.0.0.1:{port}"
            log_path = tmp / f"server-{workers}.log"
            log = log_path.open("wb")
            server = bs.start(tmp, port, workers, log)
            try:
                if not bs.wait_ready(url, ctx, server, log_path):
                    raise SystemExit("bench_scale: the server did not start")
                time.sleep(1.0)  # every worker up
                bs.run_wrk(wrk, f"{url}/inject", script, 2, 16, 2, quiet=True)  # warm-up
                for conns in CONNECTIONS:
                    cpu_before, count_before = bs.cpu_seconds(server.pid), bs.answered(url, ctx)
                    m = bs.run_wrk(wrk, f"{url}/inject", script, duration, conns, min(2, conns), quiet=True)
                    answered = max(bs.answered(url, ctx) - count_before, 1)
                    m["server_ms"] = (bs.cpu_seconds(server.pid) - cpu_before) * 1000 / answered
                    results[(workers, conns)] = m
                    print(f"  workers {workers} connections {conns:3d}: {m['rps']:7.0f} reviews/s, "
                          f"p99 {m['p99']:6.2f} ms", flush=True)
            finally:
                bs.stop(server)
                log.close()
    return results


def print_webhook(results: dict[tuple[int, int], dict[str, float]], duration: int) -> None:
    load = os.getloadavg()[0]
    print(f"\nWebhook curve ({os.cpu_count()} CPUs, load average {load:.2f}, wrk -t<=2 {duration} s per "
          "point, HTTPS keep-alive, typical pod):")
    print("| workers | connections | reviews/s | p50 ms | p99 ms | errors | server CPU ms/review "
          "| wrk CPU (cores) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (workers, conns), m in sorted(results.items()):
        print(f"| {workers} | {conns} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | "
              f"{m['non2xx'] + m['sockerr']:.0f} | {m['server_ms']:.3f} | {m['wrk_cores']:.2f} |")
    for workers in WORKERS:
        lo, hi = results.get((workers, 64)), results.get((workers, 256))
        if lo and hi:
            slope = (hi["p99"] - lo["p99"]) / (256 - 64)
            print(f"  p99 slope {workers} worker(s), 64 -> 256 connections: {slope:.3f} ms per connection")
    two64 = results.get((2, 64))
    if two64:
        print(f"  target p99 <= {TARGET_P99_MS:.0f} ms at 64 connections, 2 workers: {two64['p99']:.2f} ms "
              f"(ratio {two64['p99'] / TARGET_P99_MS:.2f})")
    one16, two16 = results.get((1, 16)), results.get((2, 16))
    if one16 and two16:
        print(f"  target reviews/s at 16 connections, 2 workers >= {TARGET_SPEEDUP}x 1 worker: "
              f"{two16['rps'] / one16['rps']:.2f}x ({one16['rps']:.0f} -> {two16['rps']:.0f})")


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
    args = parser.parse_args(argv)
    if args.only in (None, "webhook"):
        print_webhook(webhook_curve(args.duration), args.duration)
    if args.only in (None, "audit"):
        run_section("scale_audit")
    if args.only in (None, "kube-inject"):
        run_section("scale_kube_inject")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
