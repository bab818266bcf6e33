"""Hostile input to the plugin binary: namespaces it must not program, huge batches, bad stdin."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from cni import spec
from tests.cni.cnitest import INJECTED, CniBed, Pod, exec_plugin, nft_ruleset, plugin_config

HOST_RULESET_MARK = "table inet mesh_cni"


def _host_pod(bed: CniBed, netns: str) -> Pod:
    return Pod(name="hostile", namespace="default", netns=netns, container_id="c0ffee", annotations=INJECTED)


@pytest.fixture()
def links(tmp_path: Path) -> dict[str, str]:
    """Paths that name the plugin's own / the host's netns, or are not a netns at all.

    The host's netns is the test runner's (the plugin runs as its child); a path through another
    pid and a symlink must be recognised by identity, not by name."""
    host = f"/proc/{os.getpid()}/ns/net"
    (tmp_path / "self-link").symlink_to("/proc/self/ns/net")
    (tmp_path / "host-link").symlink_to(host)
    (tmp_path / "empty").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo")
    return {"host": host, "self": "/proc/self/ns/net", "self-link": str(tmp_path / "self-link"),
            "host-link": str(tmp_path / "host-link"), "empty file": str(tmp_path / "empty"),
            "fifo": str(tmp_path / "fifo"), "mount ns": "/proc/self/ns/mnt", "directory": str(tmp_path)}


@pytest.mark.parametrize("case", ["host", "self", "self-link", "host-link", "empty file", "fifo", "mount ns",
                                  "directory"])
@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_netns_that_is_not_a_pods_is_refused_without_blocking(bed: CniBed, links: dict[str, str], case: str,
                                                             command: str) -> None:
    before = nft_ruleset()
    started = time.monotonic()
    code, out, _ = exec_plugin(bed, command, plugin_config(bed, annotations=INJECTED),
                               pod=_host_pod(bed, links[case]))
    assert time.monotonic() - started < 30  # exec_plugin's own 60 s timeout would raise on a hang
    assert code == 1 and out["code"] == spec.INVALID_ENVIRONMENT, out  # type: ignore[index]
    assert links[case] in out["msg"]  # type: ignore[index]
    assert nft_ruleset() == before


def test_del_leaves_a_host_netns_alone_and_succeeds(bed: CniBed, links: dict[str, str]) -> None:
    before = nft_ruleset()
    code, out, stderr = exec_plugin(bed, "DEL", plugin_config(bed, annotations=INJECTED),
                                    pod=_host_pod(bed, links["host-link"]))
    assert code == 0 and out is None
    assert "left alone" in stderr and nft_ruleset() == before


def _max_annotations(*, over: str | None = None) -> dict[str, str]:
    """Every list annotation at the injector's limit (one item over on ``over``)."""
    from cni import annotations as v

    cidrs, ports, interfaces = v.MAX_CIDRS, v.MAX_PORTS, v.MAX_INTERFACES

    def extra(key: str) -> int:
        return 1 if key == over else 0

    values = {
        v.INCLUDE_OUTBOUND_IP_RANGES: ",".join(f"10.{i // 256}.{i % 256}.0/24"
                                               for i in range(cidrs + extra(v.INCLUDE_OUTBOUND_IP_RANGES))),
        v.EXCLUDE_OUTBOUND_IP_RANGES: ",".join(f"fd00:{i:x}::/48"
                                               for i in range(cidrs + extra(v.EXCLUDE_OUTBOUND_IP_RANGES))),
        v.INCLUDE_INBOUND_PORTS: ",".join(str(20000 + i)
                                          for i in range(ports + extra(v.INCLUDE_INBOUND_PORTS))),
        v.EXCLUDE_INBOUND_PORTS: ",".join(str(30000 + i)
                                          for i in range(ports + extra(v.EXCLUDE_INBOUND_PORTS))),
        v.INCLUDE_OUTBOUND_PORTS: ",".join(str(40000 + i)
                                           for i in range(ports + extra(v.INCLUDE_OUTBOUND_PORTS))),
        v.EXCLUDE_OUTBOUND_PORTS: ",".join(str(1 + i)
                                           for i in range(ports + extra(v.EXCLUDE_OUTBOUND_PORTS))),
        v.EXCLUDE_INTERFACES: ",".join(f"x{i}" for i in range(interfaces + extra(v.EXCLUDE_INTERFACES))),
    }
    return {**INJECTED, **values}


