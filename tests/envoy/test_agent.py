"""The proxy agent with a real Envoy: app probes from inside the pod, merged metrics, drain, hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cni.cnitest import UNPRIVILEGED_PYTHON, CniBed, Pod
from tests.envoy.meshbed import AGENT, HERE, PROXY_UID, _preexec, get, meshed_pod, spawn, stop

PROBERS = {
    "/app-health/app/readyz": {"httpGet": {"path": "/ok", "port": 8080}, "timeoutSeconds": 2},
    "/app-health/app/livez": {"tcpSocket": {"port": 9000}},
    "/app-health/app/startupz": {"grpc": {"port": 50051}},
    "/app-health/named/readyz": {"grpc": {"port": 50051, "service": "app.Serving"}},
    "/app-health/broken/readyz": {"grpc": {"port": 50051, "service": "app.Broken"}},
    "/app-health/broken/livez": {"httpGet": {"path": "/status/500", "port": 8080}},
}
UP = (
    "/app-health/app/readyz",
    "/app-health/app/livez",
    "/app-health/app/startupz",
    "/app-health/named/readyz",
)


def _probe(peer: Pod, ip: str, path: str) -> int:
    return get(peer, ip, 15020, path)["status"]


def test_probes_run_against_the_app_and_fail_when_it_is_down(bed: CniBed, peer: Pod, tmp_path: Path) -> None:
    env = {
        "ISTIO_KUBE_APP_PROBERS": json.dumps(PROBERS),
        "ISTIO_PROMETHEUS_ANNOTATIONS": json.dumps({"scrape": "true", "path": "/metrics", "port": "8080"}),
    }
    with meshed_pod(bed, tmp_path, env=env, grpc=True) as mesh:
        for path in UP:
            assert _probe(peer, mesh.pod.ipv4, path) == 200, path
        assert _probe(peer, mesh.pod.ipv6, "/app-health/app/livez") == 200
        assert _probe(peer, mesh.pod.ipv4, "/app-health/broken/readyz") == 503  # NOT_SERVING
        assert _probe(peer, mesh.pod.ipv4, "/app-health/broken/livez") == 503  # HTTP 500
        assert _probe(peer, mesh.pod.ipv4, "/app-health/nobody/readyz") == 404
        merged = get(peer, mesh.pod.ipv4, 15020, "/stats/prometheus")["body"]
        assert "app_marker_total 42" in merged and "envoy_server_live" in merged

        mesh.stop_app()
        for path in UP:
            assert _probe(peer, mesh.pod.ipv4, path) == 503, path
        mesh.start_app(grpc=True)
        for path in UP:
            assert _probe(peer, mesh.pod.ipv4, path) == 200, path


def test_sigterm_drains_in_flight_requests_then_refuses(bed: CniBed, peer: Pod, tmp_path: Path) -> None:
    env = {"PROXY_CONFIG": json.dumps({"terminationDrainDuration": "3s"})}
    with meshed_pod(bed, tmp_path, env=env) as mesh:
        request = [{"http": [mesh.pod.ipv4, 8080], "target": "/slow?ms=2000", "timeout": 10}]
        slow = subprocess.Popen(
            [UNPRIVILEGED_PYTHON, "-I", "-S", str(HERE / "client.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_preexec(peer.netns, None),
        )
        assert slow.stdin is not None
        slow.stdin.write(json.dumps(request))
        slow.stdin.close()
        time.sleep(0.5)
        assert mesh.agent is not None
        terminated = time.monotonic()
        os.kill(mesh.agent.pid, signal.SIGTERM)
        time.sleep(0.3)
        # Draining: not ready, new inbound connections refused, the in-flight request carries on.
        assert get(peer, mesh.pod.ipv4, 15021, "/healthz/ready")["status"] == 503
        assert get(peer, mesh.pod.ipv4, 8080, "/ok") == {"error": "refused"}
        assert slow.stdout is not None and slow.wait(timeout=15) == 0
        assert json.loads(slow.stdout.read()) == {"status": 200, "body": "slow done"}
        assert mesh.agent.wait(timeout=15) == 0
        assert time.monotonic() - terminated >= 3.0  # the whole drain window, as Istio does
        assert get(peer, mesh.pod.ipv4, 8080, "/ok") == {"error": "refused"}
        assert get(peer, mesh.pod.ipv4, 15021, "/healthz/ready") == {"error": "refused"}


def _wait_command(pod: Pod, timeout: float) -> subprocess.Popen[str]:
    return spawn(pod, [UNPRIVILEGED_PYTHON, *AGENT, "wait", "--timeout", str(timeout)], uid=PROXY_UID)


def test_hold_waits_for_http_200_not_a_tcp_connect(bed: CniBed, tmp_path: Path) -> None:
    with meshed_pod(bed, tmp_path, agent=False) as mesh:
        unready = spawn(mesh.pod, [sys.executable, str(HERE / "app.py"), "15021", "--no-echo"])
        try:
            assert unready.stdout is not None and unready.stdout.readline().strip() == "ready"
            assert get(mesh.pod, "127.0.0.1", 15021, "/healthz/ready")["status"] == 503
            waiter = _wait_command(mesh.pod, 2)
            assert waiter.wait(timeout=20) == 1
        finally:
            stop(unready)


def test_hold_releases_the_app_only_once_envoy_is_ready(bed: CniBed, tmp_path: Path) -> None:
    with meshed_pod(bed, tmp_path, agent=False) as mesh:
        waiter = _wait_command(mesh.pod, 60)
        time.sleep(1.5)
        assert waiter.poll() is None  # no proxy yet: the app's postStart hook keeps it held
        mesh.start_agent(wait=False)
        assert waiter.wait(timeout=60) == 0
        assert get(mesh.pod, "127.0.0.1", 15021, "/healthz/ready")["status"] == 200


@pytest.mark.parametrize("value, code", [("false", 0), ("true", 100)])
def test_access_log_switch_from_the_pods_proxy_config(
    bed: CniBed, peer: Pod, tmp_path: Path, value: str, code: int
) -> None:
    env = {"PROXY_CONFIG": json.dumps({"proxyMetadata": {"MESH_ACCESS_LOG": value}})}
    with meshed_pod(bed, tmp_path, env=env) as mesh:
        assert get(peer, mesh.pod.ipv4, 8080, "/status/202")["status"] == 202
        # Envoy flushes file access logs about once a second: wait for the line, or (off) for
        # well past the flush.
        deadline = time.monotonic() + (10 if code else 3)
        while time.monotonic() < deadline:
            logged = [x for x in mesh.access_log() if x.get("response_code") == 202]
            if logged:
                break
            time.sleep(0.2)
        assert len(logged) == (1 if code else 0)


def test_the_agent_exits_when_envoy_dies(bed: CniBed, tmp_path: Path) -> None:
    """No status port left answering for a proxy that is gone: the container restarts instead."""
    with meshed_pod(bed, tmp_path) as mesh:
        assert mesh.agent is not None
        agent = mesh.agent.pid
        (envoy,) = map(int, Path(f"/proc/{agent}/task/{agent}/children").read_text().split())
        os.kill(envoy, signal.SIGKILL)
        assert mesh.agent.wait(timeout=10) == 128 + signal.SIGKILL
        assert get(mesh.pod, "127.0.0.1", 15020, "/healthz/ready") == {"error": "refused"}


@pytest.mark.parametrize("workers", [None, 3])
def test_the_pods_concurrency_sets_envoys_worker_threads(
    bed: CniBed, tmp_path: Path, workers: int | None
) -> None:
    """The template starts one worker; ``concurrency`` in the pod's proxy config replaces it
    (Envoy refuses a second ``--concurrency`` flag, so appending one would stop the proxy)."""
    env = {"PROXY_CONFIG": json.dumps({"concurrency": workers})} if workers else {}
    with meshed_pod(bed, tmp_path, env=env) as mesh:  # started with --concurrency 1, as injected
        assert mesh.stats()["server.concurrency"] == (workers or 1)
