"""Bounded YAML in, fast YAML out: the one place the injector parses or writes YAML.

Anything we parse may come from someone we do not trust (a pod annotation, a ``/dry-run`` body,
a file handed to the CLI). A few hundred bytes of nested aliases expand to gigabytes, and a
deep document exhausts the parser's stack, so every load here checks input bytes, document
count, nesting depth and node count, and refuses aliases unless asked (then their *expanded*
size counts against the node limit). A violation raises ``YamlLimitError`` naming the limit and
its value, before any Python object for that document is built (and, for a text long enough to
exceed the node limit, before it is even composed: counting parser events stops at the limit).

The C (libyaml) loader and dumper are used when PyYAML has them; they give the same objects and
the same bytes as the pure-Python ones (tests/cli/test_yamlio.py checks both paths), about ten
times faster.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import yaml

MiB = 1024 * 1024

try:
    _CLoader: type | None = yaml.CSafeLoader
    _CDumper: type | None = yaml.CSafeDumper
except AttributeError:  # PyYAML built without libyaml
    _CLoader = _CDumper = None

#: The formatting every YAML writer of ours uses (kube-inject, /dry-run, the manifests).
DUMP_OPTIONS: dict[str, Any] = {"sort_keys": False, "default_flow_style": False, "allow_unicode": True}


@dataclass(frozen=True)
class YamlLimits:
    """Bounds for one load. ``max_nodes`` and ``max_depth`` apply per document."""

    max_bytes: int = 6 * MiB
    max_depth: int = 64
    max_nodes: int = 200_000
    max_documents: int = 1000
    aliases: bool = False


DEFAULT = YamlLimits()


class YamlLimitError(ValueError):
    """The input exceeds one of the limits; ``limit`` is its field name in ``YamlLimits``."""

    def __init__(self, source: str, limit: str, value: int | bool, what: str) -> None:
        super().__init__(f"{source}: {what} (limit {limit}={value})")
        self.source = source
        self.limit = limit
        self.value = value


class YamlSyntaxError(ValueError):
    """The input is not YAML; the message names the source and, when known, the line."""


def c_available() -> bool:
    return _CLoader is not None


# --- loading ------------------------------------------------------------------------------------


class _PyLoader(yaml.SafeLoader):
    """The pure-Python loader with a depth guard while composing (its composer recurses)."""

    _max_depth = DEFAULT.max_depth
    _source = "<input>"
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise _depth_error(self._source, self._max_depth)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _depth_error(source: str, limit: int) -> YamlLimitError:
    return YamlLimitError(source, "max_depth", limit, f"nesting deeper than {limit} levels")


class _CountingReader:
    """A stream that refuses to hand the parser more than ``limit`` bytes (characters, for text)."""

    def __init__(self, stream: IO[Any], limit: int, source: str) -> None:
        self._stream = stream
        self._limit = limit
        self._source = source
        self._seen = 0
        self.name = source

    def read(self, size: int = -1) -> Any:
        chunk = self._stream.read(size if size and size > 0 else 65536)
        self._seen += len(chunk)
        if self._seen > self._limit:
            raise _bytes_error(self._source, self._limit)
        return chunk


def _bytes_error(source: str, limit: int) -> YamlLimitError:
    return YamlLimitError(source, "max_bytes", limit, f"input larger than {limit} bytes")


def _input(text_or_stream: str | bytes | IO[Any], limits: YamlLimits, source: str) -> Any:
    if isinstance(text_or_stream, str):
        size = len(text_or_stream)
        if size > limits.max_bytes or (size * 4 > limits.max_bytes
                                       and len(text_or_stream.encode("utf-8", "surrogatepass"))
                                       > limits.max_bytes):
            raise _bytes_error(source, limits.max_bytes)
        return text_or_stream
    if isinstance(text_or_stream, (bytes, bytearray, memoryview)):
        if len(text_or_stream) > limits.max_bytes:
            raise _bytes_error(source, limits.max_bytes)
        return bytes(text_or_stream)
    return _CountingReader(text_or_stream, limits.max_bytes, source)


def _loader(data: Any, limits: YamlLimits, source: str, pure: bool) -> Any:
    if _CLoader is not None and not pure:
        return _CLoader(data)  # libyaml refuses nesting past 1000 itself; _check does the rest
    loader = _PyLoader(data)
    loader._max_depth = limits.max_depth
    loader._source = source
    return loader


def _check(node: Any, limits: YamlLimits, source: str) -> None:
    """Depth, node count and aliases of one composed document, walked without building it.

    An alias is the same node object reached twice; with aliases allowed the walk visits it
    each time, so the count is the expanded size and stops at the limit.
    """
    max_nodes, max_depth, aliases = limits.max_nodes, limits.max_depth, limits.aliases
    seen: set[int] = set()
    count = 0
    stack = [(node, 1)]
    mapping = yaml.MappingNode
    while stack:
        current, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise _nodes_error(source, max_nodes)
        if depth > max_depth:
            raise _depth_error(source, max_depth)
        if not aliases:
            key = id(current)
            if key in seen:
                raise _alias_error(source)
            seen.add(key)
        value = current.value
        if type(value) is list:
            depth += 1
            if type(current) is mapping:
                for k, v in value:
                    stack.append((k, depth))
                    stack.append((v, depth))
            else:
                stack.extend((child, depth) for child in value)


_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _precheck(data: str | bytes, limits: YamlLimits, source: str, pure: bool) -> None:
    """Count nodes, depth, documents and aliases from parser events, before composing anything.

    Composing builds every node of a document before ``_check`` can count them (seconds for a
    few MiB), so a text long enough to hold more than ``max_nodes`` nodes is first counted
    here, where the count stops at the limit. Syntax errors are left to the real pass.
    """
    parser = _loader(data, limits, source, pure)
    nodes = depth = documents = 0
    try:
        while parser.check_event():
            event = parser.get_event()
            kind = type(event)
            if kind is yaml.ScalarEvent or kind is yaml.AliasEvent or kind in _OPEN:
                nodes += 1
                if nodes > limits.max_nodes:
                    raise _nodes_error(source, limits.max_nodes)
                if kind in _OPEN:
                    depth += 1
                    if depth > limits.max_depth:
                        raise _depth_error(source, limits.max_depth)
                elif kind is yaml.AliasEvent and not limits.aliases:
                    raise _alias_error(source)
            elif kind in _CLOSE:
                depth -= 1
            elif kind is yaml.DocumentStartEvent:
                nodes = 0
                documents += 1
                if documents > limits.max_documents:
                    raise _documents_error(source, limits.max_documents)
    except (yaml.YAMLError, UnicodeError, RecursionError):
        return
    finally:
        parser.dispose()


def _nodes_error(source: str, limit: int) -> YamlLimitError:
    return YamlLimitError(source, "max_nodes", limit, f"a document of more than {limit} nodes")


def _alias_error(source: str) -> YamlLimitError:
    return YamlLimitError(source, "aliases", False, "YAML aliases (*name) are not accepted")


def _documents_error(source: str, limit: int) -> YamlLimitError:
    return YamlLimitError(source, "max_documents", limit, f"more than {limit} documents")


def _syntax_error(exc: BaseException, source: str) -> YamlSyntaxError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return YamlSyntaxError(f"{source}: not valid YAML{where}: {detail}")


def _documents(text_or_stream: str | bytes | IO[Any], source: str, limits: YamlLimits,
               pure: bool) -> Iterator[Any]:
    data = _input(text_or_stream, limits, source)
    if isinstance(data, (str, bytes)) and len(data) > limits.max_nodes:
        _precheck(data, limits, source, pure)
    loader = _loader(data, limits, source, pure)
    count = 0
    try:
        while True:
            try:
                if not loader.check_node():
                    return
                node = loader.get_node()
            except (yaml.YAMLError, UnicodeError) as exc:
                raise _syntax_error(exc, source) from None
            except RecursionError:
                raise _depth_error(source, limits.max_depth) from None
            count += 1
            if count > limits.max_documents:
                raise _documents_error(source, limits.max_documents)
            _check(node, limits, source)
            try:
                yield loader.construct_document(node)
            except YamlLimitError:
                raise
            except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
                raise _syntax_error(exc, source) from None
    finally:
        loader.dispose()


def load_all(text_or_stream: str | bytes | IO[Any], *, source: str, limits: YamlLimits = DEFAULT,
             pure: bool = False) -> Iterator[Any]:
    """Each document in turn (None for an empty one), checked before it is built.

    A stream is read as the parser needs it, so a long file costs one document of memory.
    ``pure`` forces the pure-Python parser (tests compare the two).
    """
    return _documents(text_or_stream, source, limits, pure)


def load_one(text: str | bytes, *, source: str, limits: YamlLimits = DEFAULT, pure: bool = False) -> Any:
    """The single document of ``text`` (None when empty); a second document is an error."""
    docs = _documents(text, source, limits, pure)
    try:
        first = next(docs, None)
        if next(docs, None) is not None:
            raise YamlSyntaxError(f"{source}: expected one YAML document, found more")
    finally:
        docs.close()
    return first


# --- writing ------------------------------------------------------------------------------------


#: Characters libyaml's emitter writes differently from PyYAML's (found by comparing the two over
#: every code point): CR and NEL (escaped vs quoted with a line break), and everything outside the
#: Basic Multilingual Plane (escaped vs written as is, with ``allow_unicode``).
_C_DIFFERS = re.compile("[\r\x85\ud800-\udfff\U00010000-\U0010ffff]")
_STR, _INT, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "bool", "null"))
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
_OTHER_SCALARS = (float, dt.date)  # written by SafeRepresenter's own functions


class _Fallback(Exception):
    """The object holds something libyaml would write differently: use the pure-Python dumper."""


def _scalar_text(value: str) -> str:
    if (not value.isascii() or "\r" in value) and _C_DIFFERS.search(value):
        raise _Fallback
    return value


def _nodes(obj: Any, seen: set[int], other: Any) -> Any:
    """The representation graph SafeRepresenter builds for ``obj`` (``default_flow_style=False``,
    keys unsorted), without its per-node dispatch; raises _Fallback where libyaml would differ:
    CR, NEL and astral characters, an empty-string key (PyYAML writes ``? ''``), an object
    reached twice (anchors), or a type beyond JSON's and dates."""
    kind = type(obj)
    if kind is str:
        return yaml.ScalarNode(_STR, _scalar_text(obj))
    if kind is dict or kind is list:
        if id(obj) in seen:
            raise _Fallback
        seen.add(id(obj))
        if kind is list:
            return yaml.SequenceNode(_SEQ, [_nodes(item, seen, other) for item in obj], flow_style=False)
        pairs = []
        for key, value in obj.items():
            if key == "":
                raise _Fallback
            pairs.append((_nodes(key, seen, other), _nodes(value, seen, other)))
        return yaml.MappingNode(_MAP, pairs, flow_style=False)
    if kind is bool:
        return yaml.ScalarNode(_BOOL, "true" if obj else "false")
    if kind is int:
        return yaml.ScalarNode(_INT, str(obj))
    if obj is None:
        return yaml.ScalarNode(_NULL, "null")
    if kind in _OTHER_SCALARS or kind is dt.datetime:
        return other.represent_data(obj)
    raise _Fallback


