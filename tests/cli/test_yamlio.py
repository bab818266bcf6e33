"""injector.yamlio: each limit refused with its name and value; fast paths give PyYAML's objects and bytes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from injector import yamlio
from injector.yamlio import YamlLimitError, YamlLimits, YamlSyntaxError

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PATHS = [pytest.param(False, id="libyaml"), pytest.param(True, id="pure-python")]
TODAY = {"sort_keys": False, "default_flow_style": False, "allow_unicode": True}


def billion_laughs(levels: int = 9) -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


def test_the_c_loader_is_installed() -> None:
    """PyYAML's wheels carry libyaml; without it reading YAML is several times slower."""
    if not yamlio.c_available() and not os.environ.get("CI"):
        pytest.skip("PyYAML without libyaml on this machine")
    assert yamlio.c_available()


@pytest.mark.parametrize("pure", PATHS)
@pytest.mark.parametrize(
    ("text", "limits", "limit", "value"),
    [
        ("a: &x [1, 2]\nb: *x\n", YamlLimits(), "aliases", False),
        (billion_laughs(), YamlLimits(aliases=True), "max_nodes", 200_000),
        ("[" * 65 + "]" * 65, YamlLimits(), "max_depth", 64),
        ("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 70)) + "  " * 70 + "c", YamlLimits(),
         "max_depth", 64),
        ("- 1\n" * 101, YamlLimits(max_nodes=100), "max_nodes", 100),
        ("kind: Pod\n---\n" * 6, YamlLimits(max_documents=5), "max_documents", 5),
        ("kind: Pod\n" * 10, YamlLimits(max_bytes=50), "max_bytes", 50),
        ("name: " + "é" * 30, YamlLimits(max_bytes=50), "max_bytes", 50),
    ],
    ids=["alias", "alias-bomb", "depth-flow", "depth-block", "nodes", "documents", "bytes", "bytes-utf8"],
)
def test_each_limit_is_refused_with_its_name_and_value(
    text: str, limits: YamlLimits, limit: str, value: Any, pure: bool
) -> None:
    with pytest.raises(YamlLimitError) as caught:
        list(yamlio.load_all(text, source="pod.yaml", limits=limits, pure=pure))
    assert caught.value.limit == limit
    assert str(caught.value).startswith("pod.yaml: ")
    assert f"{limit}={value}" in str(caught.value)


@pytest.mark.parametrize("pure", PATHS)
@pytest.mark.parametrize(
    ("text", "limit"),
    [("a: &x [1]\nb: *x\n", "aliases"), ("a: [[[[[1]]]]]\n", "max_depth"),
     ("a: 1\n---\n" * 4, "max_documents"), ("[" + "1," * 20 + "1]", "max_nodes")],
)
def test_texts_longer_than_max_nodes_are_counted_before_composing(text: str, limit: str, pure: bool) -> None:
    limits = YamlLimits(max_nodes=len(text) - 1 if limit != "max_nodes" else 20, max_depth=4, max_documents=3)
    with pytest.raises(YamlLimitError) as caught:
        list(yamlio.load_all(text, source="f", limits=limits, pure=pure))
    assert caught.value.limit == limit


@pytest.mark.parametrize("pure", PATHS)
def test_aliases_are_expanded_when_allowed_and_small(pure: bool) -> None:
    doc = yamlio.load_one("a: &x [1, 2]\nb: *x\n", source="f", limits=YamlLimits(aliases=True), pure=pure)
    assert doc == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize("pure", PATHS)
def test_a_stream_is_cut_off_at_the_byte_limit(pure: bool) -> None:
    stream = io.BytesIO(b"kind: Pod\n---\n" * 10_000)
    docs = yamlio.load_all(stream, source="big.yaml", limits=YamlLimits(max_bytes=4096), pure=pure)
    with pytest.raises(YamlLimitError, match=r"big.yaml: .*max_bytes=4096"):
        list(docs)


@pytest.mark.parametrize("pure", PATHS)
def test_a_stream_yields_documents_before_reading_it_all(pure: bool) -> None:
    stream = io.BytesIO(b"a: 1\n---\n---\nb: 2\n")
    assert list(yamlio.load_all(stream, source="s", pure=pure)) == [{"a": 1}, None, {"b": 2}]


@pytest.mark.parametrize("pure", PATHS)
def test_syntax_errors_name_the_source_and_line(pure: bool) -> None:
    with pytest.raises(YamlSyntaxError) as caught:
        yamlio.load_one("kind: Pod\nspec: [unclosed\n", source="deploy/pod.yaml", pure=pure)
    message = str(caught.value)
    assert message.startswith("deploy/pod.yaml: not valid YAML at line ")
    assert "<unicode string>" not in message


def test_load_one_refuses_a_second_document() -> None:
    with pytest.raises(YamlSyntaxError, match="one YAML document"):
        yamlio.load_one("a: 1\n---\nb: 2\n", source="annotation")


@pytest.mark.parametrize("case", sorted(p.name for p in GOLDEN.glob("*.yaml*")))
def test_both_paths_read_and_write_every_golden_alike(case: str) -> None:
    text = (GOLDEN / case).read_text()
    limits = YamlLimits(aliases=True)  # list.yaml.injected has anchors: the core shares probe objects
    fast = list(yamlio.load_all(text, source=case, limits=limits))
    slow = list(yamlio.load_all(text, source=case, limits=limits, pure=True))
    assert fast == slow == list(yaml.safe_load_all(text))
    docs = [d for d in fast if d is not None]
    assert yamlio.dump_all(docs) == yaml.safe_dump_all(docs, **TODAY)
    if all(type(d) is dict for d in docs):
        assert "".join(yamlio.dump_stream(docs)) == yaml.safe_dump_all(docs, **TODAY)


