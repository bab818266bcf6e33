"""Pod start latency (create -> Ready) on the real node, with and without our webhook + plugin.

On the test bed's node (tests/testbed: kubelet 1.37 + containerd 2 + runc), in one run, one pod
at a time:
  plain          no webhook registered, no plugin in the chain (the node as it came)
  chained        our plugin chained in (installer running), pod not injected: the plugin's cost
                 on every pod of the node
  meshed-native  webhook + plugin, namespace istio-injection=enabled, native sidecars (the
                 default on 1.29+): CNI redirect, istio-validation, the proxy as an init
                 container with restartPolicy Always whose startupProbe gates the app
  meshed-classic the same with `sidecar.istio.io/nativeSidecar: "false"`: the proxy as the first
                 regular container, holdApplicationUntilProxyStarts (postStart
                 `mesh-proxy-agent wait`)
  native-startupProbe  meshed-native with the `envoy` template as it was before its native proxy
                 was held by postStart: the app gated by the proxy's startupProbe (period 1 s),
                 as Istio's sidecar template does; shows what the hold buys
The meshed variants and chained take turns pod by pod (A, B, C, D, A, ...), so load changes
on this shared machine hit them alike; plain runs first (before the plugin is installed).
Meshed pods get the `envoy` template (the Helm chart's default) with the real Envoy image the
test bed builds (tests/testbed/images.py `envoy_proxy_image`). Latency is from just before the
POST to the first watch event showing every container running / the pod Ready; p50 and p99
(nearest rank). Target: meshed p99 <= plain p99 + 1 s (create -> Ready).

Where the time goes, per pod, from containerd's events (`ctr events`, ns timestamps: container
create, process start and exit, the postStart hook's exec exit) and Envoy's info log lines:
  to first container     POST -> the first container is created (admission, scheduling, the
                         token volume, sandbox and CNI ADD with our plugin)
  validation create+start  runc creating and starting istio-validation
  istio-validation       its process start -> exit
  validation -> proxy    its exit -> the proxy container's create: the kubelet noticing the exit
                         (its PLEG relists every 1 s; with EventedPLEG containerd's exit event
                         asks for a relist of the pod at once)
  proxy create+start     runc creating and starting the proxy container
  proxy -> Envoy runs    the agent's start until Envoy's first log line: the agent's interpreter,
                         its exec of Envoy, then Envoy's own start before it logs (about half)
  Envoy init             Envoy's start until its workers start (ready on 15021)
  Envoy ready -> app     until the app container is created: the postStart hook
                         (`mesh-proxy-agent wait`) noticing it and returning, then the kubelet's
                         sync; with a startupProbe instead, its next 1 s period and the kubelet's
                         next relist
    ready -> hook done   of that, until the postStart hook's exec exited (pods with a hook)
  app create+start       runc creating and starting the app container
  app -> Ready           the app's start -> Ready seen (the readiness probes: the app's through
                         the agent's /app-health path, the proxy's own on 15021)
Each measured pod is deleted (and its containers gone) before the next is created, so every
sample starts on the same idle node. After the default rows the kubelet is restarted with the
EventedPLEG feature gate on for two extra rows (a cluster setting, not what the target is
judged on), then restarted as it was.

    .venv/bin/python bench/bench_pod_start.py [--pods 20] [--no-evented-pleg]

Attaches to a running test bed when MESH_CONTROL_PLANE and MESH_NODE are set (see
tests/testbed/README.md: `eval "$(scripts/testbed/up --node)"`), else starts its own and tears
it down. Needs root and the binaries from scripts/setup --test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.mesh import Installer, Webhook, app_pod, import_mesh_images, is_ready  # noqa: E402
from tests.testbed.controlplane import ControlPlane  # noqa: E402
from tests.testbed.node import Node  # noqa: E402
from tests.testbed.proc import pinned_binary  # noqa: E402

SLO_P99_S = 5.0
#: The issue's target: a meshed pod Ready at most this much later than a plain one, at p99.
TARGET_S = 1.0
LOG_LEVEL = "sidecar.istio.io/logLevel"


class ReadyWatch:
    """A watch on one namespace's pods recording when each pod is first seen Ready."""

    def __init__(self, plane: ControlPlane, namespace: str) -> None:
        self.ready_at: dict[str, float] = {}
        self.started_at: dict[str, float] = {}
        #: Wall-clock time Ready was first seen (to line up with containerd's event times).
        self.ready_wall: dict[str, float] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.closed = False
        self._cond = threading.Condition()
        context = ssl.create_default_context(cafile=str(plane.ca_file))
        request = urllib.request.Request(
            f"{plane.server}/api/v1/namespaces/{namespace}/pods?watch=1&timeoutSeconds=900",
            headers={"Authorization": f"Bearer {plane.token}"},
        )
        self._stream = urllib.request.urlopen(request, context=context, timeout=600)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self._stream:
                seen = time.monotonic()
                event = json.loads(line)
                pod = event.get("object") or {}
                name = pod.get("metadata", {}).get("name")
                if name and all_started(pod):
                    self.started_at.setdefault(name, seen)
                if name:
                    self.pods[name] = pod
                if name and is_ready(pod):
                    with self._cond:
                        self.started_at.setdefault(name, seen)
                        self.ready_at.setdefault(name, seen)
                        self.ready_wall.setdefault(name, time.time() - (time.monotonic() - seen))
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass  # closed by close(), or the server ended the watch

    def wait(self, name: str, timeout: float = 120.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: name in self.ready_at, timeout):
                status = (self.pods.get(name) or {}).get("status", {})
                raise TimeoutError(f"pod {name} not Ready within {timeout}s: {json.dumps(status)}")
            return self.ready_at[name]

    def close(self) -> None:
        """Stop reading. The stream is not closed here: closing an HTTP response while the
        reader thread blocks in it deadlocks; the daemon thread ends with the watch's timeout."""
        self.closed = True


