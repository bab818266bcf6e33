"""Inject sidecars into workload YAML/JSON offline, like istioctl kube-inject (stdout: the result)."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from injector.commands._offline import (
    OfflineError,
    add_input_arguments,
    inject_documents,
    load,
    object_name,
    per_object,
)
from injector.result import Decision


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", choices=["yaml", "json"], default=None,
                        help="output format (default: the input's)")


def run(args: argparse.Namespace) -> int:
    """Injected objects on stdout in input order; skips and warnings on stderr; exit 1 on a rejection."""
    try:
        docs, fmt, config = load(args)
    except OfflineError as exc:
        print(f"mesh-injector kube-inject: {exc}", file=sys.stderr)
        return 2
    results = inject_documents(docs, config, args)
    rejected = False
    for result in results:
        for item in per_object(result):
            where = object_name(item)
            if item.decision is Decision.REJECT:
                rejected = True
                print(f"{where}: rejected ({item.reason.code}): {item.reason.message}", file=sys.stderr)
            elif item.decision is Decision.SKIP:
                print(f"{where}: not injected ({item.reason.code}): {item.reason.message}", file=sys.stderr)
            for warning in item.warnings:
                print(f"{where}: warning ({warning.code}): {warning.message}", file=sys.stderr)
    out = [r.mutated for r in results]
    if (args.output or fmt) == "json":
        body = out[0] if len(out) == 1 else {"apiVersion": "v1", "kind": "List", "items": out}
        sys.stdout.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False,
                                            allow_unicode=True))
    return 1 if rejected else 0
