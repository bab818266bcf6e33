"""Bounded YAML in, fast YAML out: the one place the injector parses or writes YAML.

Anything we parse may come from someone we do not trust (a pod annotation, a ``/dry-run`` body,
a file handed to the CLI). A few hundred bytes of nested aliases expand to gigabytes, and a
deep document exhausts the parser's stack, so every load here checks input bytes, document
count, nesting depth and node count, and refuses aliases unless asked (then their *expanded*
size counts against the node limit). A violation raises ``YamlLimitError`` naming the limit and
its value, before any Python object for that document is built (and, for a text long enough to
exceed the node limit, before it is even composed: counting parser events stops at the limit).

The C (libyaml) loader is used when PyYAML has it: the same objects as the pure-Python one,
about ten times faster. Writing is PyYAML's own output (tests/cli/test_yamlio.py compares them
over every golden and random documents) from a block writer that renders each distinct scalar
once with PyYAML's emitter: libyaml's emitter writes some characters differently and, driven
node by node from Python, costs more than the document's JSON encoding ten times over.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import yaml

MiB = 1024 * 1024

try:
    _CLoader: type | None = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _CLoader = None

_STR, _INT, _BOOL, _NULL, _FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "bool", "null", "float"))
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
#: What the loader's and the writer's memos keep before they start afresh: a long file of unique
#: names must not grow them (peak RSS stays flat), the common scalars come back at once.
MEMO_CHARS = 1_000_000
MEMO_ENTRIES = 2048

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


if _CLoader is not None:

    class _FastLoader(_CLoader):  # type: ignore[misc, valid-type]
        """libyaml's parser with a memo for the implicit-tag resolution it asks Python for per
        scalar (most of its time otherwise): a plain scalar's tag depends on its text alone,
        a quoted one is always a string, as no path resolvers are registered."""

        _resolved: dict[str, str] = {}
        _chars = 0

        def descend_resolver(self, current_node: Any, current_index: Any) -> None:
            """No path resolvers: nothing to track per node."""

        def ascend_resolver(self) -> None:
            """See descend_resolver."""

        def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
            if kind is not yaml.ScalarNode:
                return _SEQ if kind is yaml.SequenceNode else _MAP
            if not implicit[0]:
                return _STR
            tag = self._resolved.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                cls = _FastLoader
                cls._chars += len(value)
                if cls._chars > MEMO_CHARS or len(cls._resolved) >= MEMO_ENTRIES:
                    cls._resolved.clear()
                    cls._chars = len(value)
                cls._resolved[value] = tag
            return tag

    if _CLoader.yaml_path_resolvers:  # someone registered path resolvers: resolve every node
        _FastLoader = _CLoader  # type: ignore[misc]


def _loader(data: Any, limits: YamlLimits, source: str, pure: bool) -> Any:
    if _CLoader is not None and not pure:
        return _FastLoader(data)  # libyaml refuses nesting past 1000 itself; _check does the rest
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


class _Unusual(Exception):
    """A node _construct leaves to PyYAML's constructor: a merge key, a tagged collection, ..."""


_PLAIN_KEYS = frozenset((_STR, _INT, _BOOL, _NULL, _FLOAT))


