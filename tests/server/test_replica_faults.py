"""Two webhook replicas behind the real kube-apiserver: one killed with SIGKILL, then a rolling
restart, while pods are being created.

What balances the two replicas: the test bed has no kube-proxy and no cluster DNS, so the API
server cannot reach a Service's endpoints the way it does in a cluster. A small TCP balancer
(``Balancer``) stands in for the Service: it deals new connections round-robin over the live
replicas and, when a connect is refused, tries the next one (as a Service does once the dead
pod's endpoint is gone; the kubelet removes it within seconds, we remove it at once). It does
not look inside TLS: the API server holds its TLS connections through it to one replica each.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from injector.manifests import webhook_configuration
from tests.server.helpers import RunningServer, free_port, make_pki, start_server
from tests.testbed.controlplane import ControlPlane
from tests.testbed.proc import pipe  # byte pump with half-close

pytestmark = pytest.mark.apiserver

SCOPE_LABEL = "mesh-injector.test/replica-faults"
UNSCHEDULABLE = {"mesh-injector.test/no-such-node": "true"}


class Balancer:
    """Round-robin TCP proxy on 127.0.0.1 over a changeable list of backend ports."""

    def __init__(self) -> None:
        self.backends: list[int] = []
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.turn = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        with self.lock:
            backends = list(self.backends)
            self.turn += 1
            start = self.turn
        for i in range(len(backends)):
            port = backends[(start + i) % len(backends)]
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue  # refused: that replica is gone, the next one takes the connection
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream = self._connect()
        if upstream is None:
            client.close()
            return
        upstream.settimeout(None)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)
        client.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()


def kill_replica(server: RunningServer) -> None:
    """SIGKILL the replica: its supervisor and every worker at once, as a node failure would."""
    pids = [server.process.pid]
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.process.wait(10)


def pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "faults"}},
            "spec": {"nodeSelector": UNSCHEDULABLE,
                     "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"]}]}}


class Load:
    """Creates pods one after another from ``threads`` threads until stopped; records failures."""

    def __init__(self, plane: ControlPlane, namespace: str, threads: int = 4) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(plane.api_client())
        self.namespace = namespace
        self.created = 0
        self.failures: list[str] = []
        self.injected = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                made = self.core.create_namespaced_pod(self.namespace, pod(f"p-{uuid.uuid4().hex[:10]}"))
                self.created += 1
                names = [c.name for c in (made.spec.init_containers or []) + made.spec.containers]
                self.injected += "istio-proxy" in names
            except Exception as exc:
                self.failures.append(str(getattr(exc, "body", exc))[:300])

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture()
def replicas(control_plane: ControlPlane, tmp_path: Path) -> Any:
    shared = make_pki(tmp_path)
    args = ["--kubeconfig", str(control_plane.kubeconfig), "--no-events", "--workers", "2"]
    servers = [start_server(tmp_path / f"r{i}", server_pki=shared, extra_args=args) for i in range(2)]
    balancer = Balancer()
    balancer.backends = [s.port for s in servers]
    scope = uuid.uuid4().hex[:10]
    config = webhook_configuration(name=f"mesh-injector-faults-{scope}",
                                   url=f"https://127.0.0.1:{balancer.port}/inject",
                                   ca_bundle=base64.b64encode(shared.ca.cert_pem).decode())
    for webhook in config["webhooks"]:
        webhook["namespaceSelector"].setdefault("matchLabels", {})[SCOPE_LABEL] = scope
        webhook["sideEffects"] = "None"
    control_plane.kubectl("create", "-f", "-", input=json.dumps(config))
    namespace = control_plane.create_namespace(labels={SCOPE_LABEL: scope, "istio-injection": "enabled"},
                                               prefix="faults")
    time.sleep(1.0)  # the API server's webhook informer sees the configuration
    state = {"servers": servers, "balancer": balancer, "namespace": namespace, "pki": shared,
             "args": args, "tmp": tmp_path}
    yield state
    control_plane.kubectl("delete", "mutatingwebhookconfiguration", config["metadata"]["name"],
                          "--ignore-not-found", check=False)
    control_plane.delete_namespace(namespace)
    for server in state["servers"]:
        server.stop()
    balancer.close()


def test_kill_9_of_one_replica_while_pods_are_created(control_plane: ControlPlane, replicas: Any) -> None:
    with Load(control_plane, replicas["namespace"]) as load:
        time.sleep(3)
        before = load.created
        kill_replica(replicas["servers"][0])
        killed_at = load.created
        time.sleep(4)
    assert before > 5 and load.created > killed_at + 5, (before, killed_at, load.created)
    assert load.injected == load.created  # every admitted pod went through a replica
    print(f"created {load.created}, failed {len(load.failures)} (killed at {killed_at}): {load.failures}")
    # Only requests in flight on the killed replica's connections can fail: at most one per
    # creating thread, each saying the webhook call broke (failurePolicy: Fail refuses the pod).
    assert len(load.failures) <= len(load.threads), load.failures
    assert all("mesh-injector" in f or "webhook" in f for f in load.failures), load.failures


def test_rolling_restart_under_load_fails_no_create(control_plane: ControlPlane, replicas: Any) -> None:
    servers: list[RunningServer] = replicas["servers"]
    balancer: Balancer = replicas["balancer"]
    with Load(control_plane, replicas["namespace"]) as load:
        time.sleep(2)
        for i in range(2):
            fresh = start_server(replicas["tmp"] / f"new{i}", server_pki=replicas["pki"],
                                 extra_args=replicas["args"])
            balancer.backends = [s.port for s in servers if s is not servers[i]] + [fresh.port]
            time.sleep(1.0)  # like a readiness gate: new connections go to the new replica first
            servers[i].stop()  # SIGTERM: in-flight requests finish, idle connections close
            servers[i] = fresh
            time.sleep(2)
    print(f"created {load.created}, failed {len(load.failures)}: {load.failures}")
    assert load.created > 10
    assert load.failures == []
    assert load.injected == load.created