_EVENT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.(\d+))? \+0000 UTC \S+ "
    r"/(tasks/start|tasks/exit|containers/create) (\{.*\})$"
)


class TaskEvents:
    """containerd's container create and task start/exit events (`ctr events`): when each
    container was created and its process really started and exited, to the nanosecond (the
    API's container times have 1 s resolution); an exec's exit is its postStart hook's end."""

    def __init__(self, node: Node) -> None:
        self.created: dict[str, float] = {}
        self.start: dict[str, float] = {}
        self.exit: dict[str, float] = {}
        self.hook_exit: dict[str, float] = {}
        argv = [str(pinned_binary("ctr")), "--address", str(node.containerd_socket), "-n", "k8s.io", "events"]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            match = _EVENT.match(line.strip())
            if not match:
                continue
            stamp, fraction, kind, body = match.groups()
            seconds = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) - time.timezone
            at = seconds + float(f"0.{fraction or 0}")
            event = json.loads(body)
            if kind == "containers/create":
                self.created.setdefault(event.get("id", ""), at)
                continue
            container = event.get("container_id", "")
            if kind == "tasks/start":
                self.start.setdefault(container, at)
            elif event.get("id", container) == container:  # the container's own process
                self.exit.setdefault(container, at)
            else:  # an exec in it: the kubelet runs postStart hooks that way
                self.hook_exit.setdefault(container, at)

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


#: The phases of a pod's start, in order (see the module docstring).
PHASES = (
    "to first container",
    "validation create+start",
    "istio-validation",
    "validation -> proxy",
    "proxy create+start",
    "proxy -> Envoy runs",
    "Envoy init",
    "Envoy ready -> app",
    "  ready -> hook done",
    "app create+start",
    "app -> Ready",
)
#: Envoy's info lines (log level info on the benchmark's meshed pods) that mark its start
#: (the agent has exec'd it) and its readiness (workers started: admin /ready answers 200).
ENVOY_STARTED, ENVOY_READY = "initializing epoch 0", "starting workers"


def log_times(plane: ControlPlane, namespace: str, pod: str, container: str) -> dict[str, float]:
    """When each of ENVOY_STARTED / ENVOY_READY was first written (the runtime's ns timestamp)."""
    out = plane.kubectl("logs", "--timestamps", "-n", namespace, pod, "-c", container, check=False).stdout
    found: dict[str, float] = {}
    for line in out.splitlines():
        stamp, _, text = line.partition(" ")
        for marker in (ENVOY_STARTED, ENVOY_READY):
            if marker in text and marker not in found:
                whole, _, fraction = stamp.rstrip("Z").partition(".")
                seconds = time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) - time.timezone
                found[marker] = seconds + float(f"0.{fraction or 0}")
    return found


