"""Install, keep installed, uninstall: against temp dirs standing in for the host's CNI dirs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from cni.install.agent import Agent, AgentConfig
from cni.install.files import retry_busy
from tests.conftest import REPO
from tests.install.conftest import (
    BRIDGE_CONFLIST,
    SHAPES,
    atomic_replace,
    plugin_types,
    running_agent,
    snapshot,
    wait_for,
    write_shape,
)


def cli_flags(host: AgentConfig) -> list[str]:
    """`mesh-cni install` flags aiming it at the test host's directories, health port off."""
    return [
        "--cni-net-dir", str(host.cni_net_dir), "--cni-bin-dir", str(host.cni_bin_dir),
        "--runtime-dir", str(host.runtime_dir), "--state-dir", str(host.state_dir),
        "--kubeconfig", str(host.kubeconfig), "--health-port", "-1",
    ]  # fmt: skip


def _installed_path(config: AgentConfig, shape: str) -> Path:
    name = SHAPES[shape][0]
    return config.cni_net_dir / (name.rsplit(".", 1)[0] + ".conflist")


def _is_chained(path: Path) -> bool:
    body = json.loads(path.read_bytes())
    return (
        body["plugins"][-1]["type"] == "mesh-cni"
        and [p["type"] for p in body["plugins"]].count("mesh-cni") == 1
    )


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_install_chains_keeps_mode_and_uninstall_restores_every_byte(
    host_own_runtime: AgentConfig, shape: str
) -> None:
    host = host_own_runtime
    write_shape(host, shape)
    before = snapshot(host.cni_net_dir, host.cni_bin_dir)
    agent = Agent(host)
    valid, reason = agent.reconcile()
    assert valid, reason

    target = _installed_path(host, shape)
    assert plugin_types(target) == [*SHAPES[shape][2], "mesh-cni"]
    assert target.stat().st_mode & 0o777 == 0o640, "the chained file keeps the primary's mode"
    conf = json.loads(target.read_bytes())
    assert conf["cniVersion"] == json.loads(SHAPES[shape][1])["cniVersion"]
    launcher = host.cni_bin_dir / "mesh-cni"
    assert os.access(launcher, os.X_OK)
    for name in ("00-broken.conflist", "99-loopback.conf", "calico-kubeconfig", "README"):
        key = str(host.cni_net_dir / name)
        assert snapshot(host.cni_net_dir)[key] == before[key], f"{name} must not be touched"

    agent.uninstall()
    assert snapshot(host.cni_net_dir, host.cni_bin_dir) == before
    assert not host.runtime_dir.exists() and not host.state_dir.exists()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_install_twice_is_install_once(host: AgentConfig, shape: str) -> None:
    write_shape(host, shape)
    assert Agent(host).reconcile()[0]
    first = snapshot(host.cni_net_dir, host.cni_bin_dir)
    stats = {p: os.stat(p).st_ino for p in first}
    assert Agent(host).reconcile()[0]  # a second agent process, same host
    assert snapshot(host.cni_net_dir, host.cni_bin_dir) == first
    assert {p: os.stat(p).st_ino for p in first} == stats, "nothing rewritten the second time"


def test_restart_then_uninstall_still_restores_exact_bytes(host_own_runtime: AgentConfig) -> None:
    """The install state lives on the host: a new agent process restores what the old one changed."""
    host = host_own_runtime
    write_shape(host, "calico-conflist")
    before = snapshot(host.cni_net_dir, host.cni_bin_dir)
    Agent(host).reconcile()
    Agent(host).uninstall()
    assert snapshot(host.cni_net_dir, host.cni_bin_dir) == before


def test_earlier_primary_appearing_moves_us_and_restores_the_old_one(host: AgentConfig) -> None:
    write_shape(host, "bridge-conflist", bystanders=False)
    agent = Agent(host)
    assert agent.reconcile()[0]
    earlier = host.cni_net_dir / "05-calico.conflist"
    earlier.write_bytes(SHAPES["calico-conflist"][1])
    assert agent.reconcile()[0]
    assert plugin_types(earlier)[-1] == "mesh-cni"
    assert (host.cni_net_dir / "10-bridge.conflist").read_bytes() == BRIDGE_CONFLIST


def test_waits_for_a_config_watching_not_polling(host: AgentConfig) -> None:
    with running_agent(host) as agent:
        wait_for(lambda: "no valid CNI network config" in agent.status.reason)
        assert not agent.status.ready
        path = write_shape(host, "bridge-conflist", bystanders=False)
        # resync is 60 s in this fixture: only an inotify wake-up can make this fast.
        elapsed = wait_for(lambda: _is_chained(path), timeout=5)
        wait_for(lambda: agent.status.ready, timeout=5)
    print(f"chained {elapsed * 1000:.0f} ms after the config appeared")


