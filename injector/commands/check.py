"""Show, per object, whether it would be injected and why (a table of decisions and reason codes)."""

from __future__ import annotations

import argparse
import json
import sys

from injector.commands._offline import (
    OfflineError,
    add_input_arguments,
    inject_documents,
    load,
    object_name,
    per_object,
)
from injector.dryrun import result_entry
from injector.result import Decision


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table",
                        help="table, or JSON with reasons, warnings and patch (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when nothing is rejected, 1 when some object would be refused admission."""
    try:
        docs, _, config = load(args)
    except OfflineError as exc:
        print(f"mesh-injector check: {exc}", file=sys.stderr)
        return 2
    items = [item for result in inject_documents(docs, config, args) for item in per_object(result)]
    if args.output == "json":
        entries = [{k: v for k, v in result_entry(i).items() if k != "mutated"} for i in items]
        sys.stdout.write(json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
    else:
        rows = [("OBJECT", "DECISION", "REASON", "MESSAGE")]
        for item in items:
            rows.append((object_name(item), item.decision.value, item.reason.code.value, item.reason.message))
            rows += [("", "warning", w.code.value, w.message) for w in item.warnings]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 1 if any(i.decision is Decision.REJECT for i in items) else 0
