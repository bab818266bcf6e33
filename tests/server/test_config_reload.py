"""Reloading the configuration directory under a running server (a ConfigMap being updated)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server.helpers import RunningServer, review, start_server, typical_pod


def write_config(directory: Path, text: str) -> None:
    """Replace the visible config the way the kubelet updates a ConfigMap volume (atomic swap)."""
    stamp = f"..{time.monotonic_ns()}"
    (directory / stamp).mkdir()
    (directory / stamp / "config.yaml").write_text(text)
    (directory / "..data_tmp").symlink_to(stamp)
    os.replace(directory / "..data_tmp", directory / "..data")
    if not (directory / "config.yaml").is_symlink():
        (directory / "config.yaml").symlink_to("..data/config.yaml")


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def configured(tmp_path: Path) -> Iterator[RunningServer]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    write_config(config_dir, "policy: enabled\n")
    server = start_server(tmp_path / "srv", config_dir=config_dir)
    try:
        yield server
    finally:
        server.stop()


def decision_for(server: RunningServer, pod: dict) -> dict:
    with server.client() as client:
        response = client.post("/inject", json=review(pod))
    assert response.status_code == 200
    return response.json()["response"]


def readyz(server: RunningServer) -> dict:
    with server.client() as client:
        response = client.get("/readyz")
    assert response.status_code == 200  # the old config keeps serving: still ready
    return response.json()


def metric(server: RunningServer, line_prefix: str) -> float:
    with server.client() as client:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_new_config_is_picked_up_without_restart(configured: RunningServer) -> None:
    assert "patch" in decision_for(configured, typical_pod())
    first_hash = readyz(configured)["config"]["hash"]
    write_config(configured.config_dir, "policy: disabled\n")
    wait_for("the new config hash", lambda: readyz(configured)["config"]["hash"] != first_hash)
    answer = decision_for(configured, typical_pod())
    assert answer["allowed"] is True and "patch" not in answer  # policy disabled: skipped
    assert metric(configured, 'mesh_injector_config_reloads_total{result="success"}') >= 2


def test_invalid_config_keeps_the_old_one_and_is_reported(configured: RunningServer) -> None:
    good_hash = readyz(configured)["config"]["hash"]
    write_config(configured.config_dir, "policy: sometimes\nnotAField: 1\n")
    wait_for("the reload error", lambda: readyz(configured)["config"]["lastError"] is not None)
    detail = readyz(configured)
    assert detail["config"]["hash"] == good_hash
    assert "policy" in detail["config"]["lastError"]
    assert "patch" in decision_for(configured, typical_pod())  # still the old, injecting config
    assert metric(configured, 'mesh_injector_config_reloads_total{result="failure"}') == 1
    assert metric(configured, "mesh_injector_config_last_reload_success") == 0
    errors = [e for e in configured.logs()
              if e.get("logger") == "injector.config" and e.get("level") == "error"]
    assert errors and "policy" in errors[-1]["error"]
    # Fixing the file recovers.
    write_config(configured.config_dir, "policy: enabled\nsystemNamespaces: [extra-system]\n")
    wait_for("recovery", lambda: readyz(configured)["config"]["lastError"] is None)
    assert metric(configured, "mesh_injector_config_last_reload_success") == 1


def test_server_refuses_to_start_on_invalid_config(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text("policy: [not, a, policy]\n")
    with pytest.raises(RuntimeError, match="exited with 2"):
        start_server(tmp_path / "srv", config_dir=config_dir, timeout=15)
