"""Webhook side by side: ``mesh-injector serve`` vs the real istiod's ``/inject``, same load, same machine.

istiod (``pilot-discovery discovery`` of the pinned Istio build) runs against a test-bed API
server with the ConfigMaps of a default-profile install from ``istioctl manifest generate``
(CNI capture, as our default), serving its webhook with its own certificate; ours runs with
its defaults (``--workers 0``: one per CPU) and the same API server (both then inject native
sidecars, Kubernetes 1.37), events off. Both are driven by the same ``wrk`` (HTTPS,
keep-alive, 16 connections, 2 threads) with the same AdmissionReviews: the typical pod of
bench_server.py and that pod with 2,000 env vars on its first container. Before measuring,
each server's answer is checked to be a real injection (a non-empty patch adding istio-proxy).
Rounds alternate between the servers so that load drifts hit both alike.

Prints per pod and server reviews/s, p50/p99, server CPU per review, RSS (VmRSS after the runs,
VmHWM), the ratios ours/istiod and the goal (ours >= istiod's reviews/s at <= its p99).

    .venv/bin/python bench/bench_istio_webhook.py [--duration 10] [--rounds 2] [--workers 0]

Needs wrk (apt), the test bed's Kubernetes binaries and the Istio build (scripts/setup.d/60-istio.sh).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_server as bs  # noqa: E402

from tests.istio import oracle  # noqa: E402
from tests.istio.istiod import Istiod, added_containers, patch_of, post_review  # noqa: E402
from tests.testbed.controlplane import ControlPlane  # noqa: E402

ENV_COUNT = 2000
PROXY_CONTAINERS = ("istio-proxy", "istio-validation", "istio-init")


def env_review() -> dict[str, Any]:
    """The typical review with 2,000 env vars on the first container (a config-heavy pod)."""
    review = copy.deepcopy(bs.typical_review())
    review["request"]["uid"] = "705ab4f5-6393-11e8-b7cc-42010a800003"
    review["request"]["object"]["spec"]["containers"][0]["env"] += [
        {"name": f"SETTING_{i:04d}", "value": f"value-{i:04d}-abcdefghijklmnopqrstuvwx"}
        for i in range(ENV_COUNT)]
    return review


def wrk_script(tmp: Path, name: str, review: dict[str, Any]) -> Path:
    body = tmp / f"{name}.json"
    body.write_text(json.dumps(review))
    script = tmp / f"{name}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
        'wrk.headers["Content-Type"] = "application/json"\n')
    return script


def injection_shape(answer: dict[str, Any]) -> str:
    """What the answer's patch does to the pod, in a few words; fails unless it adds istio-proxy.

    Reading the patch keeps the comparison honest: a server answering "allowed, no patch" fast
    would otherwise win.
    """
    assert (answer.get("response") or {}).get("allowed"), f"not allowed: {answer.get('response')}"
    patch = patch_of(answer)
    added = added_containers(patch)
    assert any(name == "istio-proxy" for name, _ in added), f"no istio-proxy in the patch: {added}"
    return (f"{len(patch)} ops, {len(answer['response']['patch'])} B base64; "
            + ", ".join(f"{name} in {field}" for name, field in added if name in PROXY_CONTAINERS))


def start_ours(tmp: Path, port: int, workers: int, kubeconfig: Path, log: Any,
               memo: bool = False) -> subprocess.Popen[bytes]:
    """``mesh-injector serve`` as bench_server starts it, plus the test bed's kubeconfig.

    With it our ``nativeSidecars: auto`` reads the API server's version (1.37: native sidecars),
    as istiod does, so both inject the same shape. Events stay off (istiod sends none per review).
    The answer memo is off unless ``memo``: every review here is the same pod, and istiod
    has no memo, so with it on this would compare our memo with istiod's injection.
    """
    return subprocess.Popen(
        [*bs.serve_command(), "serve", "--address", "127.0.0.1", "--port", str(port),
         "--tls-cert-file", str(tmp / "tls.crt"), "--tls-key-file", str(tmp / "tls.key"), "--no-events",
         "--workers", str(workers), "--kubeconfig", str(kubeconfig), "--answer-memo", "512" if memo else "0"],
        stdout=log, stderr=subprocess.STDOUT)


def rss_mib(pid: int) -> tuple[float, float]:
    rss, hwm = bs.rss_kib(pid)
    return rss / 1024, hwm / 1024


def measure(wrk: str, url: str, script: Path, seconds: float, connections: int, threads: int,
            pid: int) -> dict[str, float]:
    """One wrk run plus the server's CPU per request over it (robust to the machine's load)."""
    cpu_before = bs.cpu_seconds(pid)
    m = bs.run_wrk(wrk, f"{url}/inject", script, seconds, connections, threads)
    m["cpu_ms"] = (bs.cpu_seconds(pid) - cpu_before) * 1000 / max(m["requests"], 1)
    return m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per server and pod")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=0, help="our server's workers (0: its default)")
    parser.add_argument("--memo", action="store_true",
                        help="our answer memo on (every review is the same pod: replicas)")
    args = parser.parse_args(argv)
    wrk = bs.ensure_wrk()
    if oracle.istioctl() is None:
        raise SystemExit(f"Istio build missing under {oracle.bin_dir()}: run scripts/setup.d/60-istio.sh")

    tmp = Path(tempfile.mkdtemp(prefix="bench-istio-webhook-"))
    plane = ControlPlane.start(tmp / "cp")
    istiod: Istiod | None = None
    ours = None
    log = (tmp / "ours.log").open("wb")
    try:
        istiod = Istiod.start(plane, workdir=tmp / "istiod")
        bs.write_fixtures(tmp)
        port = bs.free_port()
        ours_url = f"https://127.0.0.1:{port}"
        ours = start_ours(tmp, port, args.workers, plane.kubeconfig, log, args.memo)
        if not bs.wait_ready(ours_url, ssl.create_default_context(cafile=str(tmp / "ca.crt")), ours,
                             tmp / "ours.log"):
            return 1
        time.sleep(1.0)  # every worker up
        servers = {"ours": (ours_url, ours.pid), "istiod": (istiod.url, istiod.pid)}
        pods = {"typical pod": bs.typical_review(), f"{ENV_COUNT}-env pod": env_review()}
        scripts = {name: wrk_script(tmp, f"pod{i}", review) for i, (name, review) in enumerate(pods.items())}

        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
              f"istiod {oracle.version()} (pilot-discovery, GOMAXPROCS default), "
              f"ours: mesh-injector serve --workers {args.workers or 'default (one per CPU)'}, answer memo "
              f"{'on' if args.memo else 'off (--answer-memo 0)'}")
        print(f"API server: kube-apiserver (test bed), istiod config from istioctl manifest generate "
              f"(default profile, CNI on, tag {oracle.release()['ISTIO_PROXY_TAG']})")
        for pod_name, review in pods.items():
            for server, (url, _) in servers.items():
                print(f"  {pod_name:14s} {server:6s}: {injection_shape(post_review(url, review))}")

        samples: dict[tuple[str, str], list[dict[str, float]]] = {}
        for pod_name, script in scripts.items():
            for url, _ in servers.values():  # warm-up
                bs.run_wrk(wrk, f"{url}/inject", script, 2, args.connections, args.threads, quiet=True)
            for round_index in range(args.rounds):
                order = list(servers.items()) if round_index % 2 == 0 else list(servers.items())[::-1]
                for server, (url, pid) in order:
                    m = measure(wrk, url, script, args.duration, args.connections, args.threads, pid)
                    samples.setdefault((pod_name, server), []).append(m)
                    print(f"    round {round_index + 1} {pod_name:14s} {server:6s} {m['rps']:8.0f} reviews/s "
                          f"p99 {m['p99']:7.2f} ms", flush=True)

        load = os.getloadavg()[0]
        print(f"\nHTTPS keep-alive, {args.connections} connections, wrk -t{args.threads}, "
              f"{args.rounds} x {args.duration:.0f} s per server and pod (median of rounds), "
              f"load average {load:.2f}:")
        print(f"{'pod':14s} {'server':7s} {'reviews/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} "
              f"{'CPU ms/review':>14s} {'errors':>7s}")
        med: dict[tuple[str, str], dict[str, float]] = {}
        for (pod_name, server), runs in samples.items():
            med[(pod_name, server)] = m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            errors = sum(r["non2xx"] + r["sockerr"] for r in runs)
            print(f"{pod_name:14s} {server:7s} {m['rps']:10.0f} {m['p50']:8.2f} {m['p99']:8.2f} "
                  f"{m['cpu_ms']:14.3f} {errors:7.0f}")
        for server, (_, pid) in servers.items():
            rss, hwm = rss_mib(pid)
            print(f"RSS {server:7s}: {rss:7.1f} MiB now, peak (VmHWM) {hwm:7.1f} MiB"
                  + (" (supervisor + workers)" if server == "ours" else ""))
        ours_rss, istiod_rss = rss_mib(ours.pid)[0], rss_mib(istiod.pid)[0]
        print(f"ratio RSS ours/istiod: {ours_rss / istiod_rss:.2f}")
        print("ratios ours/istiod and the goal (ours >= istiod's reviews/s at <= its p99):")
        for pod_name in pods:
            o, i = med[(pod_name, "ours")], med[(pod_name, "istiod")]
            met = o["rps"] >= i["rps"] and o["p99"] <= i["p99"]
            print(f"  {pod_name:14s} reviews/s {o['rps'] / i['rps']:5.2f}x  p50 {o['p50'] / i['p50']:5.2f}x  "
                  f"p99 {o['p99'] / i['p99']:5.2f}x  CPU/review {o['cpu_ms'] / i['cpu_ms']:5.2f}x   "
                  f"goal {'met' if met else 'missed'}")
    finally:
        if ours is not None:
            bs.stop(ours)
        log.close()
        if istiod is not None:
            istiod.stop()
        plane.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if oracle.istio_files.cache_info().currsize:  # what manifest generate gave: not kept
            shutil.rmtree(oracle.istio_files("cni"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
