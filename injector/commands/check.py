"""Show, per object, whether it would be injected and why (a table of decisions and reason codes)."""

from __future__ import annotations

import argparse
import json
import sys

from injector import documents
from injector.commands._offline import (
    OfflineError,
    add_input_arguments,
    inject_one,
    load_config,
    namespace_labels,
    open_input,
)
from injector.documents import DocumentError
from injector.result import Decision, InjectionResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table",
                        help="table, or JSON with reasons, warnings and patch (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when nothing is rejected, 1 when some object would be refused admission, 2 on bad input."""
    try:
        config = load_config(args)
        labels = namespace_labels(args)
        source = open_input(args)
        objects = documents.expand(source.documents(), source=source.source, limits=source.limits)
        # Only the report is kept per object, never the injected object itself.
        items: list[InjectionResult] = []
        for obj in objects:
            item = inject_one(obj, config, labels, args)
            item.mutated = {"metadata": item.mutated.get("metadata")}
            items.append(item)
    except (OfflineError, DocumentError) as exc:
        print(f"mesh-injector check: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        entries = [{k: v for k, v in documents.result_entry(i).items() if k != "mutated"} for i in items]
        sys.stdout.write(json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
    else:
        rows = [("OBJECT", "DECISION", "REASON", "MESSAGE")]
        for item in items:
            shown = item.reasons if item.decision is Decision.REJECT else item.reasons[:1]
            name, decision = documents.object_name(item), item.decision.value
            for n, reason in enumerate(shown):
                rows.append((name if n == 0 else "", decision if n == 0 else "", reason.code.value,
                             reason.message))
            rows += [("", "warning", w.code.value, w.message) for w in item.warnings]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 1 if any(i.decision is Decision.REJECT for i in items) else 0
