"""Several uvicorn workers behind one port: metrics, reloads, readiness and restarts hold across them."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from injector.commands.serve import cpu_limit
from tests.server.helpers import RunningServer, review, start_server, typical_pod
from tests.server.test_health_metrics import sample


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = Path(tmp_path_factory.mktemp("two-workers"))
    config_dir = workdir / "config"
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text("policy: enabled\n")  # an empty dir is refused
    server = start_server(workdir, config_dir=config_dir, workers=2)
    yield server
    server.stop()


def per_worker(
    server: RunningServer, ask: Callable[[httpx.Client], Any], attempts: int = 400
) -> dict[int, Any]:
    """``ask(client)`` on new connections until both workers (told apart by pid) have answered."""
    seen: dict[int, Any] = {}
    for _ in range(attempts):
        with server.client() as client:
            pid = client.get("/readyz").json()["worker"]["pid"]
            if pid not in seen:
                seen[pid] = ask(client)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered in {attempts} connections")


def inject_count(client: httpx.Client) -> float:
    return sample(client.get("/metrics").text, "mesh_injector_requests_total", 'endpoint="inject",code="200"')


def test_both_workers_serve_and_metrics_are_their_sum(two: RunningServer) -> None:
    before = per_worker(two, inject_count)
    assert len(set(before.values())) == 1
    answered_by: set[int] = set()
    for _ in range(60):
        with two.client() as client:
            answered_by.add(client.get("/readyz").json()["worker"]["pid"])
            assert client.post("/inject", json=review(typical_pod())).status_code == 200
    time.sleep(1.0)  # each worker hands its counts over every 0.5 s (METRICS_FLUSH_INTERVAL)
    after = per_worker(two, inject_count)
    assert set(after.values()) == {next(iter(before.values())) + 60}  # every worker shows the sum
    ready = per_worker(two, lambda c: c.get("/readyz").json())
    assert all(r["ready"] and r["worker"]["of"] == 2 for r in ready.values())
    assert {r["worker"]["index"] for r in ready.values()} == {0, 1}


def test_config_reload_reaches_every_worker(two: RunningServer) -> None:
    assert two.config_dir is not None
    first = per_worker(two, lambda c: c.get("/readyz").json()["config"]["hash"])
    assert len(set(first.values())) == 1
    (two.config_dir / "config.yaml").write_text("policy: disabled\n")
    deadline = time.monotonic() + 20
    while True:
        hashes = per_worker(two, lambda c: c.get("/readyz").json()["config"]["hash"])
        if len(set(hashes.values())) == 1 and set(hashes.values()) != set(first.values()):
            break
        assert time.monotonic() < deadline, hashes
        time.sleep(0.2)
    new_hash = next(iter(hashes.values()))
    answers = per_worker(two, lambda c: c.post("/inject", json=review(typical_pod())).json())
    assert all("patch" not in a["response"] for a in answers.values())  # policy disabled everywhere
    text = per_worker(two, lambda c: c.get("/metrics").text)
    for scrape in text.values():
        assert sample(scrape, "mesh_injector_config_info", f'config_hash="{new_hash}"') == 1
        assert sample(scrape, "mesh_injector_config_info", f'config_hash="{next(iter(first.values()))}"') == 0
    (two.config_dir / "config.yaml").write_text("policy: enabled\n")  # back to the start


def test_certificate_rotation_reaches_every_worker(two: RunningServer) -> None:
    new_pair = two.pki.serving()
    two.secret.write(new_pair)
    deadline = time.monotonic() + 20
    while True:
        served = per_worker(two, lambda c: c.get("/readyz").json()["certificate"]["notAfter"])
        expiry = {v for v in served.values()}
        if len(expiry) == 1:
            from cryptography import x509

            want = x509.load_pem_x509_certificate(new_pair.cert_pem).not_valid_after_utc.isoformat()
            if expiry == {want}:
                break
        assert time.monotonic() < deadline, served
        time.sleep(0.2)


def test_a_killed_worker_is_replaced_and_its_counts_stay(two: RunningServer) -> None:
    time.sleep(1.0)
    before = per_worker(two, inject_count)
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        pids = per_worker(two, lambda c: None, attempts=400)
        if victim not in pids:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    after = per_worker(two, inject_count)
    assert set(after.values()) == set(before.values())  # the dead worker's counts are still summed
    restarts = [e for e in two.logs() if e.get("msg") == "worker exited; starting a new one"]
    assert restarts and restarts[-1]["pid"] == victim


def cgroup(tmp_path: Path, files: dict[str, str], proc: str) -> int:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return cpu_limit(tmp_path, tmp_path / "proc-cgroup")


def test_default_worker_count_follows_the_cgroup_cpu_limit(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert cgroup(tmp_path / "v2", {"kubepods/pod1/cpu.max": "150000 100000\n"}, "0::/kubepods/pod1\n") == \
        min(cpus, 2)
    assert cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"}, "0::/\n") == cpus
    v1 = {"cpu,cpuacct/kubepods/p/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/kubepods/p/cpu.cfs_period_us":
          "100000\n"}
    assert cgroup(tmp_path / "v1", v1, "12:cpu,cpuacct:/kubepods/p\n11:memory:/kubepods/p\n") == 1
    unlimited = {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert cgroup(tmp_path / "v1none", unlimited, "12:cpu,cpuacct:/\n") == cpus
    assert json.dumps(cpu_limit())  # this machine: some positive number


def test_a_burst_of_keepalive_connections_ends_up_shared_by_both_workers(two: RunningServer) -> None:
    """The API server opens its connections in bursts; one idle worker would accept them all."""
    from concurrent.futures import ThreadPoolExecutor

    clients = [two.client() for _ in range(20)]
    try:
        def pid_of(client: httpx.Client) -> int:
            return int(client.get("/readyz").json()["worker"]["pid"])

        with ThreadPoolExecutor(20) as pool:
            for _ in range(30):  # each worker hands back at most one connection per 50 ms
                pids = list(pool.map(pid_of, clients))
                time.sleep(0.05)
        counts = sorted(pids.count(pid) for pid in set(pids))
        assert len(counts) == 2 and counts[0] >= 7, counts  # 10 each, give or take the slack of one
    finally:
        for client in clients:
            client.close()


def test_connections_arriving_while_a_worker_restarts_are_all_answered(two: RunningServer) -> None:
    """Each worker has a listening socket of its own (SO_REUSEPORT); connections the kernel
    deals to a dead worker's socket wait there for its replacement instead of being reset."""
    from concurrent.futures import ThreadPoolExecutor

    victim = int(next(iter(per_worker(two, lambda c: None))))
    os.kill(victim, signal.SIGKILL)

    def one(_: int) -> tuple[int, int]:
        with two.client(timeout=20.0) as client:
            answer = client.post("/inject", json=review(typical_pod()))
            return answer.status_code, int(client.get("/readyz").json()["worker"]["pid"])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(32)))
    assert [status for status, _ in answers] == [200] * 32
    assert victim not in {pid for _, pid in answers}
