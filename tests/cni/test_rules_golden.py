"""Ruleset goldens: ``golden/<case>.annotations`` (downward-API format) -> ``<case>.rules``.

The rules text is decoded from the exact netlink bytes ADD sends (cni.nftext), so a change to
the plan, the ruleset or the encoder shows up here as a readable diff. REFRESH_GOLDEN=1
rewrites the ``.rules`` files; review the diff before committing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cni import annotations, nftext, plugin, spec
from cni.redirect import parse_downward_api
from tests.cni.cnitest import INJECTED

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(path.stem for path in GOLDEN.glob("*.annotations"))
REFRESH = bool(os.environ.get("REFRESH_GOLDEN"))


def rules_text(pod_annotations: dict[str, str]) -> str:
    request = spec.Request("ADD", {"CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod"},
                           {"cniVersion": "1.0.0", "name": "golden"})
    ops, why = plugin.add_ops_for(request, {**INJECTED, **pod_annotations})
    return nftext.render(ops) if ops is not None else f"# not redirected: {why}\n"


@pytest.mark.parametrize("case", CASES)
def test_rules_match_the_golden(case: str) -> None:
    text = rules_text(parse_downward_api((GOLDEN / f"{case}.annotations").read_text()))
    golden = GOLDEN / f"{case}.rules"
    if REFRESH:
        golden.write_text(text)
    assert golden.exists(), f"no {golden.name}: run with REFRESH_GOLDEN=1 and review it"
    assert text == golden.read_text()


def test_every_traffic_annotation_has_a_golden() -> None:
    covered = {key for case in CASES
               for key in parse_downward_api((GOLDEN / f"{case}.annotations").read_text())}
    assert set(annotations.TRAFFIC_ANNOTATIONS) <= covered


def test_no_stale_rules_files() -> None:
    assert sorted(path.stem for path in GOLDEN.glob("*.rules")) == CASES
