"""Pod annotations from the API server when the runtime passes none; the resident node agent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.cni.cnitest import (
    INJECTED,
    CniBed,
    DriverError,
    Listeners,
    connect,
    exec_plugin,
    nft_ruleset,
    plugin_config,
)


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_api_fails_add_closed_with_try_again(bed: CniBed, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{closed_port()}")
    pod = bed.new_pod(INJECTED)
    config = plugin_config(bed, kubeconfig=str(kubeconfig), apiRetries=2, apiTimeoutSeconds=0.5)
    started = time.monotonic()
    code, out, _ = exec_plugin(bed, "ADD", config, pod=pod)
    assert code != 0 and out["code"] == 11  # type: ignore[index]
    assert "unreachable" in out["msg"] and pod.name in out["msg"]  # type: ignore[index]
    assert time.monotonic() - started < 5  # bounded retries
    assert "mesh_cni" not in nft_ruleset(pod.netns)
    # Excluded namespaces never need the API.
    system = bed.new_pod(INJECTED, namespace="kube-system")
    assert exec_plugin(bed, "ADD", config, pod=system)[0] == 0


def test_annotations_come_from_the_real_api_server(bed: CniBed, control_plane) -> None:  # type: ignore[no-untyped-def]
    namespace = f"cni-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    try:
        manifest = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "web", "namespace": namespace,
                                 "annotations": {**INJECTED,
                                                 "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}},
                    "spec": {"containers": [{"name": "app", "image": "busybox"}]}}
        control_plane.kubectl("create", "-f", "-", input=json.dumps(manifest))
        uid = json.loads(control_plane.kubectl("get", "pod", "web", "-n", namespace, "-o", "json").stdout
                         )["metadata"]["uid"]
        bed.conflist("apinet", plugin={"capabilities": {}, "kubeconfig": str(control_plane.kubeconfig)})
        pod = bed.new_pod(None, namespace=namespace, name="web")
        pod.uid = uid
        done = bed.driver("add", pod, "apinet")
        pod.result = json.loads(done.stdout)
        assert "dport 5432" in nft_ruleset(pod.netns)
        # A recreated pod (another uid) is not trusted: ADD asks the runtime to retry.
        stale = bed.new_pod(None, namespace=namespace, name="web")
        stale.uid = "00000000-0000-0000-0000-000000000000"
        with pytest.raises(DriverError, match="recreated"):
            bed.driver("add", stale, "apinet")
        missing = bed.new_pod(None, namespace=namespace, name="nope")
        with pytest.raises(DriverError, match="HTTP 404"):
            bed.driver("add", missing, "apinet")
        bed.driver("del", pod, "apinet")
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def start_agent(bed: CniBed, path: Path, wrapper: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([*wrapper, str(bed.bin_dir / "mesh-cni"), "agent", "--socket", str(path)],
                               stderr=subprocess.PIPE, env={"PATH": os.environ["PATH"]})
    deadline = time.monotonic() + 20
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), "agent did not start"
    return process


@pytest.fixture()
def agent(bed: CniBed, tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "agent.sock"
    process = start_agent(bed, path)
    yield process, path
    process.terminate()
    process.wait(10)


def log_lines_of(bed: CniBed, pid: int, text: str) -> list[str]:
    lines = bed.log_file.read_text().splitlines()
    return [line for line in lines if f"mesh-cni[{pid}]" in line and text in line]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_agent_serves_the_plugin_and_the_plugin_works_without_it(bed: CniBed, agent) -> None:  # type: ignore[no-untyped-def]
    process, path = agent
    assert (path.stat().st_mode & 0o777) == 0o600
    bed.conflist("agentnet", plugin={"agentSocket": str(path)})
    pod = bed.add_pod("agentnet", INJECTED)
    assert f"mesh-cni[{process.pid}]" in bed.log_file.read_text()  # the agent did the work
    with Listeners(pod, (15001,)) as local:
        assert connect(pod, "192.0.2.1", 80) == "connected"
        assert local.next() is not None
    check = plugin_config(bed, annotations=INJECTED, agentSocket=str(path))
    code, _, _ = exec_plugin(bed, "CHECK", check, pod=pod)
    assert code == 0
    bad = plugin_config(bed, annotations={**INJECTED, "traffic.sidecar.istio.io/excludeInboundPorts": "x"},
                        agentSocket=str(path))
    code, out, _ = exec_plugin(bed, "ADD", bad, pod=pod)
    assert code != 0 and out["code"] == 101  # type: ignore[index]
    process.terminate()
    process.wait(10)
    # The agent is gone (its socket file may linger): the plugin does the work itself.
    other = bed.add_pod("agentnet", INJECTED)
    assert "mesh_cni" in nft_ruleset(other.netns)
    bed.driver("del", other, "agentnet")
    bed.driver("del", pod, "agentnet")
    assert "mesh_cni" not in nft_ruleset(pod.netns)


def test_the_installers_kubeconfig_is_read_without_yaml(tmp_path: Path) -> None:
    """The installer renders a JSON kubeconfig with the CA and token embedded (cni.install.kubeconfig)."""
    from cni.install.kubeconfig import render_kubeconfig
    from cni.kube import KubeApi

    path = tmp_path / "kubeconfig"
    path.write_bytes(render_kubeconfig(server="https://10.96.0.1:443", token="s3cret\n", ca_pem=b"PEM"))
    config = KubeApi.from_kubeconfig(str(path))
    assert (config.server, config.token, config.ca_data, config.insecure) == (
        "https://10.96.0.1:443", "s3cret", b"PEM", False)


def test_agent_answers_del_with_the_table_gone_and_keeps_no_sockets(bed: CniBed, agent) -> None:  # type: ignore[no-untyped-def]
    """The agent replies at the kernel's ACK and closes the netlink socket after replying (the
    close waits out the kernel's reclamation of the deleted table). The reply must still mean
    'gone', and the deferred closes must not pile up in the agent."""
    process, path = agent
    bed.conflist("agentdel", plugin={"agentSocket": str(path)})
    warm = bed.add_pod("agentdel", INJECTED)
    bed.driver("del", warm, "agentdel")
    baseline = open_fds(process.pid)
    pods = [bed.add_pod("agentdel", INJECTED) for _ in range(8)]
    for pod in pods:
        bed.driver("del", pod, "agentdel")
        assert "mesh_cni" not in nft_ruleset(pod.netns)  # gone when DEL returned, not later
    assert len(log_lines_of(bed, process.pid, "table removed")) == 9  # the agent did every DEL
    deadline = time.monotonic() + 10
    while open_fds(process.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(process.pid) <= baseline, "the agent kept netlink sockets (and their netns) open"


def test_agent_that_cannot_see_the_netns_leaves_the_pod_to_the_plugin(bed: CniBed, tmp_path: Path) -> None:
    """A DaemonSet without the runtime's netns mount must not break pods: the agent declines a
    netns path it cannot open and the plugin, on the host, programs the pod itself."""
    path = tmp_path / "blind.sock"
    netns_dir = Path(bed.new_pod(None).netns).parent
    blind = start_agent(bed, path, ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                                    f'mount -t tmpfs none {netns_dir} && exec "$0" "$@"'))
    try:
        bed.conflist("blindnet", plugin={"agentSocket": str(path)})
        pod = bed.add_pod("blindnet", INJECTED)
        assert "redirect to :15001" in nft_ruleset(pod.netns)
        assert not log_lines_of(bed, blind.pid, "redirect programmed")
        assert any(pod.netns in line for line in bed.log_file.read_text().splitlines()
                   if "redirect programmed" in line)
        bed.driver("del", pod, "blindnet")
        assert "mesh_cni" not in nft_ruleset(pod.netns)
    finally:
        blind.terminate()
        blind.wait(10)