if _CDumper is not None:

    class _FastDumper(_CDumper):  # type: ignore[misc, valid-type]
        """libyaml's emitter with a memo for the implicit-tag resolution it asks for per scalar."""

        _resolved: dict[tuple[str, bool, bool], str] = {}

        def descend_resolver(self, current_node: Any, current_index: Any) -> None:
            """No path resolvers are registered: nothing to track per node."""

        def ascend_resolver(self) -> None:
            """See descend_resolver."""

        def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
            if kind is not yaml.ScalarNode:
                return _SEQ if kind is yaml.SequenceNode else _MAP
            key = (value, implicit[0], implicit[1])
            tag = self._resolved.get(key)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(self._resolved) > 10_000:
                    self._resolved.clear()
                self._resolved[key] = tag
            return tag


def _fast_dump(obj: Any) -> str | None:
    """``obj`` written by libyaml, or None when that would not be PyYAML's bytes."""
    if _CDumper is None or (type(obj) is not dict and type(obj) is not list):
        return None
    stream = io.StringIO()
    dumper = _FastDumper(stream, **DUMP_OPTIONS)
    try:
        node = _nodes(obj, set(), dumper)
        dumper.open()
        dumper.serialize(node)
        dumper.close()
    except _Fallback:
        return None
    finally:
        dumper.dispose()
    return stream.getvalue()


