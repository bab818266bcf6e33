"""CNI side by side: mesh-cni (standalone and via the node agent) vs the real istio-cni plugin, sidecar mode.

One libcni chain (bridge + host-local + plugin, our libcni driver as a runtime), real pod network
namespaces, the same injected pod (our injector's output for a two-port pod, native sidecars)
for every plugin. istio-cni runs as a chained plugin in sidecar mode (``ambient_enabled:
false``), as an Istio install with ``components.cni.enabled=true`` configures it: it reads the
pod from the API server (a test-bed control plane; the pod objects are created first) with the
kubeconfig an install writes into its run dir, and programs the netns with the host's iptables
(the default; ``--istio-nftables`` adds a row for its ``native_nftables`` mode). Before timing,
each plugin is checked to have really programmed the redirect (istio-cni's log and the netns's
iptables rules; our nftables table).

Rounds interleave the variants so load drifts hit all alike. Prints ADD and DEL medians (libcni's
own time), the plugin's part (minus bridge + host-local alone), CPU per ADD (user+sys of the
driver and every plugin it ran, plus the agent's: robust to a busy machine), peak RSS of one
plugin run, what each needs on the host, and the ratios; goal: our ADD <= 0.5x istio-cni's.

    sudo .venv/bin/python bench/bench_istio_cni.py [--rounds 20] [--istio-nftables]

Needs root, scripts/setup.d/20-libcni.sh (driver, reference plugins), the test bed's Kubernetes
binaries and scripts/setup.d/60-istio.sh (istio-cni, host iptables). Traffic: none leaves the
netns it creates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
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

from bench_cni import agent_cpu_ms, driver_ms  # noqa: E402

from injector.core import inject  # noqa: E402
from injector.result import Decision  # noqa: E402
from tests.cni.cnitest import DRIVER, CniBed, Pod, nft_ruleset  # noqa: E402
from tests.istio import oracle  # noqa: E402
from tests.testbed.controlplane import ControlPlane  # noqa: E402

GOAL_RATIO = 0.5
NAMESPACE = "bench-cni"


def injected_pod() -> dict[str, Any]:
    """Our injector's output (CNI capture, native sidecars) for a pod with two ports."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web", "namespace": NAMESPACE, "labels": {"app": "web"}},
           "spec": {"containers": [{"name": "web", "image": "registry.example.com/web:1",
                                    "ports": [{"containerPort": 8080}, {"containerPort": 9090}]}]}}
    result = inject(pod, config=oracle.our_config(oracle.Mode("cni", True)))
    assert result.decision is Decision.INJECT, result.reason
    return result.mutated


def create_pods(plane: ControlPlane, template: dict[str, Any], names: list[str]) -> None:
    """The pod objects istio-cni GETs (they stay Pending: no node)."""
    items = []
    for name in names:
        pod = json.loads(json.dumps(template))
        pod["metadata"]["name"] = name
        items.append(pod)
    plane.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def istio_entry(run_dir: Path, nftables: bool) -> dict[str, Any]:
    """istio-cni's chained entry as Istio's install writes it for sidecar mode."""
    return {"type": "istio-cni", "plugin_log_level": "info", "cni_agent_run_dir": str(run_dir),
            "ambient_enabled": False, "enablement_selectors": [], "exclude_namespaces": ["kube-system"],
            "pod_namespace": "istio-system", "native_nftables": nftables}


def write_istio_conflist(bed: CniBed, name: str, entry: dict[str, Any]) -> None:
    """bed.conflist with istio-cni instead of mesh-cni (same bridge + host-local entry)."""
    bed.conflist(name, with_plugin=False)
    path = bed.conf_dir / f"{name}.conflist"
    conf = json.loads(path.read_text())
    conf["plugins"].append(entry)
    path.write_text(json.dumps(conf))


