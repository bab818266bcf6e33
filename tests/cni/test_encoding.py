"""Pure parts: the struct encoder against pyroute2's bytes, the ruleset shape, the lean hot path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import annotations, fastjson, nfnl, nft_pyroute2, nftables, plugin
from cni.annotations import TrafficDefaults, plan_from_annotations
from tests.cni.cnitest import REPO, CniBed

PLANS = [
    {},
    {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8,fd00::/8,192.168.1.1/32",
     "traffic.sidecar.istio.io/excludeInterfaces": "eth9,net1"},
    {"traffic.sidecar.istio.io/includeOutboundIPRanges": "172.16.0.0/12,2001:db8::/32",
     "traffic.sidecar.istio.io/includeOutboundPorts": "8443", "traffic.mesh-injector.io/captureDNS": "true"},
    {"traffic.sidecar.istio.io/includeInboundPorts": "", "traffic.mesh-injector.io/proxyUID": "1500",
     "traffic.mesh-injector.io/proxyGID": "1600", "status.sidecar.istio.io/port": "15999"},
]


@pytest.mark.parametrize("pod_annotations", PLANS)
def test_struct_encoder_matches_pyroute2_byte_for_byte(monkeypatch, pod_annotations) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nfnl, "NESTED_FLAG", 0)  # pyroute2 does not set NLA_F_NESTED
    ops = nftables.add_ops(nftables.build_ruleset(plan_from_annotations(pod_annotations)))
    for seq, op in enumerate(ops, 1):
        reference = nft_pyroute2.build_message(op, seq)
        reference.encode()
        flags = op[1] | nfnl.NLM_F_REQUEST | nfnl.NLM_F_ACK
        ours = nfnl.message((nfnl.NFNL_SUBSYS_NFTABLES << 8) | op[0], flags, nfnl.NFPROTO_INET, op[2], seq)
        assert ours == bytes(reference.data), op[3]


def test_decoder_round_trips_our_expressions() -> None:
    _, rules = nftables.build_ruleset(plan_from_annotations(PLANS[2]))
    for chain, exprs in rules:
        payload = nfnl.rule_payload(nftables.TABLE, chain, exprs)
        attrs = dict(nfnl.iter_attrs(payload))
        assert nfnl.decode_exprs(attrs[nfnl.NFTA_RULE_EXPRESSIONS]) == nfnl.canonical_exprs(exprs)


def rule_texts(pod_annotations: dict[str, str], **defaults: object) -> list[str]:
    plan = plan_from_annotations(pod_annotations, TrafficDefaults(**defaults))  # type: ignore[arg-type]
    return [f"{chain} {exprs}" for chain, exprs in nftables.build_ruleset(plan)[1]]


def test_included_loopback_keeps_app_loopback_traffic_captured() -> None:
    with_loopback = rule_texts({"traffic.sidecar.istio.io/includeOutboundIPRanges": "127.0.0.0/8"})
    without = rule_texts({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8"})
    assert len(without) - len(with_loopback) == 2  # the uid and gid "lo, not the proxy -> return" rules


def test_no_inbound_capture_without_inbound_ports() -> None:
    texts = rule_texts({"traffic.sidecar.istio.io/includeInboundPorts": ""})
    assert not [t for t in texts if t.startswith(("prerouting", "inbound"))]


def test_status_annotation_shortcut_matches_the_shared_vocabulary() -> None:
    assert plugin.STATUS_ANNOTATION == annotations.STATUS
    codes = annotations.ReasonCode
    assert (plugin.NOT_POD, plugin.EXCLUDED_NAMESPACE, plugin.OWN_POD, plugin.NOT_INJECTED) == (
        codes.NOT_POD, codes.EXCLUDED_NAMESPACE, codes.OWN_POD, codes.NOT_INJECTED)


def test_hot_path_imports_stay_lean(bed: CniBed) -> None:
    """An uninjected pod's ADD imports neither pyroute2 nor the annotation module nor json."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": bed.new_pod().netns,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/x", "CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"}
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n",
                        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {}}})
    watched = ("pyroute2", "json", "cni", "re", "ctypes")
    code = "\n".join([
        f"import sys; sys.path.insert(0, {str(REPO)!r})",
        "from cni import plugin",
        f"code, out = plugin.run({env!r}, {stdin.encode()!r})",
        "assert code == 0, out",
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {watched!r}))",
    ])
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                          check=True)
    loaded = eval(done.stdout)  # a printed list of module names
    assert "cni.annotations" not in loaded and "json" not in loaded and "re" not in loaded
    assert not [m for m in loaded if m.startswith(("pyroute2", "ctypes"))]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=20)


@settings(max_examples=80, deadline=None)
@given(json_values)
def test_fastjson_agrees_with_json(value: object) -> None:
    assert fastjson.loads(json.dumps(value)) == value
    assert json.loads(fastjson.dumps(value)) == value


ports = st.lists(st.integers(1, 65535), max_size=4).map(lambda ps: ",".join(map(str, ps)))
v4_nets = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: f"{'.'.join(str((t[0] >> s) & 255) for s in (24, 16, 8, 0))}/{t[1]}")
v6_nets = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
    lambda t: f"{':'.join(format((t[0] >> s) & 0xFFFF, 'x') for s in range(112, -1, -16))}/{t[1]}")
cidrs = st.lists(v4_nets | v6_nets, max_size=3).map(",".join)
traffic_annotations = st.fixed_dictionaries({}, optional={
    "traffic.sidecar.istio.io/includeOutboundIPRanges": st.just("*") | cidrs,
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": cidrs,
    "traffic.sidecar.istio.io/includeInboundPorts": st.just("*") | ports,
    "traffic.sidecar.istio.io/excludeInboundPorts": ports,
    "traffic.sidecar.istio.io/includeOutboundPorts": ports,
    "traffic.sidecar.istio.io/excludeOutboundPorts": ports,
    "traffic.sidecar.istio.io/excludeInterfaces": st.lists(st.sampled_from(["eth1", "net1", "lo2"]),
                                                            max_size=2).map(",".join),
    "traffic.mesh-injector.io/captureDNS": st.sampled_from(["true", "false"]),
    "traffic.mesh-injector.io/proxyUID": st.integers(0, 65535).map(str),
    "status.sidecar.istio.io/port": st.integers(1, 65535).map(str),
})


@pytest.fixture(scope="module")
def scratch_netns():  # type: ignore[no-untyped-def]
    from tests.cni.conftest import require_bed

    require_bed()
    name = f"mcprop{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield f"/run/netns/{name}"
    subprocess.run(["ip", "netns", "del", name], check=True)


@settings(max_examples=40, deadline=None)
@given(pod_annotations=traffic_annotations)
def test_any_valid_plan_programs_and_reads_back_equal(scratch_netns, pod_annotations) -> None:  # type: ignore[no-untyped-def]
    plan = plan_from_annotations(pod_annotations)
    nftables.program(scratch_netns, plan)
    assert nftables.check(scratch_netns, plan) == []
