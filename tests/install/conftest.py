"""Shared plumbing for installer tests: primary-config shapes, temp host dirs, a running agent."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cni.install.agent import Agent, AgentConfig
from cni.install.conflist import EntryOptions
from cni.install.runtime import RuntimeSource, build
from tests.conftest import require

#: A plain bridge chain, as kubeadm guides and kind-like setups write it.
BRIDGE_CONFLIST = b"""{
  "cniVersion": "1.0.0",
  "name": "bridge-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "mesh-test0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"""

#: Calico's shape: its own plugin with nested policy/kubernetes blocks, then bandwidth + portmap.
CALICO_CONFLIST = b"""{
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [
        {
            "type": "calico",
            "log_level": "info",
            "datastore_type": "kubernetes",
            "nodename": "node-1",
            "mtu": 1440,
            "ipam": {"type": "calico-ipam"},
            "policy": {"type": "k8s"},
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
        },
        {"type": "bandwidth", "capabilities": {"bandwidth": true}},
        {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
    ]
}
"""

#: A single-plugin .conf, compact, as flannel-era and minimal installs write it.
SINGLE_CONF = (
    b'{"cniVersion":"0.4.0","name":"mynet","type":"bridge","bridge":"mesh-test1",'
    b'"isGateway":true,"ipam":{"type":"host-local","subnet":"10.98.0.0/24"}}\n'
)

SHAPES: dict[str, tuple[str, bytes, tuple[str, ...]]] = {
    # shape: (file name, bytes, plugin types the runtime must keep seeing)
    "bridge-conflist": ("10-bridge.conflist", BRIDGE_CONFLIST, ("bridge", "portmap")),
    "calico-conflist": ("10-calico.conflist", CALICO_CONFLIST, ("calico", "bandwidth", "portmap")),
    "single-conf": ("10-mynet.conf", SINGLE_CONF, ("bridge",)),
}

#: Files around the primary that must never be touched.
BYSTANDERS: dict[str, bytes] = {
    "00-broken.conflist": b"{ this is not json",  # sorts first, invalid: the runtime skips it
    "99-loopback.conf": b'{"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}\n',
    "calico-kubeconfig": b"apiVersion: v1\nkind: Config\n",
    "README": b"managed by someone else\n",
}


def snapshot(*dirs: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under ``dirs``: bytes and permission bits."""
    out: dict[str, tuple[bytes, int]] = {}
    for directory in dirs:
        if not directory.exists():
            continue
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return out


def plugin_types(path: Path) -> list[str]:
    body = json.loads(path.read_bytes())
    return [p["type"] for p in body["plugins"]]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; fails the test on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if predicate():
                return time.monotonic() - start
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s")


@pytest.fixture(scope="session")
def built_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled runtime, built once per session (~3 s) and shared by tests that keep it."""
    require(shutil.which("ldd") is not None, "needs ldd to find the interpreter's libraries")
    root = tmp_path_factory.mktemp("runtime") / "opt-mesh-cni"
    root.mkdir()
    build(RuntimeSource.current(), root)
    return root


def _host_config(tmp_path: Path, runtime: Path) -> AgentConfig:
    net, bin_dir = tmp_path / "etc-cni-net.d", tmp_path / "opt-cni-bin"
    net.mkdir()
    bin_dir.mkdir()
    (bin_dir / "bridge").write_bytes(b"\x7fELF pretend bridge plugin\n")
    (bin_dir / "bridge").chmod(0o755)
    state = tmp_path / "var-lib-mesh-cni"
    return AgentConfig(
        cni_bin_dir=bin_dir,
        cni_net_dir=net,
        runtime_dir=runtime,
        state_dir=state,
        kubeconfig=state / "kubeconfig",
        entry=EntryOptions(kubeconfig=str(state / "kubeconfig")),
        health_port=None,
        resync_s=60.0,  # long: proves re-installs are driven by inotify, not the safety resync
    )


@pytest.fixture
def host(tmp_path: Path, built_runtime: Path) -> AgentConfig:
    """Temp dirs standing in for the host's net dir, bin dir and /var/lib/mesh-cni; the runtime
    dir (/opt/mesh-cni) is the session's. Tests using it must not uninstall (that removes it)."""
    return _host_config(tmp_path, built_runtime)


@pytest.fixture
def host_own_runtime(tmp_path: Path) -> AgentConfig:
    """Like ``host`` with a runtime dir of its own (built on first install, ~3 s): for uninstalls."""
    return _host_config(tmp_path, tmp_path / "opt-mesh-cni")


def write_shape(config: AgentConfig, shape: str, *, bystanders: bool = True) -> Path:
    name, data, _ = SHAPES[shape]
    path = config.cni_net_dir / name
    path.write_bytes(data)
    path.chmod(0o640)
    if bystanders:
        for other, body in BYSTANDERS.items():
            (config.cni_net_dir / other).write_bytes(body)
    return path


def atomic_replace(path: Path, data: bytes) -> None:
    """How a well-behaved competing agent writes: temp file + rename."""
    tmp = path.with_name(f".competitor.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.rename(tmp, path)


@contextlib.contextmanager
def running_agent(config: AgentConfig, **changes: object) -> Iterator[Agent]:
    """The agent loop in a thread, stopped (not uninstalled) on exit."""
    agent = Agent(replace(config, **changes) if changes else config)
    agent.start_health()
    agent.start_kube_workers()  # no-op without an API server and node name
    thread = threading.Thread(target=agent.run, name="agent", daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(timeout=15)
        agent.close()
        assert not thread.is_alive(), "agent loop did not stop"