class Runner:
    """ADD/DEL one pod per call through a named network; wall (libcni) and CPU times."""

    def __init__(self, bed: CniBed, annotations: dict[str, str], agent_pid: int) -> None:
        self.bed, self.annotations, self.agent_pid = bed, annotations, agent_pid
        self.names = iter(f"p{i}" for i in range(100_000))

    def pod(self) -> Pod:
        return self.bed.new_pod(self.annotations, namespace=NAMESPACE, name=next(self.names))

    def call(self, command: str, pod: Pod, network: str) -> tuple[float, float, str]:
        """(libcni ms, CPU ms of the driver + plugins + the agent's share, stderr)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        agent_before = agent_cpu_ms(self.agent_pid)
        done = self.bed.driver(command, pod, network, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
        cpu += agent_cpu_ms(self.agent_pid) - agent_before
        return driver_ms(done), cpu, done.stderr

    def round(self, network: str) -> tuple[float, float, float]:
        """ADD then DEL of a new pod: (ADD ms, DEL ms, ADD CPU ms)."""
        pod = self.pod()
        try:
            add, cpu, _ = self.call("add", pod, network)
            delete, _, _ = self.call("del", pod, network)
        finally:
            self.bed.delete_netns(pod)
            self.bed.pods.remove(pod)
        return add, delete, cpu


def netns_iptables(pod: Pod) -> str:
    done = subprocess.run(["ip", "netns", "exec", Path(pod.netns).name, "iptables-save", "-t", "nat"],
                          capture_output=True, text=True, check=False)
    return done.stdout


def check_programmed(runner: Runner, network: str, kind: str) -> str:
    """ADD one pod and show that the redirect is in its netns; returns a line saying how."""
    pod = runner.pod()
    try:
        _, _, stderr = runner.call("add", pod, network)
        if kind == "ours":
            rules = nft_ruleset(pod.netns)
            assert "table inet mesh_cni" in rules, rules
            assert all(f"redirect to :{port}" in rules for port in (15001, 15006)), rules
            return f"nft table inet mesh_cni with {rules.count('redirect')} redirect rules"
        backend = "nftables" if kind == "istio-nft" else "iptables"
        logged = f"Start {backend} configuration for {pod.name}"
        assert logged in stderr, f"istio-cni did not log {logged!r}:\n{stderr[-2000:]}"
        rules = nft_ruleset(pod.netns) if kind == "istio-nft" else netns_iptables(pod)
        # Outbound to 15001, inbound to 15006, in the pod's netns (not the host's).
        targets = (("redirect to :15001", "redirect to :15006") if kind == "istio-nft" else
                   ("-j REDIRECT --to-ports 15001", "-j REDIRECT --to-ports 15006"))
        assert all(t in rules for t in targets), f"istio-cni's redirect missing:\n{rules}"
        redirects = len(re.findall(r"REDIRECT|redirect to", rules))
        listing = "nft list ruleset" if kind == "istio-nft" else "iptables-save -t nat"
        return f"log {logged!r}; {listing}: {redirects} redirect rules"
    finally:
        runner.call("del", pod, network)
        runner.bed.delete_netns(pod)
        runner.bed.pods.remove(pod)


def peak_rss_kib(argv: list[str], env: dict[str, str], stdin: bytes) -> int:
    """Max RSS of one run, by GNU time: its fork carries time's ~2 MiB, not this interpreter's."""
    with tempfile.NamedTemporaryFile() as out:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *argv], input=stdin, env=env,
                       capture_output=True, check=False)
        return int(Path(out.name).read_text().split()[-1])


def pod_gets(plane: ControlPlane) -> float:
    """GET requests on pods the API server has answered so far (its own counter)."""
    text = plane.get_raw("/metrics").decode()
    return sum(float(m.group(1)) for m in re.finditer(
        r'^apiserver_request_total\{[^}]*resource="pods"[^}]*verb="GET"[^}]*\} (\S+)$', text, re.M))


def iptables_version() -> str:
    found = shutil.which("iptables")
    if not found:
        return "missing"
    return subprocess.run([found, "--version"], capture_output=True, text=True).stdout.strip()


def ensure_host_tools() -> None:
    """iptables (istio-cni runs it) and GNU time (peak RSS); apt when missing."""
    missing = [pkg for pkg, path in (("iptables", "/usr/sbin/iptables-restore"), ("time", "/usr/bin/time"))
               if not os.path.exists(path)]
    if missing and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--istio-nftables", action="store_true",
                        help="also istio-cni with native_nftables (runs the host's nft)")
    args = parser.parse_args(argv)
    istio_cni = oracle.bin_dir() / "istio-cni"
    if os.geteuid() != 0 or not DRIVER.exists() or not istio_cni.exists():
        print(f"needs root, the libcni driver at {DRIVER} (scripts/setup.d/20-libcni.sh) and "
              f"{istio_cni} (scripts/setup.d/60-istio.sh)")
        return 1
    ensure_host_tools()

    tmp = Path(tempfile.mkdtemp(prefix="bench-istio-cni-"))
    plane = ControlPlane.start(tmp / "cp")
    bed = CniBed(tmp / "bed")
    agent = None
    try:
        pod = injected_pod()
        annotations = dict(pod["metadata"]["annotations"])
        plane.create_namespace(NAMESPACE)
        variants = ["base", "mesh", "agent", "istio"] + (["istio-nft"] if args.istio_nftables else [])
        checks = len(variants)
        create_pods(plane, pod, [f"p{i}" for i in range((args.rounds + 2) * len(variants) + checks + 4)])

        run_dir = tmp / "istio-cni-run"
        run_dir.mkdir()
        # What Istio's install writes for the plugin: a kubeconfig in its run dir (here the admin one).
        shutil.copy(plane.kubeconfig, run_dir / "istio-cni-kubeconfig")
        (bed.bin_dir / "istio-cni").symlink_to(istio_cni)
        agent_socket = tmp / "agent.sock"
        bed.conflist("base", with_plugin=False)
        bed.conflist("mesh", plugin={"logFile": ""})
        bed.conflist("agent", plugin={"logFile": "", "agentSocket": str(agent_socket)})
        write_istio_conflist(bed, "istio", istio_entry(run_dir, False))
        write_istio_conflist(bed, "istio-nft", istio_entry(run_dir, True))
        launcher = bed.bin_dir / "mesh-cni"
        agent = subprocess.Popen([str(launcher), "agent", "--socket", str(agent_socket)],
                                 stderr=subprocess.DEVNULL, env={"PATH": os.environ["PATH"]})
        while not agent_socket.exists():
            time.sleep(0.05)
        runner = Runner(bed, annotations, agent.pid)

        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
              f"istio-cni {oracle.version()} (sidecar mode), host {iptables_version()}")
        print("redirect programmed (checked before timing):")
        for variant, kind in (("mesh", "ours"), ("agent", "ours"), ("istio", "istio"),
                              ("istio-nft", "istio-nft")):
            if variant in variants:
                print(f"  {variant:10s} {check_programmed(runner, variant, kind)}")

        for variant in variants:  # warm-up: page cache, bridge, pyc files, Go binary pages
            runner.round(variant)
        samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        gets_before = pod_gets(plane)
        for _ in range(args.rounds):
            for variant in variants:
                samples[variant].append(runner.round(variant))
        istio_runs = args.rounds * sum(v.startswith("istio") for v in variants)
        gets = pod_gets(plane) - gets_before

        med = {v: tuple(statistics.median(column) for column in zip(*rows, strict=True))
               for v, rows in samples.items()}
        base_add, base_del, base_cpu = med["base"]
        labels = {"base": "bridge + host-local", "mesh": "+ mesh-cni standalone",
                  "agent": "+ mesh-cni via node agent", "istio": "+ istio-cni (iptables)",
                  "istio-nft": "+ istio-cni (native_nftables)"}
        print(f"\nlibcni chain, median of {args.rounds} interleaved rounds per variant (injected pod), "
              f"load average {os.getloadavg()[0]:.2f}:")
        print(f"{'chain':32s} {'ADD ms':>8s} {'DEL ms':>8s} {'plugin ADD':>11s} {'plugin DEL':>11s} "
              f"{'ADD CPU ms':>11s} {'plugin CPU':>11s}")
        for variant in variants:
            add, delete, cpu = med[variant]
            extra = "" if variant == "base" else (f" {add - base_add:11.1f} {delete - base_del:11.1f}")
            cpu_extra = "" if variant == "base" else f" {cpu - base_cpu:11.1f}"
            print(f"{labels[variant]:32s} {add:8.1f} {delete:8.1f}{extra or ' ' * 24} {cpu:11.1f}{cpu_extra}")

        # Peak RSS of one plugin process (ru_maxrss: the largest of it and the children it waited
        # for, e.g. iptables-restore), each an ADD into a new pod's netns; the floor is GNU time's.
        rss = {}
        for name, argv_, config in (
                ("mesh-cni standalone", [str(launcher)],
                 {"type": "mesh-cni", "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}),
                ("mesh-cni via agent", [str(launcher)],
                 {"type": "mesh-cni", "agentSocket": str(agent_socket),
                  "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}),
                ("istio-cni (iptables)", [str(istio_cni)], istio_entry(run_dir, False))):
            one = runner.pod()
            env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": one.container_id, "CNI_NETNS": one.netns,
                   "CNI_IFNAME": "eth0", "CNI_PATH": str(bed.bin_dir), "PATH": os.environ["PATH"],
                   "CNI_ARGS": f"K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={one.name}"}
            stdin = json.dumps({"cniVersion": "1.0.0", "name": "bench", **config}).encode()
            rss[name] = peak_rss_kib(argv_, env, stdin) / 1024
            bed.delete_netns(one)
            bed.pods.remove(one)
        rss["floor (/bin/true)"] = peak_rss_kib(["/bin/true"], {}, b"") / 1024
        agent_rss = int(Path(f"/proc/{agent.pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
        print("\npeak RSS of one ADD: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in rss.items())
              + f"; resident node agent {agent_rss:.1f} MiB")

        print("\nwhat each needs on the host:")
        print("  mesh-cni : a Python 3 interpreter and the cni package; netlink only (no binaries, no API "
              "call: the pod's annotations come from the runtime); the node agent is optional")
        print(f"  istio-cni: its {istio_cni.stat().st_size / 2**20:.0f} MiB static binary; iptables-restore/"
              f"-save ({iptables_version()}), or nft for native_nftables; a kubeconfig at "
              f"<cni_agent_run_dir>/istio-cni-kubeconfig; the API server: {gets:.0f} GETs of pods over "
              f"{istio_runs} istio-cni ADDs (apiserver_request_total over the timed rounds, ours included)")

        istio_add, istio_del, istio_cpu = (v - b for v, b in zip(med["istio"], med["base"], strict=True))
        print("\nratios (the plugin's part of the chain, ours / istio-cni (iptables)):")
        for variant in ("mesh", "agent"):
            add, delete, cpu = med[variant]
            ratio = (add - base_add) / istio_add
            print(f"  {labels[variant][2:]:26s} ADD {ratio:5.2f}x  "
                  f"DEL {(delete - base_del) / istio_del:5.2f}x  "
                  f"ADD CPU {(cpu - base_cpu) / istio_cpu:5.2f}x   "
                  f"goal ADD <= {GOAL_RATIO}x: {'met' if ratio <= GOAL_RATIO else 'missed'}")
        print(f"  whole chain ADD: mesh-cni standalone {med['mesh'][0] / med['istio'][0]:.2f}x, "
              f"via agent {med['agent'][0] / med['istio'][0]:.2f}x of the istio-cni chain's")
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(10)
        bed.cleanup()
        plane.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
