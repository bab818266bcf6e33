"""Objects in, before injection: the input handling ``/dry-run`` and the CLI share, free of HTTP.

One policy for everyone: a body is JSON (an object or an array of objects) or YAML (one or more
documents); every document must be a Kubernetes object (a mapping with a string ``kind``); any
``*List`` kind with an ``items`` array (``List``, ``DeploymentList``, ``PodList``, ...) stands for
its items, each judged on its own. Parsing is bounded (``injector.yamlio``) and so is the number
of objects after expanding lists; each refusal names the limit and its value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from injector import yamlio
from injector.result import Decision, InjectionResult, Reason, ReasonCode
from injector.yamlio import MiB, YamlLimitError, YamlLimits, YamlSyntaxError


class DocumentError(ValueError):
    """The input cannot be used; ``limit`` names the exceeded limit, None for a malformed input."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class DocumentLimits:
    """Bounds on one input: its YAML (or JSON) and the objects it holds once lists are expanded."""

    yaml: YamlLimits = field(default_factory=YamlLimits)
    max_objects: int = 1000


#: The CLI reads files its user chose: generous bounds that still stop a runaway input, and
#: aliases allowed (kubectl accepts them) with their expanded size counted against max_nodes.
CLI_LIMITS = DocumentLimits(
    yaml=YamlLimits(max_bytes=1024 * MiB, max_depth=64, max_nodes=5_000_000, max_documents=1_000_000,
                    aliases=True),
    max_objects=1_000_000,
)


def input_format(head: bytes) -> str:
    """``json`` when the first non-blank byte opens a JSON object or array, else ``yaml``."""
    return "json" if head.lstrip()[:1] in (b"{", b"[") else "yaml"


def _limit(exc: YamlLimitError) -> DocumentError:
    return DocumentError(str(exc), exc.limit)


def _json_documents(data: bytes, source: str, limits: YamlLimits) -> list[Any]:
    if len(data) > limits.max_bytes:
        raise _limit(YamlLimitError(source, "max_bytes", limits.max_bytes,
                                    f"input larger than {limits.max_bytes} bytes"))
    try:
        doc = json.loads(data)
    except RecursionError:
        raise _limit(YamlLimitError(source, "max_depth", limits.max_depth,
                                    f"nesting deeper than {limits.max_depth} levels")) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DocumentError(f"{source}: not valid JSON: {exc}") from None
    docs = doc if isinstance(doc, list) else [doc]
    if len(docs) > limits.max_documents:
        raise _limit(YamlLimitError(source, "max_documents", limits.max_documents,
                                    f"more than {limits.max_documents} documents"))
    for one in docs:
        _check_json(one, source, limits)
    return docs


def _check_json(doc: Any, source: str, limits: YamlLimits) -> None:
    """The YAML limits on depth and node count, for a document JSON has already built."""
    count = 0
    stack = [(doc, 1)]
    while stack:
        current, depth = stack.pop()
        count += 1
        if count > limits.max_nodes:
            raise _limit(YamlLimitError(source, "max_nodes", limits.max_nodes,
                                        f"a document of more than {limits.max_nodes} nodes"))
        if depth > limits.max_depth:
            raise _limit(YamlLimitError(source, "max_depth", limits.max_depth,
                                        f"nesting deeper than {limits.max_depth} levels"))
        if isinstance(current, dict):
            count += len(current)  # the keys
            stack.extend((v, depth + 1) for v in current.values())
        elif isinstance(current, list):
            stack.extend((v, depth + 1) for v in current)


def parse(data: bytes | IO[bytes], fmt: str, *, source: str,
          limits: DocumentLimits = DocumentLimits()) -> Iterator[dict[str, Any]]:
    """The Kubernetes objects of a body or stream, in order; empty YAML documents are dropped.

    A YAML stream is read as it is parsed, so documents come out before the input ends; the
    errors (DocumentError) say which source and document.
    """
    if fmt == "json":
        body = data if isinstance(data, bytes) else data.read(limits.yaml.max_bytes + 1)
        docs: Iterable[Any] = _json_documents(body, source, limits.yaml)
    else:
        if isinstance(data, bytes) and not data.strip():
            raise DocumentError(f"{source} is empty: give a Pod, a workload or a List")
        docs = yamlio.load_all(data, source=source, limits=limits.yaml)
    count = 0
    try:
        for doc in docs:
            if doc is None:
                continue
            count += 1
            if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
                raise DocumentError(f"{source}: document {count} is not a Kubernetes object "
                                    "(a mapping with a kind)")
            yield doc
    except YamlLimitError as exc:
        raise _limit(exc) from None
    except YamlSyntaxError as exc:
        raise DocumentError(str(exc)) from None
    if count == 0:
        raise DocumentError(f"{source} holds no objects: give a Pod, a workload or a List")