def phases(
    pod: dict[str, Any], created: float, ready: float, tasks: TaskEvents, envoy: dict[str, float]
) -> dict[str, float]:
    """Seconds per phase of one Ready pod; phases a variant does not have are left out."""
    ids: dict[str, str] = {}
    status = pod.get("status", {})
    for entry in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        ids[entry["name"]] = (entry.get("containerID") or "").rpartition("://")[2]
    app, proxy, validation = ids.get("app", ""), ids.get("istio-proxy", ""), ids.get("istio-validation", "")
    if app not in tasks.start or app not in tasks.created:
        return {}
    out = {
        "app create+start": tasks.start[app] - tasks.created[app],
        "app -> Ready": ready - tasks.start[app],
    }
    if not all(validation in d for d in (tasks.created, tasks.start, tasks.exit)) or not (
        proxy in tasks.created and proxy in tasks.start
    ):
        out["to first container"] = tasks.created[app] - created
        return out
    out["to first container"] = tasks.created[validation] - created
    out["validation create+start"] = tasks.start[validation] - tasks.created[validation]
    out["istio-validation"] = tasks.exit[validation] - tasks.start[validation]
    out["validation -> proxy"] = tasks.created[proxy] - tasks.exit[validation]
    out["proxy create+start"] = tasks.start[proxy] - tasks.created[proxy]
    if ENVOY_STARTED in envoy and ENVOY_READY in envoy:
        out["proxy -> Envoy runs"] = envoy[ENVOY_STARTED] - tasks.start[proxy]
        out["Envoy init"] = envoy[ENVOY_READY] - envoy[ENVOY_STARTED]
        out["Envoy ready -> app"] = tasks.created[app] - envoy[ENVOY_READY]
        if proxy in tasks.hook_exit:
            out["  ready -> hook done"] = tasks.hook_exit[proxy] - envoy[ENVOY_READY]
    return out


def all_started(pod: dict[str, Any]) -> bool:
    """Every (regular) container running: what the pod-startup SLO measures (it excludes init
    containers and image pulls; readiness is not part of it)."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    containers = pod.get("spec", {}).get("containers") or []
    return len(statuses) == len(containers) > 0 and all("running" in (s.get("state") or {}) for s in statuses)


def post_pod(plane: ControlPlane, namespace: str, pod: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{plane.server}/api/v1/namespaces/{namespace}/pods",
        data=json.dumps(pod).encode(),
        headers={"Authorization": f"Bearer {plane.token}", "Content-Type": "application/json"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=str(plane.ca_file))
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        response.read()


@dataclass
class Variant:
    """One variant's samples: create -> all running, create -> Ready, and the phases per pod."""

    started: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    #: The machine's 1-minute load average before and after the variant ran.
    load: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Spec:
    """One variant: a label, the namespace its pods go to, their annotations (None: not meshed)."""

    label: str
    namespace: str
    annotations: dict[str, str] | None = None


def run_interleaved(
    plane: ControlPlane, node: Node, tasks: TaskEvents, specs: list[Spec], count: int
) -> dict[str, Variant]:
    """`count` pods per variant, the variants taking turns (A, B, C, A, B, C, ...) so that a
    change of the machine's load hits them alike; one pod at a time, each deleted (and torn
    down) before the next. The first round warms up (images in the page cache) and is dropped."""
    watches = {ns: ReadyWatch(plane, ns) for ns in dict.fromkeys(spec.namespace for spec in specs)}
    results = {spec.label: Variant() for spec in specs}
    loads: dict[str, list[float]] = {spec.label: [] for spec in specs}
    try:
        for i in range(count + 1):
            for spec in specs:
                loads[spec.label].append(os.getloadavg()[0])
                sample(plane, tasks, watches[spec.namespace], spec, i, results[spec.label] if i else None)
    finally:
        for watch in watches.values():
            watch.close()
        for ns in watches:
            drain(plane, node, ns)
    for label, variant in results.items():
        variant.load = (min(loads[label]), max(loads[label]))
    return results


def sample(
    plane: ControlPlane, tasks: TaskEvents, watch: ReadyWatch, spec: Spec, i: int, into: Variant | None
) -> None:
    """Create one pod, wait until it is Ready, delete it; its numbers go `into` (None: warm-up)."""
    name = f"{spec.label.replace('+', '-').lower()}-{i}"
    created_wall, created = time.time(), time.monotonic()
    pod = app_pod(name)
    pod["metadata"]["annotations"] = dict(spec.annotations or {})
    if spec.annotations is not None:  # meshed: Envoy's info log marks its start and readiness
        pod["metadata"]["annotations"][LOG_LEVEL] = "info"
    post_pod(plane, spec.namespace, pod)
    ready = watch.wait(name) - created
    started = watch.started_at[name] - created
    envoy = log_times(plane, spec.namespace, name, "istio-proxy") if spec.annotations is not None else {}
    remove(plane, spec.namespace, name)  # the task events of this pod are in by now
    split = phases(watch.pods[name], created_wall, watch.ready_wall[name], tasks, envoy)
    if into is not None:
        into.started.append(started)
        into.ready.append(ready)
        for phase, seconds in split.items():
            into.phases.setdefault(phase, []).append(seconds)
    parts = "  ".join(f"{k} {v:5.2f}" for k, v in split.items())
    print(
        f"  {name:22} started {started:6.2f} s  Ready {ready:6.2f} s  load {os.getloadavg()[0]:5.2f}"
        f"  | {parts}",
        file=sys.stderr,
    )