def _construct(loader: Any, root: Any) -> Any:
    """``loader.construct_document(root)`` for documents of plain mappings, lists and scalars,
    without the constructor's per-node dispatch (a Kubernetes object is nothing else); other
    scalars go through the constructor, and anything more (merge keys, ``!!set``, ``!!omap``,
    complex keys) hands the whole document to it. Aliases stay shared objects, as PyYAML's."""
    made: dict[int, Any] = {}
    scalar_node, mapping_node, sequence_node = yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode
    construct = loader.construct_object

    def build(node: Any) -> Any:
        kind = type(node)
        if kind is scalar_node:
            return node.value if node.tag == _STR else construct(node)
        found = made.get(id(node))
        if found is not None:
            return found
        if kind is mapping_node and node.tag == _MAP:
            mapping: dict[Any, Any] = {}
            made[id(node)] = mapping
            for key, value in node.value:
                if type(key) is not scalar_node or key.tag not in _PLAIN_KEYS:
                    raise _Unusual
                mapping[key.value if key.tag == _STR else construct(key)] = build(value)
            return mapping
        if kind is sequence_node and node.tag == _SEQ:
            items: list[Any] = []
            made[id(node)] = items
            for value in node.value:
                items.append(build(value))
            return items
        raise _Unusual

    try:
        return build(root)
    except _Unusual:
        loader.constructed_objects = {}
        return loader.construct_document(root)
    finally:
        loader.constructed_objects = {}


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
                yield loader.construct_document(node) if pure else _construct(loader, node)
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


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with the C parser when there is one: the same objects and the same
    YAMLError on bad input, for trusted text (configuration, templates) that needs no limits."""
    return yaml.load(text, Loader=_FastLoader if _CLoader is not None else yaml.SafeLoader)


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


#: Where PyYAML's emitter may fold a line or break one: a scalar without them cannot depend on its column.
_FOLDS = re.compile("[ \n\x85\u2028\u2029]")
_DEPENDS = ""  # memo mark: this scalar's rendering depends on its column (looked up with it)


class _Fallback(Exception):
    """Something the block writer leaves to PyYAML: anchors (an object reached twice), complex
    keys (empty, multi-line or long), dates and types beyond JSON's."""


class _ScalarEmitter(yaml.SafeDumper):
    """PyYAML's own emitter, resolver and representer, driven one scalar at a time in the state
    the whole-document emitter is in at that point, so each scalar comes out byte for byte."""

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        super().__init__(self._buffer, **DUMP_OPTIONS)
        self.tag_prefixes = dict(self.DEFAULT_TAG_PREFIXES)

    def render(self, tag: str, text: str, key: bool, column: int, indent: int) -> str:
        """``text`` as the emitter writes it for a simple key (``key``) or a value after ``:``/``-``,
        starting at ``column`` inside a collection indented by ``indent``."""
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        implicit = (self.resolve(yaml.ScalarNode, text, (True, False)) == tag,
                    self.resolve(yaml.ScalarNode, text, (False, True)) == tag)
        self.event = yaml.ScalarEvent(None, tag, implicit, text)
        self.events = []
        self.analysis = self.style = self.prepared_tag = self.prepared_anchor = None
        self.column, self.indent, self.indents, self.flow_level = column, indent, [], 0
        self.whitespace = self.indention = key  # a key follows an indent; a value follows ':' or '-'
        self.root_context = self.sequence_context = False
        self.mapping_context = self.simple_key_context = key
        if key and not self.check_simple_key():
            raise _Fallback
        self.process_anchor("&")
        self.process_tag()
        self.increase_indent(flow=True)
        self.process_scalar()
        self.event = None
        return buffer.getvalue()


