"""What other pods can do to the proxy: never reach Envoy's admin API, never loop it into itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxyagent.agent import MAX_STATUS_CONNECTIONS
from tests.cni.cnitest import UNPRIVILEGED_PYTHON, CniBed, Pod
from tests.envoy.meshbed import HERE, Meshed, _preexec, get, meshed_pod, requests, spawn, stop

ADMIN_REQUESTS = "http.admin.downstream_rq_total"

#: Request forms aimed at admin through an exposed port: dot segments, encodings, slashes, case,
#: queries, absolute form, other methods, admin paths themselves.
FORMS: list[tuple[str, str]] = [
    ("GET", "/config_dump"),
    ("POST", "/quitquitquit"),
    ("POST", "/healthcheck/fail"),
    ("POST", "/drain_listeners"),
    ("POST", "/logging?level=trace"),
    ("POST", "/runtime_modify?mesh.access_log=0"),
    ("POST", "/reset_counters"),
    ("GET", "/stats/prometheus/../../config_dump"),
    ("POST", "/healthz/ready/../../quitquitquit"),
    ("POST", "/healthz/ready/../../healthcheck/fail"),
    ("POST", "/stats/prometheus/%2e%2e/%2e%2e/healthcheck/fail"),
    ("POST", "/stats/prometheus/..%2f..%2fhealthcheck/fail"),
    ("POST", "/healthz/ready%2F..%2F..%2Fquitquitquit"),
    ("GET", "//config_dump"),
    ("GET", "/stats/prometheus//../config_dump"),
    ("GET", "/STATS/PROMETHEUS"),
    ("GET", "/Config_Dump"),
    ("GET", "/stats/prometheus?format=json&filter=.*"),
    ("GET", "/stats/prometheus?usedonly"),
    ("GET", "/healthz/ready?x=1"),
    ("GET", "/%63onfig_dump"),
    ("GET", "/stats/prometheus/..;/config_dump"),
    ("GET", "/stats/prometheus\\..\\config_dump"),
    ("GET", "http://127.0.0.1:15000/config_dump"),
    ("GET", "/stats/prometheus/"),
    ("GET", "/healthz/ready/"),
    ("POST", "/stats/prometheus"),
    ("PUT", "/healthz/ready"),
    ("GET", "/ready"),
    ("GET", "/stats"),
    ("GET", "/clusters"),
    ("GET", "/server_info"),
    ("POST", "/cpuprofiler?enable=y"),
    ("GET", "/./config_dump"),
    ("GET", "/%2fconfig_dump"),
    ("OPTIONS", "*"),
    ("CONNECT", "127.0.0.1:15000"),
]
#: Every port of the pod another pod can reach: status listeners, the agent, both capture
#: ports and an app port (which the redirect sends through the inbound listener).
PORTS = (15090, 15021, 15020, 15001, 15006, 8080)


@pytest.fixture(scope="module")
def mesh(bed: CniBed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshed]:
    with meshed_pod(bed, Path(tmp_path_factory.mktemp("hard"))) as mesh:
        yield mesh


def _admin_requests(mesh: Meshed) -> int:
    return mesh.stats()[ADMIN_REQUESTS]


def test_admin_is_unreachable_from_outside_in_any_path_form(mesh: Meshed, peer: Pod) -> None:
    assert len(FORMS) >= 20
    # The counter moves by a fixed step per read of it; a legitimate scrape moves it once more
    # (the positive control: reaching admin through an exposed port is visible).
    first = _admin_requests(mesh)
    step = _admin_requests(mesh) - first
    start = _admin_requests(mesh)
    assert get(peer, mesh.pod.ipv4, 15090, "/stats/prometheus")["status"] == 200
    assert _admin_requests(mesh) - start == step + 1
    start = _admin_requests(mesh)
    attacks = [
        {"http": [ip, port], "method": method, "target": target, "timeout": 3}
        for ip in (mesh.pod.ipv4, mesh.pod.ipv6)
        for port in PORTS
        for method, target in FORMS
    ]
    replies = requests(peer, attacks, timeout=300)
    assert _admin_requests(mesh) - start == step, "a request from another pod reached Envoy's admin API"
    for attack, reply in zip(attacks, replies, strict=True):
        port = attack["http"][1]
        if port in (15090, 15021, 15020):
            assert reply.get("status") in (400, 404, 405, 501) or "error" in reply, (attack, reply)
        assert "configs" not in reply.get("body", ""), (attack, reply)
    assert mesh.agent is not None and mesh.agent.poll() is None
    assert get(peer, mesh.pod.ipv4, 15021, "/healthz/ready")["status"] == 200
    assert get(peer, mesh.pod.ipv6, 15021, "/healthz/ready")["status"] == 200
    assert get(peer, mesh.pod.ipv4, 8080, "/ok")["status"] == 200


def test_connections_to_capture_ports_are_refused_not_looped(mesh: Meshed, peer: Pod) -> None:
    before = mesh.stats()
    outside = [
        {"http": [ip, port], "target": "/", "timeout": 3}
        for ip in (mesh.pod.ipv4, mesh.pod.ipv6)
        for port in (15001, 15006)
        for _ in range(10)
    ]
    inside = [
        {"http": [ip, port], "target": "/", "timeout": 3}
        for ip in (mesh.pod.ipv4, mesh.pod.ipv6, "127.0.0.1")
        for port in (15001, 15006)
        for _ in range(5)
    ]
    for reply in requests(peer, outside) + requests(mesh.pod, inside):
        assert reply.get("error") in ("closed", "reset", "refused"), reply
    after = mesh.stats()
    for cluster in ("PassthroughCluster", "InboundPassthroughCluster"):
        name = f"cluster.{cluster}.upstream_cx_total"
        assert after.get(name, 0) == before.get(name, 0), f"{name} moved: Envoy connected somewhere"
    blackholed = "cluster.BlackHoleCluster.upstream_cx_none_healthy"
    assert after[blackholed] - before.get(blackholed, 0) == len(outside) + len(inside)
    # The pod's other traffic is unaffected, both ways.
    assert get(peer, mesh.pod.ipv4, 8080, "/ok")["status"] == 200
    app = spawn(peer, [sys.executable, str(HERE / "app.py"), "8081"])
    try:
        assert app.stdout is not None and app.stdout.readline().strip() == "ready"
        assert get(mesh.pod, peer.ipv6, 8081, "/ok")["status"] == 200
    finally:
        stop(app)


HOLD = r"""
import json, socket, sys
host, limit = sys.argv[1], int(sys.argv[2])
def echo(s):
    try:
        s.sendall(b"ping")
        return s.recv(16) == b"ping"
    except OSError:
        return False
