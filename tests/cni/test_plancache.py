"""The node-local plan cache: same input, same batch; anything else, a fresh plan."""

from __future__ import annotations

import os

from cni import annotations, plancache
from tests.cni.cnitest import INJECTED, CniBed, exec_plugin, nft_ruleset, plugin_config

EXCLUDE_5432 = {**INJECTED, "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}


def add(bed: CniBed, pod_annotations: dict[str, str], log_name: str, **extra: object):  # type: ignore[no-untyped-def]
    pod = bed.new_pod(pod_annotations)
    log = bed.root / log_name
    config = plugin_config(bed, annotations=pod_annotations, logFile=str(log), logLevel="debug", **extra)
    code, out, _ = exec_plugin(bed, "ADD", config, pod=pod)
    return pod, code, out, log.read_text() if log.exists() else ""


def test_every_annotation_the_vocabulary_reads_is_in_the_key() -> None:
    keys = (*annotations.TRAFFIC_ANNOTATIONS, annotations.INJECT, annotations.STATUS,
            annotations.INTERCEPTION_MODE)
    assert all(key.startswith(plancache.MESH_PREFIXES) for key in keys)
    base = plancache.key(INJECTED, False)
    assert plancache.key({**INJECTED, "app.kubernetes.io/name": "x"}, False) == base
    assert plancache.key(EXCLUDE_5432, False) != base
    assert plancache.key(INJECTED, True) != base


def test_a_hit_programs_exactly_what_a_miss_does(bed: CniBed) -> None:
    first, code, _, log = add(bed, EXCLUDE_5432, "first.log", planCacheDir=str(bed.root / "pc1"))
    assert code == 0 and "plan cache hit" not in log
    second, code, _, log = add(bed, EXCLUDE_5432, "second.log", planCacheDir=str(bed.root / "pc1"))
    assert code == 0 and "plan cache hit" in log
    assert nft_ruleset(second.netns) == nft_ruleset(first.netns)
    assert "dport 5432" in nft_ruleset(second.netns)
    check = plugin_config(bed, annotations=EXCLUDE_5432)
    assert exec_plugin(bed, "CHECK", check, pod=second)[0] == 0
    # Another input misses and gets its own rules.
    third, code, _, log = add(bed, INJECTED, "third.log", planCacheDir=str(bed.root / "pc1"))
    assert code == 0 and "plan cache hit" not in log and "dport 5432" not in nft_ruleset(third.netns)


def test_skip_decisions_are_cached_and_errors_are_not(bed: CniBed) -> None:
    directory = str(bed.root / "pc2")
    opted_out = {**INJECTED, "sidecar.istio.io/inject": "false"}
    for name in ("a.log", "b.log"):
        pod, code, _, log = add(bed, opted_out, name, planCacheDir=directory)
        assert code == 0 and "mesh_cni" not in nft_ruleset(pod.netns)
    assert "plan cache hit" in log
    invalid = {**INJECTED, "traffic.sidecar.istio.io/excludeOutboundPorts": "http"}
    for name in ("c.log", "d.log"):
        pod, code, out, log = add(bed, invalid, name, planCacheDir=directory)
        assert code != 0 and out["code"] == 101 and "plan cache hit" not in log  # type: ignore[index]


def test_an_untrusted_directory_is_ignored(bed: CniBed) -> None:
    directory = bed.root / "pc3"
    add(bed, INJECTED, "e.log", planCacheDir=str(directory))
    os.chmod(directory, 0o777)
    pod, code, _, log = add(bed, INJECTED, "f.log", planCacheDir=str(directory))
    assert code == 0 and "plan cache hit" not in log and "mesh_cni" in nft_ruleset(pod.netns)


def test_the_cache_stays_bounded(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(plancache, "MAX_ENTRIES", 3)
    cache = plancache.PlanCache.open(str(tmp_path / "pc"))
    assert cache is not None
    for i in range(7):
        cache.put(f"k{i}", ("skip", "x"))
        assert len(os.listdir(cache.directory)) <= 3
    assert cache.get("k6") == ("skip", "x") and cache.get("nope") is None
