"""What the `envoy` template's data plane costs: added latency per hop, throughput, memory.

Three pods on one bridge (CNI-wired by bridge + host-local + mesh-cni, as in tests/envoy):
``client`` and ``plain`` are unmeshed, ``meshed`` runs the agent and a real Envoy as uid 1337
behind the redirect. Each pod runs the same tiny HTTP server (bench/loadgen.py serve).

- direct:   client -> plain            (no proxy)
- inbound:  client -> meshed            (through meshed's Envoy, inbound listener)
- outbound: meshed -> plain             (from meshed's app, through its Envoy, outbound listener)

All six scenarios (three paths x keep-alive / new connection per request) run interleaved in
rounds, in a shuffled order per round, open loop at a fixed rate; latency counts from each
request's due time. "Added" is the proxied percentile minus the direct one for the same mode:
one hop each. Then: max requests/s (closed loop) direct and through each listener, and RssAnon
and Pss of the proxy container's processes (agent + Envoy) idle and under load.

    sudo .venv/bin/python bench/bench_dataplane.py [--rounds 3] [--seconds 2] [--rate 1000]

Targets (2-core machine): added p50 <= 0.3 ms and p99 <= 1 ms per hop at 1,000 rps keep-alive;
<= 30 MiB anonymous memory idle.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cni.cnitest import INJECTED, CniBed, Pod  # noqa: E402
from tests.envoy.meshbed import Meshed, _preexec, spawn, stop  # noqa: E402

LOADGEN = str(REPO / "bench" / "loadgen.py")
PORT = 8090


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # ms


def _loadgen(pod: Pod, *args: object, timeout: float = 120) -> dict:
    done = subprocess.run(
        [sys.executable, LOADGEN, *map(str, args)],
        preexec_fn=_preexec(pod.netns, None),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


def _memory(pids: list[int]) -> tuple[float, float]:
    """(RssAnon, Pss) in MiB summed over the processes."""
    anon = pss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon += int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
    return anon / 1024, pss / 1024


def _proxy_pids(mesh: Meshed) -> list[int]:
    assert mesh.agent is not None
    agent = mesh.agent.pid
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    return [agent, *map(int, children)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per scenario per round")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered requests/s (open loop)")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="closed-loop throughput run")
    parser.add_argument("--max-connections", type=int, default=64, help="closed-loop connections")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-dataplane-"))
    bed = CniBed(tmp)
    bed.conflist("meshnet")
    servers = []
    mesh: Meshed | None = None
    try:
        client = bed.add_pod("meshnet", {}, name="client")
        plain = bed.add_pod("meshnet", {}, name="plain")
        meshed = bed.add_pod("meshnet", dict(INJECTED), name="meshed")
        for pod in (plain, meshed):
            server = spawn(pod, [sys.executable, LOADGEN, "serve", str(PORT)])
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            servers.append(server)
        mesh = Meshed(pod=meshed, log=tmp / "proxy.log", env={"MESH_ACCESS_LOG": "false"})
        mesh.start_agent(concurrency=2)  # as the envoy template runs it
        time.sleep(2)
        idle_anon, idle_pss = _memory(_proxy_pids(mesh))
        agent_anon, agent_pss = _memory(_proxy_pids(mesh)[:1])

        paths = {
            "direct": (client, plain.ipv4),
            "inbound": (client, meshed.ipv4),
            "outbound": (meshed, plain.ipv4),
        }
        scenarios = [(path, mode) for path in paths for mode in ("keepalive", "newconn")]
        latencies: dict[tuple[str, str], list[int]] = {s: [] for s in scenarios}
        errors: dict[tuple[str, str], int] = dict.fromkeys(scenarios, 0)
        rng = random.Random(13)
        for _ in range(args.rounds):
            order = scenarios[:]
            rng.shuffle(order)
            for path, mode in order:
                source, host = paths[path]
                result = _loadgen(source, "open", host, PORT, args.rate, args.seconds, mode)
                latencies[(path, mode)] += result["latencies_us"]
                errors[(path, mode)] += result["errors"]

        load = os.getloadavg()
        print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
        print(
            f"open loop {args.rate:g} rps, {args.rounds} rounds x {args.seconds:g}s per scenario, interleaved"
        )
        print(
            f"{'scenario':<22}{'n':>7}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
            f"{'+p50':>8}{'+p99':>8}{'+p99.9':>8}"
        )
        for path, mode in scenarios:
            values = latencies[(path, mode)]
            p = [_percentile(values, q) for q in (0.5, 0.99, 0.999)]
            base = [_percentile(latencies[("direct", mode)], q) for q in (0.5, 0.99, 0.999)]
            added = (
                "".join(f"{a - b:>8.3f}" for a, b in zip(p, base, strict=True)) if path != "direct" else ""
            )
            print(
                f"{path + ' ' + mode:<22}{len(values):>7}{errors[(path, mode)]:>5}"
                f"{p[0]:>9.3f}{p[1]:>9.3f}{p[2]:>10.3f}{added}"
            )

        conns, secs = args.max_connections, args.max_seconds
        print(f"\nmax requests/s (closed loop, keep-alive, {conns} connections, {secs:g}s)")
        samples: list[tuple[float, float]] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.25):
                samples.append(_memory(_proxy_pids(mesh)))  # type: ignore[arg-type]

        for path in ("direct", "inbound", "outbound"):
            source, host = paths[path]
            sampler = threading.Thread(target=sample) if path != "direct" else None
            if sampler:
                sampling.clear()
                sampler.start()
            rps = _loadgen(source, "closed", host, PORT, args.max_connections, args.max_seconds)["rps"]
            if sampler:
                sampling.set()
                sampler.join()
            print(f"  {path:<10}{rps:>10.0f} rps")
        load_anon = max(s[0] for s in samples)
        load_pss = max(s[1] for s in samples)
        print("\nproxy container memory (agent + Envoy), MiB")
        print(f"  idle        RssAnon {idle_anon:6.1f}   Pss {idle_pss:6.1f}")
        print(f"    of which the agent  RssAnon {agent_anon:6.1f}   Pss {agent_pss:6.1f}")
        print(f"  under load  RssAnon {load_anon:6.1f}   Pss {load_pss:6.1f}   (max over samples)")
        print("targets: +p50 <= 0.3 ms, +p99 <= 1 ms per hop keep-alive at 1,000 rps; RssAnon idle <= 30 MiB")
        return 0
    finally:
        if mesh is not None:
            mesh.close()
        for server in servers:
            stop(server)
        bed.cleanup("meshnet")


if __name__ == "__main__":
    sys.exit(main())
