"""Audit at scale: 100, 1,000, 5,000 and 20,000 pods in the real kube-apiserver.

For each size: wall time and peak RSS of ``mesh-injector audit`` (table to /dev/null) and of the
``mesh-injector serve`` process answering ``GET /audit`` (all namespaces, JSON), then the per-pod
slope between the sizes. Targets (issue 17): peak memory flat (within 20% from 1,000 to 20,000
pods) and <= 0.3 ms per pod.

The cluster: Pending pods (no node selected), created concurrently through the API, in
namespaces of up to 1,000 pods labelled ``istio-injection=enabled``; half the pods injected
(default revision), 60% owned by ReplicaSets of 30 pods (resolved by name from ownerReferences
while auditing), the rest bare. The ReplicaSets' own pod creates are refused by a
ValidatingAdmissionPolicy (their template carries a label ours do not), so the controller
adopts our pods instead of racing us; the bench waits until every ReplicaSet counts its pods.

    .venv/bin/python bench/scale_audit.py [--sizes 100,1000,5000,20000] [--page-size 500]
        [--variants fixed,dynamic]

Both variants run in the same cluster at every size, alternating which goes first, each with
its own ``serve`` process kept across the sizes: ``fixed`` is this tree, ``dynamic`` the same
code with glibc's dynamic mmap threshold left on (``MESH_AUDIT_MMAP_THRESHOLD=dynamic``, a
switch for this comparison); the ratios fixed / dynamic are printed per size. Only the
server fixes the threshold (the CLI keeps glibc's rule in both), so the CLI columns of the two
variants measure the same code twice: their difference is the run's noise.

Attaches to a running control plane with MESH_CONTROL_PLANE=DIR, else starts one (tests/testbed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from injector.audit import HEAP_SWITCH  # noqa: E402
from tests.audit.helpers import Api, injected, pending_pod  # noqa: E402
from tests.server.helpers import serve_command, start_server  # noqa: E402
from tests.testbed.controlplane import ControlPlane  # noqa: E402
from tests.testbed.proc import wait_for  # noqa: E402

SIZES = (100, 1_000, 5_000, 20_000)
PODS_PER_NAMESPACE = 1_000
RS_PODS = 30
BENCH_LABEL = "mesh-injector.bench/scale-audit"
TEMPLATE_ONLY = "mesh-injector.bench/from-template"


def refuse_controller_pods(api: Api, run: str) -> None:
    """Pods carrying the template-only label (the ReplicaSet controller's) are refused."""
    name = f"scale-audit-{run}"
    selector = {"matchLabels": {BENCH_LABEL: run}}
    api.request("POST", "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"namespaceSelector": selector, "resourceRules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]},
            "validations": [{"expression": f"!has(object.metadata.labels) || "
                                           f"!('{TEMPLATE_ONLY}' in object.metadata.labels)",
                             "message": "the bench creates these pods itself"}],
        },
    })
    api.request("POST", "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": selector}},
    })
    time.sleep(2)  # policies take effect asynchronously


def replica_set(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": RS_PODS, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": {**labels, TEMPLATE_ONLY: "true"}},
                                  "spec": pending_pod(name)["spec"]}}}