def test_reinstalls_when_conflist_rewritten_or_binary_removed(host: AgentConfig) -> None:
    path = write_shape(host, "bridge-conflist")
    with running_agent(host) as agent:
        wait_for(lambda: agent.status.ready, timeout=10)
        atomic_replace(path, BRIDGE_CONFLIST)  # another agent rewrites "its" config
        rewrite = wait_for(lambda: _is_chained(path), timeout=5)
        (host.cni_bin_dir / "mesh-cni").unlink()
        rebinary = wait_for(lambda: os.access(host.cni_bin_dir / "mesh-cni", os.X_OK), timeout=5)
        path.write_bytes(BRIDGE_CONFLIST)  # in-place rewrite (truncate + write) too
        inplace = wait_for(lambda: _is_chained(path), timeout=5)
    print(
        f"re-chained {rewrite * 1000:.0f} ms, binary back {rebinary * 1000:.0f} ms, "
        f"in-place {inplace * 1000:.0f} ms"
    )


def test_torn_in_place_write_does_not_move_us_to_another_file(host: AgentConfig) -> None:
    """An agent that truncates then writes shows a torn file for a moment: we must wait, not
    chain (and convert) the next file in the dir."""
    path = write_shape(host, "bridge-conflist")  # with bystander 99-loopback.conf after it
    loopback = host.cni_net_dir / "99-loopback.conf"
    before = loopback.read_bytes()
    with running_agent(host, invalid_grace_s=2.0) as agent:
        wait_for(lambda: agent.status.ready, timeout=10)
        path.write_bytes(BRIDGE_CONFLIST[:40])  # torn: truncated mid-write
        wait_for(lambda: "being rewritten" in agent.status.reason, timeout=5)
        assert loopback.read_bytes() == before and not (host.cni_net_dir / "99-loopback.conflist").exists()
        path.write_bytes(BRIDGE_CONFLIST)  # the write completes
        wait_for(lambda: _is_chained(path), timeout=5)
        # A file that stays broken past the grace period is given up: the next valid one is used.
        path.write_bytes(b"{ broken for good")
        wait_for(lambda: _is_chained(host.cni_net_dir / "99-loopback.conflist"), timeout=10)
    assert path.read_bytes() == b"{ broken for good"


def test_competing_writer_never_corrupts_and_we_come_back(host: AgentConfig) -> None:
    """Another agent rewrites the conflist every 100 ms for 10 s (atomically, without us)."""
    path = write_shape(host, "bridge-conflist")
    with running_agent(host, health_port=0) as agent:
        wait_for(lambda: agent.status.ready, timeout=10)
        stop = threading.Event()
        problems: list[str] = []
        samples = 0
        contended_seen = threading.Event()

        def sample() -> None:
            nonlocal samples
            while not stop.is_set():
                try:
                    types = plugin_types(path)
                except FileNotFoundError:
                    problems.append("conflist missing")
                    continue
                except ValueError as err:
                    problems.append(f"corrupt: {err}")
                    continue
                samples += 1
                if types[:2] != ["bridge", "portmap"] or types.count("mesh-cni") > 1:
                    problems.append(f"bad chain {types}")
                if agent.status.contended:
                    contended_seen.set()
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        writes = 0
        end = time.monotonic() + 10
        while time.monotonic() < end:
            atomic_replace(path, BRIDGE_CONFLIST)
            writes += 1
            time.sleep(0.1)
        stopped = time.monotonic()
        back = wait_for(lambda: _is_chained(path), timeout=10) + (time.monotonic() - stopped) * 0
        stop.set()
        sampler.join()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{agent.health_port}/metrics").read().decode()
        ours = agent.status.counters["mesh_cni_install_writes_total"]
    assert not problems, problems[:5]
    assert samples > 500
    assert contended_seen.is_set(), "the fight must be reported (readiness/metric)"
    assert "mesh_cni_install_overwrites_total" in metrics
    assert ours < writes / 2, f"backed off: wrote {ours} times against {writes} competing writes"
    # The target is 1 s (bench/bench_install.py measures it); the test bounds it loosely.
    assert back < 3.0
    print(f"competitor wrote {writes}x, we wrote {ours}x, back {back * 1000:.0f} ms after it stopped")


