"""What ``kube-inject`` and ``check`` share: read workloads, load config, run the core.

Parsing and per-object reporting are the dry-run endpoint's (``injector.dryrun``), so the CLI,
``/dry-run`` and ``/inject`` give the same decisions and reasons for the same input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from injector.config import ConfigError, InjectorConfig, default_config, load_config_dir
from injector.dryrun import DryRunError, config_for_revision, parse_documents, parse_label_list
from injector.result import InjectionResult


class OfflineError(Exception):
    """Bad input or config: printed as one line on stderr, exit 2."""


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, metavar="FILE",
                        help="Pod or workload YAML/JSON (multi-document and List allowed); '-' for stdin")
    parser.add_argument("--config-dir", default=None,
                        help="injector configuration directory (default: built-in defaults)")
    parser.add_argument("--namespace", default=None,
                        help="namespace to judge objects in when they do not name one")
    parser.add_argument("--namespace-labels", default=None, metavar="K=V,...",
                        help="labels of the namespace: also applies the webhook's namespace/object "
                             "selectors, as the API server would (default: not applied, like "
                             "istioctl kube-inject)")
    parser.add_argument("--revision", default=None, help="judge as this revision's injector")


def input_format(text: bytes) -> str:
    return "json" if text.lstrip()[:1] in (b"{", b"[") else "yaml"


def load(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str, InjectorConfig]:
    """The documents, their format and the config, or OfflineError with a one-line reason."""
    try:
        body = sys.stdin.buffer.read() if args.filename == "-" else Path(args.filename).read_bytes()
    except OSError as exc:
        raise OfflineError(f"cannot read {args.filename}: {exc.strerror}") from None
    fmt = input_format(body)
    try:
        docs = parse_documents(body, fmt)
        labels = parse_label_list(args.namespace_labels)
    except DryRunError as exc:
        raise OfflineError(str(exc)) from None
    args.parsed_labels = labels
    try:
        config = load_config_dir(args.config_dir) if args.config_dir else default_config()
    except ConfigError as exc:
        raise OfflineError(f"configuration: {exc}") from None
    return docs, fmt, config_for_revision(config, args.revision)


def inject_documents(docs: list[dict[str, Any]], config: InjectorConfig,
                     args: argparse.Namespace) -> list[InjectionResult]:
    from injector.core import inject

    return [inject(doc, config=config, namespace_labels=args.parsed_labels, namespace=args.namespace)
            for doc in docs]


def per_object(result: InjectionResult) -> list[InjectionResult]:
    """A List's per-item results, or the result itself."""
    return list(result.items) if result.items else [result]


def object_name(result: InjectionResult) -> str:
    meta = result.mutated.get("metadata") if isinstance(result.mutated.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or "(unnamed)"
    return f"{result.kind}/{name}"
