"""What the `envoy` template's data plane costs: added latency per hop, throughput, memory.

Pods on one bridge (CNI-wired by bridge + host-local + mesh-cni, as in tests/envoy): ``client``
and ``plain`` are unmeshed; each variant gets its own ``meshed`` pod running the agent and a real
Envoy as uid 1337 behind the redirect. Each pod runs the same tiny HTTP server (bench/loadgen.py
serve).

- direct:   client -> plain            (no proxy)
- inbound:  client -> meshed            (through meshed's Envoy, inbound listener)
- outbound: meshed -> plain             (from meshed's app, through its Envoy, outbound listener)

All scenarios (direct, then inbound and outbound per variant, x keep-alive / new connection per
request) run interleaved in rounds, in a shuffled order per round, open loop at a fixed rate;
latency counts from each request's due time. "Added" is the proxied percentile minus the direct
one for the same mode: one hop each. The generator's own lateness (how long after its due time
a request was written) is printed too: it enters every row alike. Then: max requests/s (closed
loop) direct and through each listener, and RssAnon and Pss of the proxy container's processes
(agent + Envoy) idle and under load.

``--variant`` (repeatable) compares bootstraps side by side in the same run: ``shipped`` is the
template as injected (its worker count, access logs on); ``--list-variants`` shows the others.

    sudo .venv/bin/python bench/bench_dataplane.py [--rounds 3] [--seconds 2] [--rate 1000]
    sudo .venv/bin/python bench/bench_dataplane.py --variant shipped --variant c2 --variant tcp

Targets (2-core machine): added p50 <= 0.3 ms and p99 <= 1 ms per hop at 1,000 rps keep-alive;
<= 30 MiB anonymous memory idle.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from injector.core import inject  # noqa: E402
from tests.cni.cnitest import INJECTED, CniBed, Pod  # noqa: E402
from tests.envoy.meshbed import Meshed, _preexec, spawn, stop  # noqa: E402

LOADGEN = str(REPO / "bench" / "loadgen.py")
PORT = 8090
Boot = dict[str, Any]


def _capture_hcms(boot: Boot) -> Iterator[dict[str, Any]]:
    """The HTTP connection managers of the two capture listeners."""
    for listener in boot["static_resources"]["listeners"]:
        if "traffic_direction" in listener:
            for chain in listener["filter_chains"]:
                for f in chain["filters"]:
                    if f["name"] == "envoy.filters.network.http_connection_manager":
                        yield f["typed_config"]


def _capture_listeners(boot: Boot) -> Iterator[dict[str, Any]]:
    yield from (x for x in boot["static_resources"]["listeners"] if "traffic_direction" in x)


def _no_http_inspector(boot: Boot) -> None:
    for listener in _capture_listeners(boot):
        listener["listener_filters"] = listener["listener_filters"][:1]
        chains = listener["filter_chains"]
        listener["filter_chains"] = [
            c for c in chains if "application_protocols" not in c["filter_chain_match"]
        ]


def _hcm_set(**fields: Any) -> Callable[[Boot], None]:
    def patch(boot: Boot) -> None:
        for hcm in _capture_hcms(boot):
            hcm.update(fields)

    return patch


def _router_set(**fields: Any) -> Callable[[Boot], None]:
    def patch(boot: Boot) -> None:
        for hcm in _capture_hcms(boot):
            hcm["http_filters"][-1]["typed_config"].update(fields)

    return patch


def _top_set(**fields: Any) -> Callable[[Boot], None]:
    def patch(boot: Boot) -> None:
        boot.update(copy.deepcopy(fields))

    return patch


def _log_unfiltered(boot: Boot) -> None:
    for hcm in _capture_hcms(boot):
        for log in hcm["access_log"]:
            log.pop("filter", None)


def _log_text(boot: Boot) -> None:
    for hcm in _capture_hcms(boot):
        for log in hcm["access_log"]:
            fmt = log["typed_config"]["log_format"]
            fmt["text_format"] = " ".join(fmt.pop("json_format").values()) + "\n"


def _all(*patches: Callable[[Boot], None]) -> Callable[[Boot], None]:
    def patch(boot: Boot) -> None:
        for one in patches:
            one(boot)

    return patch


def _as_injected() -> tuple[Boot, int]:
    """The bootstrap and worker count the envoy template gives a pod, read from the injection."""
    meta = {"name": "bench", "namespace": "default", "annotations": {"inject.istio.io/templates": "envoy"}}
    spec = {"containers": [{"name": "app", "image": "app"}]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    proxy = next(c for c in inject(pod).mutated["spec"]["containers"] if c["name"] == "istio-proxy")
    args = proxy["args"]
    return json.loads(args[args.index("--config-yaml") + 1]), int(args[args.index("--concurrency") + 1])


SHIPPED_BOOTSTRAP, SHIPPED_CONCURRENCY = _as_injected()


@dataclass(frozen=True)
class Variant:
    """One proxy configuration under test: a bootstrap edit, Envoy's workers, access logs."""

    doc: str
    concurrency: int = SHIPPED_CONCURRENCY
    patch: Callable[[Boot], None] | None = None
    access_log: bool = True

    def bootstrap(self) -> str:
        boot = copy.deepcopy(SHIPPED_BOOTSTRAP)
        if self.patch is not None:
            self.patch(boot)
        return json.dumps(boot, separators=(",", ":"))