held = [socket.create_connection((host, 9000), timeout=3) for _ in range(limit)]
result = {"held": [echo(s) for s in held]}
extra = socket.create_connection((host, 9000), timeout=3)
result["over_limit"] = echo(extra)
held.pop().close()
import time; time.sleep(0.5)
again = socket.create_connection((host, 9000), timeout=3)
result["after_one_closed"] = echo(again)
print(json.dumps(result))
"""


def test_one_peer_cannot_hold_more_than_the_pods_connection_cap(
    bed: CniBed, peer: Pod, tmp_path: Path
) -> None:
    env = {"PROXY_CONFIG": '{"proxyMetadata": {"MESH_MAX_CONNECTIONS": "3"}}'}
    with meshed_pod(bed, tmp_path, env=env) as capped:
        done = subprocess.run(
            [UNPRIVILEGED_PYTHON, "-I", "-S", "-c", HOLD, capped.pod.ipv4, "3"],
            preexec_fn=_preexec(peer.netns, None),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"held": [True] * 3, "over_limit": False, "after_one_closed": True}
        assert any(k.endswith("downstream_cx_overflow") and v >= 1 for k, v in capped.stats().items())
        assert capped.agent is not None and capped.agent.poll() is None


FLOOD = r"""
import json, socket, sys
host = sys.argv[1]
idle = [socket.create_connection((host, 15020), timeout=3) for _ in range(100)]
print(len(idle), flush=True)
import time; time.sleep(6.5)
s = socket.create_connection((host, 15020), timeout=3)
s.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
print(s.recv(64).split(b"\r\n")[0].decode())
"""


def test_idle_connections_cannot_starve_the_status_port(mesh: Meshed, peer: Pod) -> None:
    """100 silent connections: the agent holds at most MAX_STATUS_CONNECTIONS of them (threads
    stay bounded), drops them after its idle timeout, and answers a probe afterwards."""
    flood = subprocess.Popen(
        [UNPRIVILEGED_PYTHON, "-I", "-S", "-c", FLOOD, mesh.pod.ipv4],
        preexec_fn=_preexec(peer.netns, None),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flood.stdout is not None and flood.stdout.readline().strip() == "100"
    time.sleep(0.5)
    assert mesh.agent is not None
    threads = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{mesh.agent.pid}/status").read_text().splitlines()
            if line.startswith("Threads:")
        )
    )
    assert threads <= MAX_STATUS_CONNECTIONS + 4
    assert flood.stdout.readline().strip() == "HTTP/1.1 200 OK"
    assert flood.wait(timeout=30) == 0
    assert mesh.agent.poll() is None