def test_batch_at_every_limit_is_applied_whole(bed: CniBed) -> None:
    pod = bed.new_pod(_max_annotations())
    config = plugin_config(bed, annotations=pod.annotations)
    code, out, stderr = exec_plugin(bed, "ADD", config, pod=pod)
    assert code == 0, (out, stderr)
    code, out, stderr = exec_plugin(bed, "CHECK", config, pod=pod)  # the kernel holds every rule
    assert code == 0, (out, stderr)
    listing = nft_ruleset(pod.netns)
    assert listing.count("ip daddr 10.0.255.0/24 redirect") == 1 and listing.count('iifname "x63"') == 1


@pytest.mark.parametrize("key", [
    "traffic.sidecar.istio.io/includeOutboundIPRanges", "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "traffic.sidecar.istio.io/includeInboundPorts", "traffic.sidecar.istio.io/excludeOutboundPorts",
    "traffic.sidecar.istio.io/excludeInterfaces"])
def test_one_item_over_a_limit_is_refused_and_leaves_nothing(bed: CniBed, key: str) -> None:
    pod = bed.new_pod(_max_annotations(over=key))
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, annotations=pod.annotations), pod=pod)
    assert code == 1 and out["code"] == spec.INVALID_ANNOTATION  # type: ignore[index]
    assert key in out["msg"] and "exceed the limit of" in out["msg"]  # type: ignore[index]
    assert HOST_RULESET_MARK not in nft_ruleset(pod.netns)


def test_batch_whose_replies_are_lost_leaves_nothing(bed: CniBed) -> None:
    """The kernel drops ACKs that do not fit the receive buffer: the outcome is unknown, so the
    plugin must remove what may have been committed and say so."""
    pod = bed.new_pod(_max_annotations())
    code, out, _ = _run_with_default_buffers(bed, pod)
    assert code == 1 and out["code"] == spec.NETLINK_FAILED, out  # type: ignore[index]
    assert "nothing applied" in out["msg"]  # type: ignore[index]
    assert HOST_RULESET_MARK not in nft_ruleset(pod.netns)


def _run_with_default_buffers(bed: CniBed, pod: Pod) -> tuple[int, object, str]:
    """ADD in a child whose receive buffer keeps the kernel's default (ACKs overflow it); the send
    buffer is made big enough for the batch to reach the kernel whole."""
    import json
    import sys

    code = ("import json, sys\n"
            "from cni import nfnl, plugin\n"
            "nfnl.NftSocket.size_buffers = lambda self, send, replies: None\n"
            "orig = nfnl.NftSocket.__init__\n"
            "def init(self):\n"
            "    orig(self)\n"
            "    self.sock.setsockopt(1, 32, 4 << 20)\n"  # the batch itself goes out whole
            "nfnl.NftSocket.__init__ = init\n"
            "code, out = plugin.run(json.loads(sys.argv[1]), sys.stdin.buffer.read())\n"
            "print(out)\n"
            "sys.exit(code)\n")
    cni_env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": pod.container_id, "CNI_NETNS": pod.netns,
               "CNI_IFNAME": "eth0", "CNI_PATH": str(bed.bin_dir),
               "CNI_ARGS": f"K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name}"}
    stdin = json.dumps(plugin_config(bed, annotations=pod.annotations)).encode()
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cni_env)], input=stdin, capture_output=True,
                          timeout=60, cwd=str(Path(__file__).resolve().parents[2]))
    out = done.stdout.decode()
    return done.returncode, json.loads(out) if out.strip() else None, done.stderr.decode()


@pytest.mark.parametrize("stdin", [
    pytest.param(b"[" * 100_000, id="100k-deep-array"),
    pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="100k-deep-object"),
    pytest.param(b'{"cniVersion":"1.0.0","name":"n","pad":"' + b"x" * (spec.MAX_STDIN_BYTES + 1) + b'"}',
                 id="over-the-size-cap"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
])
def test_hostile_stdin_is_error_6_in_the_specs_format(bed: CniBed, stdin: bytes) -> None:
    pod = bed.new_pod(INJECTED)
    code, out, stderr = exec_plugin(bed, "ADD", stdin, pod=pod)
    assert code == 1 and out["code"] == spec.DECODING_FAILURE, (out, stderr)  # type: ignore[index]
    assert "Traceback" not in stderr
    if len(stdin) > spec.MAX_STDIN_BYTES:
        assert "MAX_STDIN_BYTES" in out["msg"]  # type: ignore[index]
