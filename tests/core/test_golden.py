"""Golden files: tests/golden/<case>.yaml -> <case>.yaml.injected, through the core and through the patch.

Each expected file holds two YAML documents: the decision with its reasons and warnings, then
the object as the API server would store it. Regenerate after an intended change with
``REFRESH_GOLDEN=1 .venv/bin/pytest tests/core/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from cni import annotations as ann
from injector.config import compile_config
from injector.core import WORKLOAD_TEMPLATE_PATHS, inject
from injector.result import Decision, InjectionResult
from tests.core.kube import schema_errors

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SETTINGS: dict[str, dict[str, Any]] = yaml.safe_load((GOLDEN / "cases.yaml").read_text()) or {}
CASES = sorted(p.name.removesuffix(".yaml") for p in GOLDEN.glob("*.yaml") if p.name != "cases.yaml")
REFRESH = bool(os.environ.get("REFRESH_GOLDEN"))
_CONFIGS: dict[str, Any] = {}


def config_for(case: str) -> Any:
    settings = SETTINGS.get(case, {})
    key = yaml.safe_dump(settings.get("config") or {}, sort_keys=True)
    if key not in _CONFIGS:
        _CONFIGS[key] = compile_config(settings.get("config") or {})
    return _CONFIGS[key]


def load_input(case: str) -> dict[str, Any]:
    """The input object. ``@CONFIG_HASH@`` stands for the case's current config hash, so a
    re-injection input stays "injected with this config" when templates change."""
    text = (GOLDEN / f"{case}.yaml").read_text().replace("@CONFIG_HASH@", config_for(case).config_hash)
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert len(docs) == 1, f"{case}: one object per input file"
    return docs[0]


def run(case: str, obj: dict[str, Any]) -> InjectionResult:
    settings = SETTINGS.get(case, {})
    return inject(
        obj,
        config=config_for(case),
        namespace_labels=settings.get("namespaceLabels", {"istio-injection": "enabled"}),
        namespace=settings.get("namespace"),
    )


def summary(result: InjectionResult) -> dict[str, Any]:
    return {
        "decision": result.decision.value,
        "reasons": [r.as_dict() for r in result.reasons],
        "warnings": [w.as_dict() for w in result.warnings],
    }


def expected(case: str, result: InjectionResult) -> tuple[dict[str, Any], dict[str, Any]]:
    path = GOLDEN / f"{case}.yaml.injected"
    if REFRESH or not path.exists():
        path.write_text(yaml.safe_dump_all([summary(result), result.mutated], sort_keys=False, width=120))
        if not REFRESH:
            pytest.fail(f"wrote missing golden {path.name}; review it and run again")
    head, obj = yaml.safe_load_all(path.read_text())
    return head, obj


def test_there_are_enough_goldens() -> None:
    assert len(CASES) >= 40


def test_every_configured_case_exists() -> None:
    assert sorted(set(SETTINGS) - set(CASES)) == []


@pytest.mark.parametrize("case", CASES)
def test_input_is_schema_valid(case: str) -> None:
    assert schema_errors(load_input(case)) == []


@pytest.mark.parametrize("case", CASES)
def test_core_output_matches_golden(case: str) -> None:
    original = load_input(case)
    pristine = copy.deepcopy(original)
    result = run(case, original)
    head, want = expected(case, result)
    assert summary(result) == head
    assert result.mutated == want
    assert original == pristine, "inject() must not modify its input"
    assert schema_errors(result.mutated) == []


@pytest.mark.parametrize("case", CASES)
def test_patch_applied_to_input_gives_golden(case: str) -> None:
    original = load_input(case)
    result = run(case, original)
    _, want = expected(case, result)
    patched = jsonpatch.apply_patch(original, result.patch)
    assert patched == want
    if result.decision is not Decision.INJECT:
        assert result.patch == []


def _golden_decision(case: str) -> str | None:
    path = GOLDEN / f"{case}.yaml.injected"
    if not path.exists():
        return None
    return next(yaml.safe_load_all(path.read_text()))["decision"]


INJECTED_CASES = [c for c in CASES if _golden_decision(c) in (None, Decision.INJECT.value)]


@pytest.mark.parametrize("case", INJECTED_CASES)
def test_injecting_the_output_again_changes_nothing(case: str) -> None:
    result = run(case, load_input(case))
    assert result.decision is Decision.INJECT
    again = run(case, copy.deepcopy(result.mutated))
    assert again.decision is Decision.INJECT
    assert again.patch == []
    assert again.mutated == result.mutated


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod (templates) in an object as the API server stores it: a Pod, a workload, a List."""
    if obj.get("kind") == "List":
        return [t for item in obj.get("items") or () for t in _pod_templates(item)]
    if obj.get("kind", "Pod") == "Pod":
        return [obj]
    path = WORKLOAD_TEMPLATE_PATHS.get(obj.get("kind", ""))
    if path is None:
        return []
    template: Any = obj
    for key in path:
        template = template[key]
    return [template]


@pytest.mark.parametrize("case", CASES)
def test_the_plugin_redirects_exactly_the_pods_given_a_capture_init_container(case: str) -> None:
    """Injector and plugin cannot disagree: the plugin's gate reads what the injector wrote, so a
    pod given istio-validation/istio-init is redirected and no other pod is (issue 16: label
    ``sidecar.istio.io/inject: "true"`` beating annotation ``"false"`` is redirected)."""
    result = run(case, load_input(case))
    _, stored = expected(case, result)
    admitted = [] if result.decision is Decision.REJECT else _pod_templates(stored)  # refused: never runs
    for template in admitted:
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        inits = {c.get("name") for c in (template.get("spec") or {}).get("initContainers") or ()}
        given_capture = bool(inits & {ann.VALIDATION_CONTAINER, ann.INIT_CONTAINER})
        decision = ann.redirect_decision(annotations)
        assert decision.redirect is given_capture, (case, decision)
        if decision.redirect:  # and the plugin can program what the injector admitted
            assert ann.plan_from_annotations(annotations).redirects
