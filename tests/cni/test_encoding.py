"""Pure parts: the struct encoder against pyroute2's bytes, the ruleset shape, the lean hot path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import annotations, fastjson, nfnl, nft_pyroute2, nftables, plugin
from cni.annotations import TrafficDefaults, plan_from_annotations
from tests.cni.cnitest import REPO

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


def test_hot_path_imports_stay_lean() -> None:
    """An uninjected pod's ADD imports neither pyroute2 nor the annotation module nor json."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
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


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_fastjson_agrees_with_json(value: object) -> None:
    assert fastjson.loads(json.dumps(value)) == value
    assert json.loads(fastjson.dumps(value)) == value