def remove(plane: ControlPlane, namespace: str, pod: str, timeout: float = 120.0) -> None:
    """Delete one pod and wait until the kubelet confirmed it gone (containers stopped, volumes
    and sandbox released: the API object goes only then), so the next pod does not share the
    node with teardown work nor with earlier pods (20 meshed pods at once would ask for all of
    the node's CPU, see the README)."""
    plane.kubectl("delete", "pod", pod, "-n", namespace, "--grace-period=1", "--wait=false")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = plane.kubectl(
            "get", "pod", pod, "-n", namespace, "--ignore-not-found", "-o", "name", check=False
        )
        if done.returncode == 0 and not done.stdout.strip():
            return
        time.sleep(0.2)
    print(f"warning: {namespace}/{pod} still there after {timeout:.0f}s", file=sys.stderr)


def drain(plane: ControlPlane, node: Node, namespace: str, timeout: float = 120.0) -> None:
    """Delete the namespace's pods and wait until the kubelet has torn their sandboxes down, so
    the next variant does not share the node with teardown work."""
    plane.kubectl("delete", "pods", "--all", "-n", namespace, "--grace-period=0", "--force", "--wait=false")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        selector = f'labels."io.kubernetes.pod.namespace"=={namespace}'
        if not node.ctr("containers", "ls", "-q", selector).stdout.split():
            return
        time.sleep(1)
    print(f"warning: {namespace}'s containers still present after {timeout:.0f}s", file=sys.stderr)


@contextmanager
def test_bed() -> Iterator[tuple[ControlPlane, Node]]:
    plane_dir, node_dir = os.environ.get("MESH_CONTROL_PLANE"), os.environ.get("MESH_NODE")
    if plane_dir and node_dir:
        plane = ControlPlane.attach(Path(plane_dir))
        yield plane, Node.attach(Path(node_dir), plane)
        return
    plane = ControlPlane.start()
    try:
        node = Node.start(plane)
        try:
            yield plane, node
        finally:
            node.stop()
    finally:
        plane.stop()


