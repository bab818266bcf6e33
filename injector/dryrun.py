"""``POST /dry-run``: what the webhook would do to a Pod or workload, without a cluster.

The body is a Pod, a workload with a pod template, a ``List``, or several of them (multi-document
YAML, or a JSON array). Each object goes through the same core call as ``/inject``; the answer
lists per object the decision, reasons, warnings, the JSON Patch and the mutated object, in the
input's format (YAML in, YAML out; JSON in, JSON out; ``?output=`` overrides).

Query parameters: ``namespace``, ``namespaceLabels`` (``k=v,k2=v2``: also applies the webhook's
namespace/object selectors, as the API server would), ``revision``, ``output`` (json|yaml).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from injector.result import InjectionResult

JSON_MEDIA = "application/json"
YAML_MEDIA = "application/yaml"
_YAML_INPUT = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


class DryRunError(ValueError):
    """The request cannot be answered; ``status`` is the HTTP code (400 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
            raise DryRunError(f"namespaceLabels item {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_documents(body: bytes, fmt: str) -> list[dict[str, Any]]:
    """The objects in a JSON or (multi-document) YAML body; Lists stay whole for the core."""
    if not body.strip():
        raise DryRunError("empty request body: send a Pod, a workload or a List")
    try:
        if fmt == "json":
            doc = json.loads(body)
            docs = doc if isinstance(doc, list) else [doc]
        else:
            docs = [d for d in yaml.safe_load_all(body.decode("utf-8")) if d is not None]
    except (ValueError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise DryRunError(f"cannot decode the {fmt.upper()} body: {exc}") from None
    if not docs:
        raise DryRunError("the body holds no objects")
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
            raise DryRunError(f"document {i + 1} is not a Kubernetes object (a mapping with a kind)")
    return docs


_REVISION_CONFIGS: dict[tuple[str, str], Any] = {}


def config_for_revision(config: Any, revision: str | None) -> Any:
    """The running config, or the same config as the named revision's injector would run it."""
    if not revision or revision == getattr(config, "revision", revision):
        return config
    key = (str(config.config_hash), revision)
    cached = _REVISION_CONFIGS.get(key)
    if cached is None:
        from injector.config import compile_config

        data = config.model.model_dump(by_alias=True)
        data.setdefault("values", {}).setdefault("mesh", {})["revision"] = revision
        cached = compile_config(data)
        if len(_REVISION_CONFIGS) > 32:
            _REVISION_CONFIGS.clear()
        _REVISION_CONFIGS[key] = cached
    return cached


def result_entry(result: InjectionResult) -> dict[str, Any]:
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


def run_dry_run(
    docs: Sequence[dict[str, Any]],
    *,
    config: Any,
    namespace: str | None,
    namespace_labels: Mapping[str, str] | None,
) -> list[dict[str, Any]]:
    from injector.core import inject

    return [
        result_entry(inject(obj, config=config, namespace_labels=namespace_labels, namespace=namespace))
        for obj in expand_lists(docs)
    ]


def expand_lists(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kind: List`` (and ``*List``) documents become their items: one answer per object."""
    out: list[dict[str, Any]] = []
    for doc in docs:
        items = doc.get("items")
        if doc.get("kind", "").endswith("List") and isinstance(items, list):
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise DryRunError(f"{doc['kind']} item {i + 1} is not an object")
                out.append(item)
        else:
            out.append(doc)
    return out


def render(body: Any, fmt: str) -> tuple[bytes, str]:
    if fmt == "json":
        return json.dumps(body, ensure_ascii=False, indent=2).encode() + b"\n", JSON_MEDIA
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return text.encode(), YAML_MEDIA


def input_format(content_type: str) -> str:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == JSON_MEDIA:
        return "json"
    if media in _YAML_INPUT:
        return "yaml"
    raise DryRunError(f"unsupported Content-Type {media or '(none)'!r}: send application/json or "
                      "application/yaml", 415)
