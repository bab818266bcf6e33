"""The shipped examples (README's first command injects them) inject cleanly and stay schema-valid."""

from __future__ import annotations

from pathlib import Path

import jsonpatch
import pytest
import yaml

from injector.core import inject
from injector.result import Decision
from tests.core.kube import schema_errors

EXAMPLES = sorted((Path(__file__).resolve().parent.parent.parent / "examples").glob("*.yaml"))


def test_there_is_an_example() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_injects(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    decisions = []
    for doc in docs:
        assert schema_errors(doc) == []
        result = inject(doc)
        decisions.append(result.decision)
        assert schema_errors(result.mutated) == []
        assert jsonpatch.apply_patch(doc, result.patch) == result.mutated
    assert Decision.INJECT in decisions