def percentile(times: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with 20 samples p99 is the slowest."""
    ordered = sorted(times)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def summary(times: list[float]) -> str:
    return (
        f"p50 {percentile(times, 50):5.2f} s  p99 {percentile(times, 99):5.2f} s  "
        f"min {min(times):5.2f} s  max {max(times):5.2f} s  (n={len(times)})"
    )


#: The kubelet feature gate of the extra rows: containerd's container-exit events make the
#: kubelet relist that pod at once (Kubernetes 1.37: a fast path beside the 1 s relist).
EVENTED_PLEG = {"EventedPLEG": True}
CLASSIC = {"sidecar.istio.io/nativeSidecar": "false"}
TEMPLATES = "inject.istio.io/templates"
#: The `envoy` template as it was before its proxy was held by postStart: a native proxy gated
#: by its startupProbe (as Istio's sidecar template does), for the row that shows the difference.
PROBE_GATED = "envoy-startup-probe"


def probe_gated_template() -> str:
    """The built-in `envoy` template without `nativeHold` and with its startupProbe always on."""
    text = (REPO / "injector" / "templates" / "envoy.yaml").read_text()
    dropped = ("nativeHold:", "$if: proxy.startupProbe")
    lines = [line for line in text.splitlines() if not line.strip().startswith(dropped)]
    if len(lines) != len(text.splitlines()) - len(dropped):
        raise RuntimeError("injector/templates/envoy.yaml changed: update probe_gated_template()")
    return "\n".join(lines) + "\n"


def run_all(plane: ControlPlane, node: Node, work: Path, pods: int, evented: bool) -> dict[str, Variant]:
    """Every variant in one run, on the same node (see the module docstring)."""
    results: dict[str, Variant] = {}
    import_mesh_images(node)
    tasks = TaskEvents(node)
    namespaces = []
    try:
        plain_ns = plane.create_namespace(prefix="bench-plain")
        namespaces.append(plain_ns)
        print("plain (no webhook, no plugin):", file=sys.stderr)
        results |= run_interleaved(plane, node, tasks, [Spec("plain", plain_ns)], pods)

        installer = Installer(node, work / "mesh-cni", extra_entry={"logLevel": "info"})
        webhook = Webhook.start(plane, work / "webhook", templates={PROBE_GATED: probe_gated_template()})
        installer.start()
        try:
            chained_ns = webhook.namespace(meshed=False, prefix="bench-chained")
            mesh_ns = webhook.namespace(meshed=True, prefix="bench-mesh")
            namespaces += [chained_ns, mesh_ns]
            print("chained, meshed-native, meshed-classic, native-startupProbe, in turns:", file=sys.stderr)
            specs = [
                Spec("chained", chained_ns),
                Spec("meshed-native", mesh_ns, {}),
                Spec("meshed-classic", mesh_ns, CLASSIC),
                Spec("native-startupProbe", mesh_ns, {TEMPLATES: PROBE_GATED}),
            ]
            results |= run_interleaved(plane, node, tasks, specs, pods)
            if evented:
                print("the kubelet restarted with EventedPLEG on:", file=sys.stderr)
                node.restart_kubelet(feature_gates=EVENTED_PLEG)
                try:
                    specs = [
                        Spec("native+EventedPLEG", mesh_ns, {}),
                        Spec("classic+EventedPLEG", mesh_ns, CLASSIC),
                    ]
                    results |= run_interleaved(plane, node, tasks, specs, pods)
                finally:
                    node.restart_kubelet()  # as it was: an attached test bed is left unchanged
        finally:
            installer.stop()
            webhook.stop()
    finally:
        tasks.close()
        for ns in namespaces:
            plane.delete_namespace(ns)
    return results


def report(results: dict[str, Variant], pods: int) -> None:
    """The latency table, the phase table and the target line per meshed variant."""
    print(f"pod start latency on the test node, one pod at a time, {pods} pods per variant")
    for what, pick in (
        ("create -> all containers running (the SLO's measure)", lambda v: v.started),
        ("create -> Ready", lambda v: v.ready),
    ):
        print(f"{what}:")
        for label, variant in results.items():
            print(f"  {label:20} {summary(pick(variant))}")
    print("load average (1 min) before / after each variant:")
    for label, variant in results.items():
        print(f"  {label:20} {variant.load[0]:5.2f} / {variant.load[1]:5.2f}")
    print("where the time goes, p50 / p99 seconds (containerd events; Envoy's own log lines):")
    width = max(len(label) for label in results) + 2
    print(f"  {'phase':24}" + "".join(f"{label:>{width}}" for label in results))
    for phase in PHASES:
        cells = [
            f"{percentile(t, 50):.2f} / {percentile(t, 99):.2f}" if (t := variant.phases.get(phase)) else "-"
            for variant in results.values()
        ]
        print(f"  {phase:24}" + "".join(f"{c:>{width}}" for c in cells))
    plain = results["plain"].ready
    for label, variant in results.items():
        if label == "plain":
            continue
        extra_p50 = percentile(variant.ready, 50) - percentile(plain, 50)
        extra_p99 = percentile(variant.ready, 99) - percentile(plain, 99)
        verdict = "meets" if extra_p99 <= TARGET_S else "MISSES"
        setting = " (kubelet setting, not the default)" if "EventedPLEG" in label else ""
        print(
            f"our part, {label}{setting}: {extra_p50 * 1000:+.0f} ms at p50, {extra_p99 * 1000:+.0f} ms "
            f"at p99 (create -> Ready vs plain): {verdict} the target of <= +{TARGET_S:.0f} s at p99"
        )
    if "native-startupProbe" in results:
        gated, held = results["native-startupProbe"].ready, results["meshed-native"].ready
        print(
            f"the postStart hold instead of the startupProbe (native, same run, in turns): "
            f"{(percentile(held, 50) - percentile(gated, 50)) * 1000:+.0f} ms at p50, "
            f"{(percentile(held, 99) - percentile(gated, 99)) * 1000:+.0f} ms at p99"
        )
    worst = percentile(results["meshed-native"].started, 99)
    print(
        f"anchor: Kubernetes pod-startup SLO p99 <= {SLO_P99_S:.0f} s (create -> containers running, "
        f"excluding init containers; we include ours): meshed-native p99 {worst:.2f} s "
        f"= {worst / SLO_P99_S:.0%} of it"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=20, help="measured pods per variant (default 20)")
    parser.add_argument(
        "--no-evented-pleg", action="store_true", help="skip the extra rows with the kubelet's EventedPLEG on"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (the node)", file=sys.stderr)
        return 2
    with test_bed() as (plane, node), tempfile.TemporaryDirectory(prefix="bench-pod-start-") as tmp:
        results = run_all(plane, node, Path(tmp), args.pods, not args.no_evented_pleg)
    report(results, args.pods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