def is_list(doc: Mapping[str, Any]) -> bool:
    """``List`` and every ``<Kind>List`` with an ``items`` array: a list of objects to judge one by one."""
    return doc.get("kind", "").endswith("List") and isinstance(doc.get("items"), list)


def list_items(doc: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
    items = doc["items"]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DocumentError(f"{source}: {doc['kind']} item {i + 1} is not an object")
    return items


class ObjectCounter:
    """Counts objects (list items one by one) against ``max_objects``."""

    def __init__(self, limits: DocumentLimits, source: str) -> None:
        self.limit = limits.max_objects
        self.source = source
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n
        if self.count > self.limit:
            raise DocumentError(f"{self.source}: more than {self.limit} objects "
                                f"(limit max_objects={self.limit})", "max_objects")


def expand(docs: Iterable[dict[str, Any]], *, source: str,
           limits: DocumentLimits = DocumentLimits()) -> Iterator[dict[str, Any]]:
    """Every object to judge: list documents become their items, others stay as they are."""
    counter = ObjectCounter(limits, source)
    for doc in docs:
        if is_list(doc):
            items = list_items(doc, source)
            counter.add(len(items))
            yield from items
        else:
            counter.add()
            yield doc


def parse_label_list(text: str | None) -> dict[str, str] | None:
    """``k=v,k2=v2`` -> dict; None when not given (so webhook selectors are not evaluated)."""
    if text is None:
        return None
    labels: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DocumentError(f"namespace label {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def config_for_revision(config: Any, revision: str | None) -> Any:
    """The running config, or the same config as the named revision's injector would run it
    (compiled once per revision, memoized by the compiled config itself)."""
    return config.for_revision(revision) if revision else config


# --- reporting ----------------------------------------------------------------------------------

#: Where a pod template sits in kinds the core does not inject (Argo Rollouts, OpenShift
#: DeploymentConfigs, Knative, ... put it at ``spec.template``), to say so instead of "no pod template".
_TEMPLATE_PATHS: tuple[tuple[str, ...], ...] = (
    ("spec", "template"), ("spec", "jobTemplate", "spec", "template"),
)


def template_path(obj: Mapping[str, Any]) -> str | None:
    """``spec.template`` (or the CronJob-like path) when ``obj`` holds a pod template there."""
    for path in _TEMPLATE_PATHS:
        node: Any = obj
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        spec = node.get("spec") if isinstance(node, dict) else None
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
            return ".".join(path)
    return None


def explained(result: InjectionResult, obj: Mapping[str, Any]) -> InjectionResult:
    """``result``, with an unsupported kind that does have a pod template reported as such."""
    if result.decision is not Decision.PASSTHROUGH or not result.reasons:
        return result
    if result.reasons[0].code is not ReasonCode.UNSUPPORTED_KIND:
        return result
    where = template_path(obj)
    if where is None:
        return result
    from injector.core import WORKLOAD_TEMPLATE_PATHS

    kinds = ", ".join(["Pod", *WORKLOAD_TEMPLATE_PATHS])
    message = (f"{result.kind} has a pod template at {where}, but is not a kind the injector handles "
               f"({kinds}); left unchanged")
    result.reasons[0] = Reason(ReasonCode.UNSUPPORTED_KIND, message)
    return result


def object_name(result: InjectionResult) -> str:
    """``Kind/name`` of a result's object, as the CLI and reports show it."""
    meta = result.mutated.get("metadata") if isinstance(result.mutated.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or "(unnamed)"
    return f"{result.kind}/{name}"


def result_entry(result: InjectionResult) -> dict[str, Any]:
    """One object's answer as ``/dry-run`` and ``check -o json`` give it."""
    meta = result.mutated.get("metadata") if isinstance(result.mutated.get("metadata"), Mapping) else {}
    return {
        "kind": result.kind,
        "name": meta.get("name") or meta.get("generateName") or "",
        "namespace": meta.get("namespace"),
        "decision": result.decision.value,
        "allowed": result.allowed,
        "reasons": [r.as_dict() for r in result.reasons],
        "warnings": [w.as_dict() for w in result.warnings],
        "patch": result.patch,
        "mutated": result.mutated,
    }