VARIANTS: dict[str, Variant] = {
    "shipped": Variant(f"the template as injected: {SHIPPED_CONCURRENCY} worker(s), access logs on"),
    "c2": Variant("2 worker threads (the template's default before)", concurrency=2),
    "nolog": Variant("access logs off", access_log=False),
    "tcp": Variant("no HTTP sniffing: every connection TCP proxy", patch=_no_http_inspector),
    "noreqid": Variant("generate_request_id false", patch=_hcm_set(generate_request_id=False)),
    "nodynstats": Variant("router dynamic_stats false", patch=_router_set(dynamic_stats=False)),
    "nostats": Variant(
        "stats_matcher reject_all (no stats at all)",
        patch=_top_set(stats_config={"stats_matcher": {"reject_all": True}}),
    ),
    "logall": Variant("access log without the runtime filter", patch=_log_unfiltered),
    "logtext": Variant("access log as text, same fields", patch=_log_text),
    "lean": Variant(
        "nodynstats + noreqid",
        patch=_all(_router_set(dynamic_stats=False), _hcm_set(generate_request_id=False)),
    ),
}


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # ms


def _loadgen(pod: Pod, *args: object, timeout: float = 120, stdin: str | None = None) -> Any:
    done = subprocess.run(
        [sys.executable, LOADGEN, *map(str, args)],
        input=stdin,
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


def _variant(path: str, names: list[str]) -> str:
    """The variant a path goes through ("inbound c1" -> "c1"; with one variant, its name)."""
    return path.split(" ")[1] if " " in path else names[0]


def _sched(mesh: Meshed) -> tuple[int, int]:
    """Envoy's (time on CPU, time runnable but waiting for a CPU) in ns, over all its threads."""
    on_cpu = waiting = 0
    for pid in _proxy_pids(mesh)[1:]:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                run, wait, _ = (task / "schedstat").read_text().split()
                on_cpu, waiting = on_cpu + int(run), waiting + int(wait)
    return on_cpu, waiting


def _sample(mesh: Meshed, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    while not stop.wait(0.25):
        samples.append(_memory(_proxy_pids(mesh)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per scenario per round")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered requests/s (open loop)")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="closed-loop throughput run")
    parser.add_argument("--max-connections", type=int, default=64, help="closed-loop connections")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable")
    parser.add_argument(
        "--mode", action="append", choices=("keepalive", "spread", "newconn"), help="repeatable"
    )
    parser.add_argument("--latency-only", action="store_true", help="skip max rps and memory")
    parser.add_argument(
        "--interleave",
        choices=("scenario", "request"),
        default="scenario",
        help="scenario: one scenario at a time at --rate; request: all at once, request by request,"
        " --rate split across them (for A/B on a busy machine: a stall hits every row alike)",
    )
    parser.add_argument("--list-variants", action="store_true")
    args = parser.parse_args()
    if args.list_variants:
        for name, variant in VARIANTS.items():
            print(f"{name:<12}{variant.doc}")
        return 0
    names: list[str] = args.variant or ["shipped"]
    modes: list[str] = args.mode or ["keepalive", "newconn"]

    tmp = Path(tempfile.mkdtemp(prefix="bench-dataplane-"))
    bed = CniBed(tmp)
    bed.conflist("meshnet")
    servers = []
    meshes: dict[str, Meshed] = {}
    try:
        client = bed.add_pod("meshnet", {}, name="client")
        plain = bed.add_pod("meshnet", {}, name="plain")
        pods = {name: bed.add_pod("meshnet", dict(INJECTED), name=f"meshed-{name}") for name in names}
        for pod in (plain, *pods.values()):
            server = spawn(pod, [sys.executable, LOADGEN, "serve", str(PORT)])
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            servers.append(server)
        for name, pod in pods.items():
            variant = VARIANTS[name]
            env = {} if variant.access_log else {"MESH_ACCESS_LOG": "false"}
            mesh = Meshed(pod=pod, log=tmp / f"proxy-{name}.log", env=env)
            mesh.start_agent(concurrency=variant.concurrency, bootstrap=variant.bootstrap())
            meshes[name] = mesh
        time.sleep(2)
        idle = {name: _memory(_proxy_pids(m)) for name, m in meshes.items()}
        agent_only = {name: _memory(_proxy_pids(m)[:1]) for name, m in meshes.items()}

        paths: dict[str, tuple[Pod, str]] = {"direct": (client, plain.ipv4)}
        for name, pod in pods.items():
            suffix = f" {name}" if len(names) > 1 else ""
            paths["inbound" + suffix] = (client, pod.ipv4)
            paths["outbound" + suffix] = (pod, plain.ipv4)
        scenarios = [(path, mode) for path in paths for mode in modes]
        latencies: dict[tuple[str, str], list[int]] = {s: [] for s in scenarios}
        late: dict[tuple[str, str], list[int]] = {s: [] for s in scenarios}
        errors: dict[tuple[str, str], int] = dict.fromkeys(scenarios, 0)
        # Per variant and mode: Envoy's CPU time and run-queue wait (ns), and the requests served.
        work: dict[tuple[str, str], list[int]] = {(n, m): [0, 0, 0] for n in names for m in modes}

        def account(name: str, mode: str, before: tuple[int, int], requests: int) -> None:
            after = _sched(meshes[name])
            cell = work[(name, mode)]
            cell[0] += after[0] - before[0]
            cell[1] += after[1] - before[1]
            cell[2] += requests

        rng = random.Random(13)
        for _ in range(args.rounds):
            if args.interleave == "request":
                spec = [
                    {"netns": None if source is client else source.netns, "host": host, "port": PORT}
                    for source, host in paths.values()
                ]
                for mode in modes:
                    before = {name: _sched(m) for name, m in meshes.items()}
                    results = _loadgen(client, "mix", args.rate, args.seconds, mode, stdin=json.dumps(spec))
                    for path, result in zip(paths, results, strict=True):
                        latencies[(path, mode)] += result["latencies_us"]
                        late[(path, mode)] += result["late_us"]
                        errors[(path, mode)] += result["errors"]
                    for name in names:
                        served = sum(
                            len(r["latencies_us"])
                            for p, r in zip(paths, results, strict=True)
                            if p != "direct" and _variant(p, names) == name
                        )
                        account(name, mode, before[name], served)
                continue
            order = scenarios[:]
            rng.shuffle(order)
            for path, mode in order:
                source, host = paths[path]
                name = _variant(path, names)
                before = _sched(meshes[name]) if path != "direct" else (0, 0)
                result = _loadgen(source, "open", host, PORT, args.rate, args.seconds, mode)
                if path != "direct":
                    account(name, mode, before, len(result["latencies_us"]))
                latencies[(path, mode)] += result["latencies_us"]
                late[(path, mode)] += result["late_us"]
                errors[(path, mode)] += result["errors"]

        load = os.getloadavg()
        print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
        if load[0] > (os.cpu_count() or 1):
            print(
                "  busy machine: latency percentiles below measure CPU starvation, not the proxy;"
                " compare variants by Envoy's CPU per request"
            )
        for name in names:
            print(f"variant {name}: {VARIANTS[name].doc}")
        if args.interleave == "request":
            each = args.rate / len(paths)
            print(
                f"open loop {args.rate:g} rps in all ({each:g} per path), {args.rounds} rounds x "
                f"{args.seconds:g}s per mode, interleaved request by request"
            )
        else:
            print(
                f"open loop {args.rate:g} rps, {args.rounds} rounds x {args.seconds:g}s per scenario, "
                "interleaved"
            )
        width = max(22, *(len(f"{p} {m}") + 2 for p, m in scenarios))
        print(
            f"{'scenario':<{width}}{'n':>7}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
            f"{'+p50':>8}{'+p99':>8}{'+p99.9':>8}{'late p50/p99':>14}"
        )
        qs = (0.5, 0.99, 0.999)
        for path, mode in scenarios:
            values = latencies[(path, mode)]
            p = [_percentile(values, q) for q in qs]
            base = [_percentile(latencies[("direct", mode)], q) for q in qs]
            added = (
                "".join(f"{a - b:>8.3f}" for a, b in zip(p, base, strict=True))
                if path != "direct"
                else " " * 24
            )
            lateness = "/".join(f"{_percentile(late[(path, mode)], q):.3f}" for q in (0.5, 0.99))
            print(
                f"{path + ' ' + mode:<{width}}{len(values):>7}{errors[(path, mode)]:>5}"
                f"{p[0]:>9.3f}{p[1]:>9.3f}{p[2]:>10.3f}{added}{lateness:>14}"
            )
        print("Envoy per request: us on CPU / us runnable but waiting for a CPU (all its threads)")
        for (name, mode), (on_cpu, waiting, served) in work.items():
            per = max(served, 1) * 1000
            print(f"  {name + ' ' + mode:<28}{on_cpu / per:8.1f} / {waiting / per:.1f}")
        if args.latency_only:
            return 0

        conns, secs = args.max_connections, args.max_seconds
        print(f"\nmax requests/s (closed loop, keep-alive, {conns} connections, {secs:g}s)")
        under_load: dict[str, tuple[float, float]] = {}
        for path, (source, host) in paths.items():
            name = _variant(path, names)
            samples: list[tuple[float, float]] = []
            sampling = threading.Event()
            sampler = (
                threading.Thread(target=_sample, args=(meshes[name], sampling, samples))
                if path != "direct"
                else None
            )
            if sampler:
                sampler.start()
            rps = _loadgen(source, "closed", host, PORT, args.max_connections, args.max_seconds)["rps"]
            if sampler:
                sampling.set()
                sampler.join()
                peak = (max(s[0] for s in samples), max(s[1] for s in samples))
                old = under_load.get(name, (0.0, 0.0))
                under_load[name] = (max(old[0], peak[0]), max(old[1], peak[1]))
            print(f"  {path:<{width - 2}}{rps:>10.0f} rps")
        print("\nproxy container memory (agent + Envoy), MiB")
        for name in names:
            label = f" [{name}]" if len(names) > 1 else ""
            (idle_anon, idle_pss), (agent_anon, agent_pss) = idle[name], agent_only[name]
            load_anon, load_pss = under_load[name]
            print(f"  idle{label:<12}RssAnon {idle_anon:6.1f}   Pss {idle_pss:6.1f}")
            print(f"    of which the agent  RssAnon {agent_anon:6.1f}   Pss {agent_pss:6.1f}")
            print(f"  under load{label:<6}RssAnon {load_anon:6.1f}   Pss {load_pss:6.1f}   (peak)")
        print("targets: +p50 <= 0.3 ms, +p99 <= 1 ms per hop keep-alive at 1,000 rps; RssAnon idle <= 30 MiB")
        return 0
    finally:
        for mesh in meshes.values():
            mesh.close()
        for server in servers:
            stop(server)
        bed.cleanup("meshnet")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