def test_health_ready_only_while_install_valid(host: AgentConfig) -> None:
    with running_agent(host, health_port=0) as agent:
        url = f"http://127.0.0.1:{agent.health_port}"

        def code(path: str) -> int:
            try:
                return urllib.request.urlopen(url + path, timeout=2).status
            except urllib.error.HTTPError as err:
                return err.code

        wait_for(lambda: agent.status.reason != "starting")
        assert code("/healthz") == 200
        assert code("/readyz") == 503
        write_shape(host, "single-conf")
        wait_for(lambda: code("/readyz") == 200)
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        assert "mesh_cni_install_ready 1" in metrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent_env(config: AgentConfig, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "MESH_CNI_"))}
    env.update(
        CNI_NET_DIR=str(config.cni_net_dir),
        CNI_BIN_DIR=str(config.cni_bin_dir),
        MESH_CNI_RUNTIME_DIR=str(config.runtime_dir),
        MESH_CNI_STATE_DIR=str(config.state_dir),
        MESH_CNI_KUBECONFIG=str(config.kubeconfig),
        MESH_CNI_HEALTH_ADDRESS="127.0.0.1",
        MESH_CNI_HEALTH_PORT=str(port),
    )
    return env


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.parametrize("keep", [False, True], ids=["sigterm-uninstalls", "keep-on-exit"])
def test_sigterm_process_configured_by_env(host_own_runtime: AgentConfig, keep: bool) -> None:
    """The real DaemonSet shape: a process configured only through env, stopped with SIGTERM."""
    host = host_own_runtime
    write_shape(host, "calico-conflist")
    before = snapshot(host.cni_net_dir, host.cni_bin_dir)
    port = _free_port()
    env = _agent_env(host, port)
    if keep:
        env["MESH_CNI_KEEP_ON_EXIT"] = "true"
    proc = subprocess.Popen([sys.executable, "-m", "cni.install"], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _ready(port), timeout=30)
        installed = snapshot(host.cni_net_dir, host.cni_bin_dir)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if keep:
        assert snapshot(host.cni_net_dir, host.cni_bin_dir) == installed
        assert (host.runtime_dir / "current").exists()
    else:
        assert snapshot(host.cni_net_dir, host.cni_bin_dir) == before
        assert not host.runtime_dir.exists()


def test_uninstall_command_equals_sigterm(host_own_runtime: AgentConfig) -> None:
    host = host_own_runtime
    from cni.install import main, uninstall_main

    write_shape(host, "single-conf")
    before = snapshot(host.cni_net_dir, host.cni_bin_dir)
    flags = cli_flags(host)
    assert main(["--once", *flags]) == 0
    assert snapshot(host.cni_net_dir, host.cni_bin_dir) != before
    assert uninstall_main(flags) == 0
    assert snapshot(host.cni_net_dir, host.cni_bin_dir) == before
    assert uninstall_main(flags) == 0, "uninstall twice = once"
    assert snapshot(host.cni_net_dir, host.cni_bin_dir) == before


def test_once_fails_when_no_config_appears(host: AgentConfig) -> None:
    assert Agent(replace(host)).run(once=True, once_timeout_s=0.5) == 1


def test_busy_executable_is_retried_not_failed(tmp_path: Path) -> None:
    """Opening a running executable for writing gives ETXTBSY; the write waits until it is free."""
    exe = tmp_path / "busy"
    shutil.copy2("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "30"])
    try:
        time.sleep(0.2)
        with pytest.raises(OSError) as raised:
            open(exe, "wb")  # noqa: SIM115 - demonstrating the failure mode
        assert raised.value.errno == errno.ETXTBSY
        threading.Timer(0.3, proc.kill).start()

        def write() -> None:
            with open(exe, "wb") as handle:
                handle.write(b"#!/bin/true\n")

        retry_busy(write)
        assert exe.read_bytes() == b"#!/bin/true\n"
    finally:
        proc.kill()
        proc.wait()


def test_net_dir_that_appears_later_is_noticed_without_polling(host: AgentConfig, tmp_path: Path) -> None:
    late = tmp_path / "etc" / "cni" / "net.d"
    with running_agent(host, cni_net_dir=late) as agent:
        wait_for(lambda: "no valid CNI network config" in agent.status.reason)
        late.mkdir(parents=True)
        (late / "10-bridge.conflist").write_bytes(BRIDGE_CONFLIST)
        wait_for(lambda: _is_chained(late / "10-bridge.conflist"), timeout=5)  # resync is 60 s


def test_extra_entry_keys_from_env(host: AgentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from cni.install import main

    write_shape(host, "bridge-conflist", bystanders=False)
    monkeypatch.setenv("MESH_CNI_PLUGIN_EXTRA_JSON", '{"agentSocket": "/run/mesh-cni/agent.sock"}')
    monkeypatch.setenv("MESH_CNI_EXCLUDE_NAMESPACES", "kube-system, istio-system")
    flags = cli_flags(host)
    assert main(["--once", *flags]) == 0
    entry = json.loads((host.cni_net_dir / "10-bridge.conflist").read_bytes())["plugins"][-1]
    assert entry["agentSocket"] == "/run/mesh-cni/agent.sock"
    assert entry["excludeNamespaces"] == ["kube-system", "istio-system"]
    assert entry["kubeconfig"] == str(host.kubeconfig)