class _BlockWriter:
    """PyYAML's bytes for a document of mappings, lists and scalars (our ``DUMP_OPTIONS``),
    written without its representer/serializer/emitter pipeline per node.

    The layout of block mappings and sequences is fixed (two-space indent, sequences in a
    mapping not indented, empty collections as ``{}``/``[]``); each scalar is rendered once by
    PyYAML's emitter and remembered, keyed by its text (and by its column and indent where
    line folding could make them matter), so a document costs about one lookup per node.
    """

    def __init__(self) -> None:
        self._emitter = _ScalarEmitter()
        self._lock = threading.Lock()  # the emitter holds state while it renders
        self._keys: dict[str, str] = {}  # str key -> its rendering and ":"
        self._values: dict[str, str] = {}  # str value -> rendering, where it cannot fold
        self._ints: dict[int, str] = {}  # int value -> rendering
        self._other: dict[tuple[Any, ...], str] = {}
        self._chars = 0

    def scalar(self, obj: Any, key: bool, column: int, indent: int) -> str:
        """``obj`` written as a simple key or as a value starting at ``column`` (see render)."""
        kind = type(obj)
        if kind is str:
            tag, text = _STR, obj
        elif kind is bool:
            tag, text = _BOOL, "true" if obj else "false"
        elif kind is int:
            tag, text = _INT, str(obj)
        elif obj is None:
            tag, text = _NULL, "null"
        elif kind is float:
            tag, text = _FLOAT, self._emitter.represent_float(obj).value
        else:
            raise _Fallback
        other = self._other
        found = other.get((tag, text, key))
        if found is not None and found is not _DEPENDS:
            return found
        if found is _DEPENDS:
            found = other.get((tag, text, key, column, indent))
            if found is not None:
                return found
        with self._lock:
            found = self._emitter.render(tag, text, key, column, indent)
        self._chars += len(text) + len(found)
        if self._chars > MEMO_CHARS or len(other) >= MEMO_ENTRIES:  # bounded whatever the input
            for memo in (self._keys, self._values, self._ints, other):
                memo.clear()
            self._chars = len(text) + len(found)
        # Keys never fold; a value cannot without a space or a line break, nor double-quoted.
        if key or (_FOLDS.search(text) is None and '"' not in found):
            other[(tag, text, key)] = found
            if kind is str and key:
                self._keys[text] = found + ":"
            elif kind is str:
                self._values[text] = found
            elif kind is int and not key:
                self._ints[obj] = found
        else:
            other[(tag, text, key)] = _DEPENDS
            other[(tag, text, key, column, indent)] = found
        return found

    def dump(self, obj: Any) -> str | None:
        """The document's text, or None when PyYAML has to write it (see _Fallback)."""
        kind = type(obj)
        if kind is not dict and kind is not list:
            return None
        out: list[str] = []
        append = out.append
        seen: set[int] = set()  # every dict and list: one reached twice gets an anchor from PyYAML
        keys, values, ints, scalar = self._keys, self._values, self._ints, self.scalar

        def enter(value: Any) -> bool:
            """Note a dict or list as written; False when empty (then written inline)."""
            if id(value) in seen:
                raise _Fallback  # PyYAML writes an anchor and an alias
            seen.add(id(value))
            return bool(value)

        def mapping(obj: dict[Any, Any], indent: int, lead: str) -> None:
            """Keys at ``indent``; ``lead`` goes before the first (a line break and the indent
            after a parent key, a space after ``-``); a list value keeps this indent."""
            nl = "\n" + " " * indent
            child = indent + 2
            for k, v in obj.items():
                append(lead)
                lead = nl
                text = keys.get(k) if type(k) is str else None
                if text is None:
                    text = scalar(k, True, indent, indent) + ":"
                append(text)
                kind = type(v)
                if kind is str:
                    found = values.get(v)
                    append(found if found is not None else scalar(v, False, indent + len(text), indent))
                elif kind is dict or kind is list:
                    if not enter(v):
                        append(" {}" if kind is dict else " []")
                    elif kind is dict:
                        mapping(v, child, "\n" + " " * child)
                    else:
                        sequence(v, indent, nl)
                elif kind is int:
                    found = ints.get(v)
                    append(found if found is not None else scalar(v, False, indent + len(text), indent))
                elif kind is bool:
                    append(" true" if v else " false")
                elif v is None:
                    append(" null")
                else:
                    append(scalar(v, False, indent + len(text), indent))

        def sequence(obj: list[Any], indent: int, lead: str) -> None:
            """Items at ``indent``, each ``-`` then its value (a collection one space after it)."""
            nl = "\n" + " " * indent
            child = indent + 2
            for v in obj:
                append(lead)
                lead = nl
                kind = type(v)
                if kind is str:
                    found = values.get(v)
                    append("-" + (found if found is not None else scalar(v, False, indent + 1, indent)))
                elif kind is dict or kind is list:
                    if enter(v):
                        append("-")
                        (mapping if kind is dict else sequence)(v, child, " ")
                    else:
                        append("- {}" if kind is dict else "- []")
                else:
                    append("-" + scalar(v, False, indent + 1, indent))

        try:
            if not obj:
                return "{}\n" if kind is dict else "[]\n"
            seen.add(id(obj))
            if kind is dict:
                mapping(obj, 0, "")
            else:
                sequence(obj, 0, "")
        except _Fallback:
            return None
        append("\n")
        return "".join(out)


_WRITER = _BlockWriter()


def dump(obj: Any, *, pure: bool = False) -> str:
    """One document in our house style (block style, keys in their order, UTF-8 kept).

    ``pure`` runs PyYAML's whole dumper (tests compare the two); both give the same text.
    """
    text = None if pure else _WRITER.dump(obj)
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