_TEXT = st.text(max_size=60)
_TREE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT | st.dates(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT | st.integers(), inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=200, suppress_health_check=list(HealthCheck), deadline=None)
@given(st.lists(_TREE, min_size=1, max_size=3))
def test_written_bytes_equal_pyyaml_for_any_value(docs: list[Any]) -> None:
    """Including what libyaml writes differently (CR, NEL, astral characters, empty keys)."""
    want = yaml.dump_all(docs, Dumper=yaml.SafeDumper, **TODAY)
    assert yamlio.dump_all(docs) == want == yamlio.dump_all(docs, pure=True)
    assert yamlio.dump(docs[0]) == yaml.dump(docs[0], Dumper=yaml.SafeDumper, **TODAY)
    if all(type(d) is dict for d in docs):
        assert "".join(yamlio.dump_stream(docs)) == want
    text = want
    assert list(yamlio.load_all(text, source="x", limits=YamlLimits(aliases=True))) == list(
        yamlio.load_all(text, source="x", limits=YamlLimits(aliases=True), pure=True)
    )


@pytest.mark.parametrize("text", ["a: \U0001f600\n", "a: \"x\\ry\"\n", "'': 1\n"])
def test_values_libyaml_writes_differently_still_come_out_as_pyyaml_writes_them(text: str) -> None:
    doc = yaml.safe_load(text)
    assert yamlio.dump(doc) == yaml.safe_dump(doc, **TODAY)


_WORDS = st.sampled_from(["a", "word", " ", "  ", "'", '"', "\n", "\t", "é", "\U0001f600", "\r", ": ", "- ",
                          "#", "null", "12", "x" * 30])
_LONG = st.lists(_WORDS, max_size=40).map("".join)
_NESTED = st.recursive(_LONG | st.integers() | st.booleans(),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_LONG, inner, max_size=3),
                       max_leaves=12)


@settings(max_examples=300, suppress_health_check=list(HealthCheck), deadline=None)
@given(st.dictionaries(_LONG, _NESTED, min_size=1, max_size=4))
def test_long_values_fold_where_pyyaml_folds_them_at_any_depth(doc: dict[str, Any]) -> None:
    """Values past column 80 are folded at a space and quoted ones broken at line breaks: the
    writer must do both at the columns and indents PyYAML does (annotations, args, env)."""
    assert yamlio.dump(doc) == yaml.dump(doc, Dumper=yaml.SafeDumper, **TODAY)


@pytest.mark.parametrize("text", [
    "a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n", "s: !!set {a, b}\n", "o: !!omap [a: 1, b: 2]\n", "? a\n: 1\n",
    "=: 1\n", "2001-01-01: x\nt: 2001-12-14t21:59:43.10-05:00\n", "b: !!binary aGVsbG8=\n",
    "a: &l [1, 2]\nb: *l\nc: *l\n", "~: 1\n1.5: a\ntrue: b\n0x1f: c\n", "a: !!str 123\nb: !!int '7'\n",
    "a: !!map {b: 1}\n", "a: .nan\nb: -.inf\nc: 1e3\n",
], ids=["merge", "set", "omap", "complex-key", "value-key", "timestamps", "binary", "shared-alias",
        "typed-keys", "explicit-tags", "tagged-map", "floats"])
def test_yaml_beyond_json_reads_as_pyyaml_reads_it(text: str) -> None:
    """Merge keys, tags, typed keys and aliases come out as PyYAML builds them, shared objects
    still shared (written back with the same anchors)."""
    limits = YamlLimits(aliases=True)
    fast = yamlio.load_one(text, source="f", limits=limits)
    assert repr(fast) == repr(yamlio.load_one(text, source="f", limits=limits, pure=True))
    assert repr(fast) == repr(yaml.safe_load(text))
    if isinstance(fast, dict):
        assert yamlio.dump(fast) == yaml.safe_dump(yaml.safe_load(text), **TODAY)


@pytest.mark.parametrize("pure", PATHS)
@pytest.mark.parametrize("text", ["x: !foo bar\n", "k: !!python/object:os.system x\n", "a: =\n",
                                  "? [a, b]\n: 1\n"])
def test_unknown_tags_and_unhashable_keys_are_refused_by_both_paths(text: str, pure: bool) -> None:
    with pytest.raises(YamlSyntaxError, match=r"^f: not valid YAML at line 1"):
        yamlio.load_one(text, source="f", pure=pure)


def test_the_writer_and_loader_memos_stay_bounded_over_a_long_stream() -> None:
    """A long file of unique names must not grow kube-inject's memory (peak RSS stays flat);
    documents written after the memos started afresh are still PyYAML's bytes."""
    docs = [{"metadata": {"name": f"web-{i}", "labels": {"app": f"web-{i} with a long tail " * (i % 3)}},
             "spec": {"replicas": i}} for i in range(3 * yamlio.MEMO_ENTRIES)]
    text = "".join(yamlio.dump_stream(docs))
    assert text == yaml.safe_dump_all(docs, **TODAY)
    assert list(yamlio.load_all(text, source="long.yaml", limits=YamlLimits(max_documents=len(docs)))) == docs
    assert len(yamlio._WRITER._other) <= yamlio.MEMO_ENTRIES
    if yamlio.c_available():
        assert len(yamlio._FastLoader._resolved) <= yamlio.MEMO_ENTRIES