class Cluster:
    """Grows the bench's pods namespace by namespace, in blocks of 100 pods: two ReplicaSets of
    ``RS_PODS`` pods and 40 bare pods, every other pod injected; remembers what to delete."""

    def __init__(self, api: Api, run: str) -> None:
        self.api = api
        self.run = run
        self.namespaces: list[str] = []
        self.pods = 0
        self._meshed = injected(pending_pod("template-x"))  # injected once, renamed per pod

    def _namespace(self) -> str:
        name = f"scale-audit-{self.run}-{len(self.namespaces)}"
        self.api.request("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {BENCH_LABEL: self.run, "istio-injection": "enabled"}}})
        self.namespaces.append(name)

        def has_default_account() -> bool:  # pods are refused until the controller made it
            try:
                return bool(self.api.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default"))
            except RuntimeError:
                return False

        wait_for(f"namespace {name}'s default service account", has_default_account, timeout=60)
        return name

    def _pod(self, name: str, meshed: bool, app: str, owner: dict[str, Any] | None) -> dict[str, Any]:
        if meshed:
            pod = copy.deepcopy(self._meshed)
            pod["metadata"]["name"] = name
            pod["metadata"]["labels"] = {"app": app}
        else:
            pod = pending_pod(name, labels={"app": app})
        if owner:
            pod["metadata"]["ownerReferences"] = [owner]
        return pod

    def _block(self, ns: str, block: int) -> list[dict[str, Any]]:
        owners = []
        for part in range(2):
            rs = f"rs-{block}-{part}"
            uid = self.api.request("POST", f"/apis/apps/v1/namespaces/{ns}/replicasets",
                                   replica_set(rs))["metadata"]["uid"]
            owners.append({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": uid,
                           "controller": True, "blockOwnerDeletion": True})
        pods = []
        for j in range(100):
            i = block * 100 + j
            owner = owners[j // RS_PODS] if j < 2 * RS_PODS else None
            app = owner["name"] if owner else f"bare-{i}"
            pods.append(self._pod(f"pod-{i:06d}", meshed=i % 2 == 0, app=app, owner=owner))
        return pods

    def grow_to(self, total: int) -> None:
        if total % 100:
            raise ValueError(f"size {total} is not a multiple of 100 (the bench's block)")
        while self.pods < total:
            ns = self._namespace() if self.pods % PODS_PER_NAMESPACE == 0 else self.namespaces[-1]
            blocks = min(total - self.pods, PODS_PER_NAMESPACE - self.pods % PODS_PER_NAMESPACE) // 100
            pods = [p for b in range(blocks) for p in self._block(ns, self.pods // 100 + b)]
            self.api.create_pods(ns, pods)
            self.pods += len(pods)

    def settle(self) -> None:
        """Wait until each ReplicaSet counts the pods it owns (the controller then stays quiet)."""
        def settled() -> bool:
            for ns in self.namespaces:
                for rs in self.api.request("GET", f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"]:
                    if (rs.get("status") or {}).get("replicas") != RS_PODS:
                        return False
            return True

        wait_for("the ReplicaSets to count their pods", settled, timeout=600, interval=2)

    def cleanup(self) -> None:
        paths = [f"/api/v1/namespaces/{ns}" for ns in self.namespaces]
        paths += [f"/apis/admissionregistration.k8s.io/v1/{kind}/scale-audit-{self.run}"
                  for kind in ("validatingadmissionpolicybindings", "validatingadmissionpolicies")]
        for path in paths:
            with contextlib.suppress(RuntimeError):
                self.api.request("DELETE", path)


def cli_run(plane: ControlPlane, page_size: int, env: dict[str, str] | None = None
            ) -> tuple[float, int, str, float]:
    """(seconds, peak RSS KiB, last line, CPU seconds) of `mesh-injector audit` over all namespaces."""
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), **(env or {})}
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([*serve_command(), "audit", "--page-size", str(page_size)], stdout=out,
                                stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"audit failed: {proc.stderr.read().decode() if proc.stderr else ''}")
        out.seek(0)
        last = out.read().rstrip().splitlines()[-1]
    return elapsed, usage.ru_maxrss, last, usage.ru_utime + usage.ru_stime


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: ``serve`` forks its uvicorn workers, which answer /audit."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            todo += [int(child) for child in task.read_text().split()]
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process and its descendants (threads included)."""
    total = 0
    for member in process_tree(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def server_run(server: Any, token: str, page_size: int) -> tuple[float, int, int, float]:
    """(seconds, peak RSS KiB during the request, pods, server CPU seconds) of GET /audit."""
    import json

    pid = server.process.pid
    for member in process_tree(pid):
        Path(f"/proc/{member}/clear_refs").write_text("5")  # reset VmHWM: the peak of this request only
    size = 0
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    with server.client() as client, client.stream(
            "GET", "/audit", params={"pageSize": str(page_size), "format": "jsonl"},
            headers={"authorization": f"Bearer {token}"}, timeout=600.0) as response:
        if response.status_code != 200:
            raise RuntimeError(f"/audit answered {response.status_code}: {response.read()[:300]!r}")
        last = b""
        for chunk in response.iter_bytes():
            size += len(chunk)
            last = (last + chunk)[-4096:]
    elapsed = time.perf_counter() - start
    summary = json.loads(last.rstrip().rsplit(b"\n", 1)[-1])["summary"]
    peak = max(rss_kib(member, "VmHWM") for member in process_tree(pid))  # the worker that answered
    return elapsed, peak, int(summary["pods"]), cpu_seconds(pid) - cpu_before


def slope_ms(points: list[tuple[int, float]]) -> float:
    (n0, t0), (n1, t1) = points[0], points[-1]
    return (t1 - t0) / (n1 - n0) * 1000 if n1 > n0 else float("nan")


#: The variants measured side by side: this tree, and the same code with glibc's dynamic mmap
#: threshold left on (the switch exists for this comparison only; see audit.keep_pages_off_heap).
VARIANTS = {"fixed": {}, "dynamic": {HEAP_SWITCH: "dynamic"}}
Row = tuple[int, float, int, float, int, float, float]  # pods, CLI s, KiB, server s, KiB, CLI CPU, server CPU


def run(sizes: tuple[int, ...] = SIZES, page_size: int = 500, variants: tuple[str, ...] = tuple(VARIANTS)
        ) -> None:
    attach = os.environ.get("MESH_CONTROL_PLANE")
    plane = ControlPlane.attach(Path(attach)) if attach else ControlPlane.start()
    api = Api(plane.server, plane.token, str(plane.ca_file), workers=16)
    run_id = uuid.uuid4().hex[:6]
    cluster = Cluster(api, run_id)
    workdir = Path(tempfile.mkdtemp(prefix="scale-audit-"))
    servers: dict[str, Any] = {}
    rows: dict[str, list[Row]] = {v: [] for v in variants}
    try:
        for variant in variants:  # one server per variant, kept for every size (as a deployment is)
            servers[variant] = start_server(workdir / variant, env=VARIANTS[variant],
                                            extra_args=["--kubeconfig", str(plane.kubeconfig)])
        refuse_controller_pods(api, run_id)
        for index, size in enumerate(sizes):
            start = time.perf_counter()
            cluster.grow_to(size)
            created = time.perf_counter() - start
            cluster.settle()
            order = variants if index % 2 == 0 else variants[::-1]  # alternate who goes first
            for variant in order:
                cli_s, cli_kib, last, cli_cpu = cli_run(plane, page_size, VARIANTS[variant])
                srv_s, srv_kib, pods, srv_cpu = server_run(servers[variant], plane.token, page_size)
                rows[variant].append((pods, cli_s, cli_kib, srv_s, srv_kib, cli_cpu, srv_cpu))
            print(f"# {size} bench pods ({pods} in the cluster) created in {created:.1f} s; CLI: {last}",
                  flush=True)
    finally:
        for server in servers.values():
            server.stop()
        cluster.cleanup()
        api.close()
        if not attach:
            plane.stop()
    for variant in variants:
        print_curve(variant, rows[variant], page_size)
    if len(variants) == 2 and all(len(rows[v]) for v in variants):
        new, old = (rows[v] for v in variants)
        print(f"\npeak RSS, {variants[0]} / {variants[1]} at each size (same run):")
        for a, b in zip(new, old, strict=True):
            print(f"  {a[0]:>7} pods: CLI {a[2] / 1024:.1f} / {b[2] / 1024:.1f} MiB = {a[2] / b[2]:.2f}, "
                  f"server {a[4] / 1024:.1f} / {b[4] / 1024:.1f} MiB = {a[4] / b[4]:.2f}")
    print(f"load average now: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


def print_curve(variant: str, rows: list[Row], page_size: int) -> None:
    print(f"\naudit [{variant}], page size {page_size} (all namespaces; wall time and peak RSS)")
    print(f"{'pods':>7} | {'CLI s':>7} | {'CLI CPU s':>9} | {'CLI MiB':>8} | {'server s':>8} | "
          f"{'server CPU s':>12} | {'server MiB':>10}")
    for pods, cli_s, cli_kib, srv_s, srv_kib, cli_cpu, srv_cpu in rows:
        print(f"{pods:>7} | {cli_s:>7.2f} | {cli_cpu:>9.2f} | {cli_kib / 1024:>8.1f} | {srv_s:>8.2f} | "
              f"{srv_cpu:>12.2f} | {srv_kib / 1024:>10.1f}")
    above = [r for r in rows if r[0] >= 1000]
    if len(above) >= 2:
        first, last_row = above[0], above[-1]
        cli_slope = slope_ms([(first[0], first[1]), (last_row[0], last_row[1])])
        server_slope = slope_ms([(first[0], first[3]), (last_row[0], last_row[3])])
        cli_cpu_slope = slope_ms([(first[0], first[5]), (last_row[0], last_row[5])])
        server_cpu_slope = slope_ms([(first[0], first[6]), (last_row[0], last_row[6])])
        print(f"slope {first[0]}->{last_row[0]} pods, wall: CLI {cli_slope:.3f} ms/pod (ratio to the target "
              f"{cli_slope / 0.3:.2f}), server {server_slope:.3f} ms/pod (ratio {server_slope / 0.3:.2f}); "
              f"target <= 0.3")
        print(f"  CPU of our process alone: CLI {cli_cpu_slope:.3f} ms/pod, server "
              f"{server_cpu_slope:.3f} ms/pod (the rest of the wall time is the API server's and "
              "etcd's, on the same cores)")
        print(f"peak RSS {first[0]}->{last_row[0]} pods: CLI x{last_row[2] / first[2]:.2f}, "
              f"server x{last_row[4] / first[4]:.2f} (target <= x1.20)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, of: %(default)s (fixed: this tree; dynamic: glibc's "
                             "dynamic mmap threshold left on)")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    run(tuple(int(s) for s in args.sizes.split(",")), args.page_size, variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
