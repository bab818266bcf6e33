"""``POST /dry-run``: what the webhook would do to a Pod or workload, without a cluster.

The body is a Pod, a workload with a pod template, any ``*List`` of them, or several (multi-
document YAML, or a JSON array); ``injector.documents`` reads it. Each object goes through the
same core call as ``/inject``; the answer lists per object the decision, reasons, warnings, the
JSON Patch and the mutated object, in the input's format (YAML in, YAML out; JSON in, JSON out;
``?output=`` overrides).

Query parameters: ``namespace``, ``namespaceLabels`` (``k=v,k2=v2``: also applies the webhook's
namespace/object selectors, as the API server would), ``revision``, ``output`` (json|yaml).

``respond`` is the whole endpoint as a pure function (bytes and parameters in, status and bytes
out) with its own limits (``DryRunLimits``): the server decides where it runs and who may call it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from injector import documents, yamlio
from injector.documents import DocumentError, DocumentLimits
from injector.yamlio import MiB, YamlLimits

JSON_MEDIA = "application/json"
YAML_MEDIA = "application/yaml"
_YAML_INPUT = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
SOURCE = "the request body"


@dataclass(frozen=True)
class DryRunLimits:
    """Bounds on one ``/dry-run`` request, far below the CLI's: anyone who reaches the port can send one.

    A 10,000-pod List or 10,000 documents is refused while parsing, before anything is built.
    """

    documents: DocumentLimits = field(default_factory=lambda: DocumentLimits(
        yaml=YamlLimits(max_bytes=2 * MiB, max_depth=64, max_nodes=50_000, max_documents=200, aliases=False),
        max_objects=200,
    ))
    max_seconds: float = 5.0  # wall time for the injections, checked between objects


DEFAULT_LIMITS = DryRunLimits()


class DryRunError(ValueError):
    """The request cannot be answered; ``status`` is the HTTP code, ``limit`` the limit it exceeded."""

    def __init__(self, message: str, status: int = 400, limit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.limit = limit


def input_format(content_type: str) -> str:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == JSON_MEDIA:
        return "json"
    if media in _YAML_INPUT:
        return "yaml"
    raise DryRunError(f"unsupported Content-Type {media or '(none)'!r}: send application/json or "
                      "application/yaml", 415)


_TOO_BIG = ("max_bytes", "max_documents", "max_objects", "max_nodes", "max_depth")


def _status(exc: DocumentError) -> int:
    """413 for what is too big (bytes, documents, objects, nodes, depth), 400 for the rest."""
    return 413 if exc.limit in _TOO_BIG else 400


def evaluate(body: bytes, content_type: str, config: Any, *, params: Mapping[str, str] | None = None,
             limits: DryRunLimits = DEFAULT_LIMITS) -> tuple[int, dict[str, Any], str]:
    """(status, answer, output format): the endpoint's behaviour; errors are 4xx, never raised."""
    params = params or {}
    try:
        fmt = input_format(content_type)
        out_fmt = params.get("output") if params.get("output") in ("json", "yaml") else fmt
        entries = _run(body, fmt, config, params, limits)
    except DryRunError as exc:
        return exc.status, _error(str(exc), exc.limit), "json"
    except DocumentError as exc:
        return _status(exc), _error(str(exc), exc.limit), "json"
    except Exception as exc:  # the core failed on this input: report it as the input's problem
        return 400, _error(f"cannot process the objects: {type(exc).__name__}: {exc}", None), "json"
    return 200, {"configHash": config.config_hash, "results": entries}, out_fmt


def _error(message: str, limit: str | None) -> dict[str, Any]:
    return {"error": message, **({"limit": limit} if limit else {})}


def _run(body: bytes, fmt: str, config: Any, params: Mapping[str, str],
         limits: DryRunLimits) -> list[dict[str, Any]]:
    from injector.core import inject

    started = time.monotonic()
    if not body.strip():
        raise DryRunError("empty request body: send a Pod, a workload or a List")
    labels = documents.parse_label_list(params.get("namespaceLabels"))
    config = documents.config_for_revision(config, params.get("revision"))
    namespace = params.get("namespace")
    # Parse everything first: a body over a limit is refused before any injection runs.
    objects = list(documents.expand(documents.parse(body, fmt, source=SOURCE, limits=limits.documents),
                                    source=SOURCE, limits=limits.documents))
    entries = []
    for obj in objects:
        if time.monotonic() - started > limits.max_seconds:
            raise DryRunError(f"{SOURCE}: injecting took longer than {limits.max_seconds:g} s "
                              f"(limit max_seconds={limits.max_seconds:g})", 413, "max_seconds")
        result = inject(obj, config=config, namespace_labels=labels, namespace=namespace)
        entries.append(documents.result_entry(documents.explained(result, obj)))
    return entries


def render(body: Any, fmt: str) -> tuple[bytes, str]:
    if fmt == "json":
        return json.dumps(body, ensure_ascii=False, indent=2).encode() + b"\n", JSON_MEDIA
    return yamlio.dump(body).encode(), YAML_MEDIA


def respond(body: bytes, content_type: str, config: Any, *, params: Mapping[str, str] | None = None,
            limits: DryRunLimits = DEFAULT_LIMITS) -> tuple[int, bytes, str]:
    """(status, payload, media type): ``evaluate`` rendered, for any worker to run."""
    status, answer, fmt = evaluate(body, content_type, config, params=params, limits=limits)
    payload, media = render(answer, fmt)
    return status, payload, media
