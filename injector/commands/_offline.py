"""What ``kube-inject`` and ``check`` share: read workloads, load config, run the core.

Input handling is ``injector.documents`` (the same as ``/dry-run``'s), so the CLI, ``/dry-run``
and ``/inject`` give the same decisions and reasons for the same input. Documents are read,
injected and handed on one at a time, so a long file costs one document of memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from injector import documents
from injector.commands._istio import IstioFileError, apply_istio_files
from injector.config import ConfigError, InjectorConfig, default_config, load_config_dir
from injector.documents import CLI_LIMITS, DocumentError, DocumentLimits
from injector.result import Decision, InjectionResult, Reason
from injector.yamlio import YamlLimits


class OfflineError(Exception):
    """Bad input or config: printed as one line on stderr, exit 2."""


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, metavar="FILE",
                        help="Pod or workload YAML/JSON (multi-document, any *List); '-' for stdin")
    parser.add_argument("--config-dir", default=None,
                        help="injector configuration directory (default: built-in defaults)")
    parser.add_argument("--namespace", default=None,
                        help="namespace to judge objects in when they do not name one")
    parser.add_argument("--namespace-labels", default=None, metavar="K=V,...",
                        help="labels of the namespace: also applies the webhook's namespace/object "
                             "selectors, as the API server would (default: not applied, like "
                             "istioctl kube-inject)")
    parser.add_argument("-r", "--revision", default=None, help="judge as this revision's injector")
    istio = parser.add_argument_group("Istio's files (as istioctl kube-inject takes them)")
    istio.add_argument("--injectConfigFile", dest="inject_config_file", metavar="FILE",
                       help="the istio-sidecar-injector ConfigMap's config: policy, selectors, "
                            "injectedAnnotations, templates (Go templates: see the README)")
    istio.add_argument("--meshConfigFile", dest="mesh_config_file", metavar="FILE",
                       help="the istio ConfigMap's mesh: trustDomain, defaultConfig")
    istio.add_argument("--valuesFile", dest="values_file", metavar="FILE",
                       help="the istio-sidecar-injector ConfigMap's values: global.hub/tag/proxy, ...")
    limits = parser.add_argument_group("input limits")
    default = CLI_LIMITS.yaml
    limits.add_argument("--max-bytes", type=int, default=default.max_bytes, metavar="N",
                        help="refuse an input larger than this (default: %(default)s)")
    limits.add_argument("--max-documents", type=int, default=default.max_documents, metavar="N",
                        help="refuse more YAML documents than this (default: %(default)s)")
    limits.add_argument("--max-objects", type=int, default=CLI_LIMITS.max_objects, metavar="N",
                        help="refuse more objects, list items counted one by one (default: %(default)s)")
    limits.add_argument("--max-nodes", type=int, default=default.max_nodes, metavar="N",
                        help="refuse a document of more YAML nodes, aliases expanded (default: %(default)s)")
    limits.add_argument("--max-depth", type=int, default=default.max_depth, metavar="N",
                        help="refuse a document nested deeper (default: %(default)s)")
    limits.add_argument("--no-aliases", action="store_true",
                        help="refuse YAML aliases (*name) instead of expanding them")


def limits_from(args: argparse.Namespace) -> DocumentLimits:
    return DocumentLimits(
        yaml=YamlLimits(max_bytes=args.max_bytes, max_depth=args.max_depth, max_nodes=args.max_nodes,
                        max_documents=args.max_documents, aliases=not args.no_aliases),
        max_objects=args.max_objects,
    )


def load_config(args: argparse.Namespace) -> InjectorConfig:
    """The config the objects are judged with, or OfflineError naming what is wrong."""
    try:
        # A --config-dir without any config file is refused by the loader (never "the defaults").
        config = load_config_dir(args.config_dir) if args.config_dir else default_config()
        config, notes = apply_istio_files(config, inject_config=args.inject_config_file,
                                          mesh_config=args.mesh_config_file, values=args.values_file)
        for note in notes:
            print(f"mesh-injector: note: {note}", file=sys.stderr)
        return documents.config_for_revision(config, args.revision)
    except IstioFileError as exc:
        raise OfflineError(str(exc)) from None
    except ConfigError as exc:
        raise OfflineError(f"configuration: {exc}") from None


@dataclass
class Input:
    """The objects of ``-f``, read as they are needed; errors surface as DocumentError."""

    stream: IO[bytes]
    fmt: str
    source: str
    limits: DocumentLimits

    def documents(self) -> Iterator[dict[str, Any]]:
        return documents.parse(self.stream, self.fmt, source=self.source, limits=self.limits)


def open_input(args: argparse.Namespace) -> Input:
    source = "stdin" if args.filename == "-" else args.filename
    try:
        stream: Any = sys.stdin.buffer if args.filename == "-" else open(args.filename, "rb")  # noqa: SIM115
    except OSError as exc:
        raise OfflineError(f"cannot read {args.filename}: {exc.strerror}") from None
    head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
    if not head:
        raise OfflineError(f"{source} is empty: give a Pod, a workload or a List")
    return Input(stream, documents.input_format(head), source, limits_from(args))


def namespace_labels(args: argparse.Namespace) -> dict[str, str] | None:
    try:
        return documents.parse_label_list(args.namespace_labels)
    except DocumentError as exc:
        raise OfflineError(str(exc)) from None


def inject_one(obj: dict[str, Any], config: InjectorConfig, labels: dict[str, str] | None,
               args: argparse.Namespace) -> InjectionResult:
    from injector.core import inject

    def judge(candidate: dict[str, Any]) -> InjectionResult:
        return inject(candidate, config=config, namespace_labels=labels, namespace=args.namespace)

    result = judge(obj)
    if result.decision is Decision.REJECT:
        result.reasons = _every_bad_annotation(obj, result, judge)
    return documents.explained(result, obj)


#: How many more bad annotations to look for after the first (each costs one more core call).
MAX_EXTRA_PROBLEMS = 16


def _every_bad_annotation(obj: dict[str, Any], result: InjectionResult,
                          judge: Callable[[dict[str, Any]], InjectionResult]) -> list[Reason]:
    """The core stops at the first bad annotation; judge again without each one it names to
    find the others, so the user fixes them all at once instead of one run per annotation."""
    from injector.core import WORKLOAD_TEMPLATE_PATHS

    path = (*WORKLOAD_TEMPLATE_PATHS.get(obj.get("kind", ""), ()), "metadata", "annotations")
    reasons = list(result.reasons)
    current = obj
    for _ in range(MAX_EXTRA_PROBLEMS):
        annotations = _at(current, path)
        named = [key for key in annotations if key in reasons[-1].message] if annotations else []
        if not named:
            break
        current = _without(current, path, max(named, key=len))
        again = judge(current)
        if again.decision is not Decision.REJECT or again.reasons[0] in reasons:
            break
        reasons.append(again.reasons[0])
    return reasons


def _at(obj: Any, path: tuple[str, ...]) -> dict[str, Any] | None:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) else None


def _without(obj: dict[str, Any], path: tuple[str, ...], key: str) -> dict[str, Any]:
    """A copy of ``obj`` (copied only along ``path``) without ``key`` in the mapping at ``path``."""
    if not path:
        return {k: v for k, v in obj.items() if k != key}
    return {**obj, path[0]: _without(obj[path[0]], path[1:], key)}
