"""ADD / CHECK / DEL through libcni, atomicity of the batch, and 20 pods at once."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cni import nfnl, nftables
from cni.annotations import plan_from_annotations
from tests.cni.cnitest import INJECTED, CniBed, DriverError, exec_plugin, nft_ruleset, plugin_config


def nft_in(pod, *args: str) -> None:  # type: ignore[no-untyped-def]
    subprocess.run(["ip", "netns", "exec", Path(pod.netns).name, "nft", *args], check=True)


def test_check_passes_then_fails_after_tampering(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", INJECTED)
    bed.driver("check", pod, "meshnet")
    nft_in(pod, "add", "rule", "inet", "mesh_cni", "outbound", "tcp", "dport", "1234", "return")
    with pytest.raises(DriverError) as failure:
        bed.driver("check", pod, "meshnet")
    assert "differ from what ADD programs" in failure.value.stderr and "outbound" in failure.value.stderr
    # Re-ADD (our plugin; bridge refuses a second ADD) repairs it, with exactly one copy of the rules.
    for _ in range(2):
        code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, annotations=INJECTED), pod=pod)
        assert code == 0, out
    bed.driver("check", pod, "meshnet")
    assert nft_ruleset(pod.netns).count("table inet mesh_cni") == 1
    assert nft_ruleset(pod.netns).count("redirect to :15001") == 1


def test_check_fails_when_the_table_is_gone_or_changed_annotations(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", INJECTED)
    changed = {**INJECTED, "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}
    with pytest.raises(DriverError, match="outbound"):
        bed.driver("check", pod, "meshnet", annotations=changed)
    nft_in(pod, "delete", "table", "inet", "mesh_cni")
    with pytest.raises(DriverError, match="missing"):
        bed.driver("check", pod, "meshnet")


def test_check_fails_when_an_uninjected_pod_has_a_table(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", {})
    bed.driver("check", pod, "meshnet")
    nft_in(pod, "add", "table", "inet", "mesh_cni")
    with pytest.raises(DriverError, match="should not be redirected"):
        bed.driver("check", pod, "meshnet")


def test_del_removes_the_table_and_is_idempotent(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", INJECTED)
    nft_in(pod, "add", "table", "inet", "other")  # someone else's table survives our DEL
    bed.driver("del", pod, "meshnet")
    ruleset = nft_ruleset(pod.netns)
    assert "mesh_cni" not in ruleset and "table inet other" in ruleset
    bed.driver("del", pod, "meshnet")  # after a previous DEL (no cached prevResult any more)
    bed.driver("del", pod, "meshnet", annotations={})


def test_del_after_the_netns_is_deleted_succeeds(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", INJECTED)
    bed.delete_netns(pod)
    bed.driver("del", pod, "meshnet")


@pytest.mark.parametrize("backend", ["raw", "pyroute2"])
def test_a_failing_batch_applies_nothing(bed: CniBed, backend: str) -> None:
    """The last op jumps to a chain that does not exist: the kernel refuses the whole batch."""
    pod = bed.new_pod()
    good = nftables.add_ops(nftables.build_ruleset(plan_from_annotations({})))
    bad_rule = ("outbound", tuple(nftables.jump("no-such-chain")))
    bad = nftables.add_ops(nftables.build_ruleset(plan_from_annotations({
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})))
    bad.append((nfnl.NFT_MSG_NEWRULE, nfnl.NLM_F_CREATE | nfnl.NLM_F_APPEND,
                nfnl.rule_payload(nftables.TABLE, *bad_rule), "bad rule",
                ("rule", nftables.TABLE, *bad_rule)))
    with pytest.raises(OSError):
        nftables.run_batch(pod.netns, bad, backend)
    assert "mesh_cni" not in nft_ruleset(pod.netns)  # not even the table
    nftables.run_batch(pod.netns, good, backend)
    before = nft_ruleset(pod.netns)
    with pytest.raises(OSError):
        nftables.run_batch(pod.netns, bad, backend)
    assert nft_ruleset(pod.netns) == before  # the earlier table, untouched: no flush, no 5432 rule
    assert nftables.check(pod.netns, plan_from_annotations({})) == []


@pytest.mark.parametrize("backend", ["raw", "pyroute2"])
def test_add_creates_fresh_or_replaces_whole(bed: CniBed, backend: str) -> None:
    """ADD's fast path (exclusive create in a new netns) and its fallback (replace an existing
    table) end in the same rules; a failing batch on either path applies nothing."""
    plan = plan_from_annotations({})
    good = nftables.add_ops(nftables.build_ruleset(plan))
    bad_rule = ("outbound", tuple(nftables.jump("no-such-chain")))
    bad = [*good, (nfnl.NFT_MSG_NEWRULE, nfnl.NLM_F_CREATE | nfnl.NLM_F_APPEND,
                   nfnl.rule_payload(nftables.TABLE, *bad_rule), "bad rule",
                   ("rule", nftables.TABLE, *bad_rule))]
    fresh = bed.new_pod()
    with pytest.raises(OSError):
        nftables.run_add_ops(fresh.netns, bad, backend)
    assert "mesh_cni" not in nft_ruleset(fresh.netns)
    nftables.run_add_ops(fresh.netns, good, backend)
    assert nftables.check(fresh.netns, plan) == []

    stale = bed.new_pod()
    nft_in(stale, "add", "table", "inet", "mesh_cni")
    nft_in(stale, "add", "chain", "inet", "mesh_cni", "leftover")
    with pytest.raises(OSError):
        nftables.run_add_ops(stale.netns, bad, backend)
    assert "chain leftover" in nft_ruleset(stale.netns)  # the failed replace changed nothing
    nftables.run_add_ops(stale.netns, good, backend)
    assert nftables.check(stale.netns, plan) == []  # replaced whole: the stray chain is gone
    assert nft_ruleset(stale.netns) == nft_ruleset(fresh.netns)


def test_twenty_pods_add_and_del_concurrently(bed: CniBed) -> None:
    variants = [INJECTED, {**INJECTED, "traffic.sidecar.istio.io/excludeOutboundPorts": "3306"}, {}]
    pods = [bed.new_pod(variants[i % 3], name=f"burst{i}") for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda p: bed.driver("add", p, "meshnet"), pods))
    for pod, done in zip(pods, results, strict=True):
        pod.result = json.loads(done.stdout)
    assert len({pod.ipv4 for pod in pods}) == 20
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda p: bed.driver("check", p, "meshnet"), pods))
    for pod in pods:
        ruleset = nft_ruleset(pod.netns)
        assert ("mesh_cni" in ruleset) == bool(pod.annotations), pod.name
        excludes_3306 = "traffic.sidecar.istio.io/excludeOutboundPorts" in pod.annotations
        assert ("dport 3306" in ruleset) == excludes_3306
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda p: bed.driver("del", p, "meshnet"), pods))
    for pod in pods:
        assert "mesh_cni" not in nft_ruleset(pod.netns)
    leased = [p for p in (bed.root / "ipam").rglob("*") if p.is_file() and p.name[0].isdigit()]
    assert not [p for p in leased if any(pod.ipv4 == p.name for pod in pods)], "IP leases leaked"