def dump(obj: Any, *, pure: bool = False) -> str:
    """One document in our house style (block style, keys in their order, UTF-8 kept)."""
    text = None if pure else _fast_dump(obj)
    return text if text is not None else yaml.dump(obj, Dumper=yaml.SafeDumper, **DUMP_OPTIONS)


def dump_all(objs: Iterable[Any], *, pure: bool = False) -> str:
    """Several documents separated by ``---`` lines, as ``yaml.safe_dump_all`` writes them."""
    docs = list(objs)
    if all(type(d) is dict and d for d in docs):
        return "".join(dump_stream(docs, pure=pure))
    return yaml.dump_all(docs, Dumper=yaml.SafeDumper, **DUMP_OPTIONS)


def dump_stream(objs: Iterable[dict[str, Any]], *, pure: bool = False) -> Iterator[str]:
    """``dump_all`` of mappings, one document at a time, so a writer never holds them all.

    For non-empty mappings ``dump_all`` is exactly the documents joined by ``---`` lines
    (no document of a mapping is left open-ended); an empty one follows ``---`` on its line.
    """
    first = True
    for obj in objs:
        if type(obj) is not dict:
            raise TypeError(f"dump_stream writes mappings, not {type(obj).__name__}")
        text = dump(obj, pure=pure)
        yield text if first else ("---\n" if obj else "--- ") + text
        first = False
