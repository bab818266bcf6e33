"""Our injection against the real Istio's (istioctl kube-inject, offline), object by object.

Every difference must be on tests/istio/differences.yaml as intended (with its reason) or as a
known gap (with its issue); anything else fails, naming the input, the mode and the aspect.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.istio import compare, inputs, oracle
from tests.istio.oracle import MODES, Mode

ENTRIES = compare.load_entries()
# No shrinking: every shrink step is another istioctl run; the failure lists the whole pod.
HYPOTHESIS = settings(max_examples=int(os.environ.get("ISTIO_DIFF_EXAMPLES", "3")), deadline=None,
                      derandomize=bool(os.environ.get("CI")), database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(named: Sequence[tuple[str, dict[str, Any]]], mode: Mode) -> None:
    """Inject each object both ways; fail listing every difference that is on neither list."""
    objs = [obj for _, obj in named]
    ours, istio = oracle.our_inject(objs, mode), oracle.istio_inject(objs, mode)
    problems = []
    for (name, _), a, b in zip(named, ours, istio, strict=True):
        for diff in compare.unexplained(compare.differences(a, b), mode, ENTRIES, name):
            detail = f" ({diff.detail[:200]})" if diff.detail else ""
            problems.append(f"{name[:600]} [{mode.name}] {diff.aspect}: ours={diff.ours!r:.300} "
                            f"istio={diff.istio!r:.300}{detail}")
    assert not problems, f"{len(problems)} unexplained differences:\n" + "\n".join(problems[:60])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_golden_inputs(istioctl: str, mode: Mode) -> None:
    check(inputs.golden_inputs(), mode)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_every_workload_kind(istioctl: str, mode: Mode) -> None:
    named = inputs.workload_kinds()
    outcomes = oracle.istio_inject([obj for _, obj in named], mode)
    assert [o.decision for o in outcomes] == [oracle.INJECTED] * len(named), "Istio injects every kind"
    check(named, mode)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_generated_pods(istioctl: str, mode: Mode) -> None:
    @HYPOTHESIS
    @given(st.lists(inputs.pods(), min_size=4, max_size=6))
    def run(pods: list[dict[str, Any]]) -> None:
        check([(inputs.describe(p), p) for p in pods], mode)

    run()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_cli_on_the_file_istioctl_reads(istioctl: str, mode: Mode, tmp_path: Any) -> None:
    """`mesh-injector kube-inject` on the same file as istioctl gives what the compared core gave."""
    named = inputs.workload_kinds()
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump_all([obj for _, obj in named]))
    conf = tmp_path / "config"
    conf.mkdir()
    (conf / "config.yaml").write_text(yaml.safe_dump({"values": {"proxy": {
        "capture": mode.capture, "nativeSidecars": "true" if mode.native else "false"}}}))
    proc = subprocess.run([str(oracle.REPO / ".venv" / "bin" / "mesh-injector"), "kube-inject",
                           "-f", str(src), "--config-dir", str(conf)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    got = list(yaml.safe_load_all(proc.stdout))
    want = [o.obj for o in oracle.our_inject(list(yaml.safe_load_all(src.read_text())), mode)]
    assert got == want
    check(list(zip([n for n, _ in named], got, strict=True)), mode)


def test_no_listed_difference_is_stale(istioctl: str) -> None:
    """Every entry is still met by some golden or workload-kind input in some mode: a gap fixed or
    a difference gone must leave the list, so the list says exactly where we differ."""
    used: set[str] = set()
    for mode in MODES:
        for named in (inputs.golden_inputs(), inputs.workload_kinds()):
            objs = [obj for _, obj in named]
            pairs = zip(named, oracle.our_inject(objs, mode), oracle.istio_inject(objs, mode), strict=True)
            for (name, _), ours, istio in pairs:
                for diff in compare.differences(ours, istio):
                    used.update(e.id for e in ENTRIES if e.matches(diff, mode, name))
    stale = sorted(e.id for e in ENTRIES if e.id not in used and not e.generated_only)
    assert not stale, f"no input meets these entries of differences.yaml any more: {stale}"
