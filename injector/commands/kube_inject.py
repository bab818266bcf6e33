"""Inject sidecars into workload YAML/JSON offline, like istioctl kube-inject (stdout: the result)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

from injector import documents, yamlio
from injector.commands._offline import (
    OfflineError,
    add_input_arguments,
    inject_one,
    load_config,
    namespace_labels,
    open_input,
)
from injector.documents import DocumentError, ObjectCounter
from injector.result import Decision, InjectionResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="write the injected objects to FILE, as istioctl does (default: stdout)")
    parser.add_argument("--output-format", choices=["yaml", "json"], default=None,
                        help="yaml or json (default: the input's)")


_LIST_HEAD = '{\n  "apiVersion": "v1",\n  "kind": "List",\n  "items": [\n'


class JsonWriter:
    """What ``json.dumps(..., indent=2)`` gives for one object, or for a ``List`` of several,
    written item by item: the first object is held until a second shows which of the two it is."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.first: dict[str, Any] | None = None
        self.count = 0

    @staticmethod
    def _item(obj: Any) -> str:
        return "\n".join("    " + line for line in json.dumps(obj, indent=2, ensure_ascii=False).split("\n"))

    def write(self, obj: dict[str, Any]) -> None:
        self.count += 1
        if self.count == 1:
            self.first = obj
            return
        if self.count == 2:
            self.out.write(_LIST_HEAD + self._item(self.first))
            self.first = None
        self.out.write(",\n" + self._item(obj))

    def close(self) -> None:
        if self.count == 1:
            self.out.write(json.dumps(self.first, indent=2, ensure_ascii=False) + "\n")
        elif self.count > 1:
            self.out.write("\n  ]\n}\n")


class YamlWriter:
    """``yamlio.dump_all`` of the objects, each written as soon as it is known."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.count = 0

    def write(self, obj: dict[str, Any]) -> None:
        self.out.write(("---\n" if obj else "--- ") + yamlio.dump(obj) if self.count else yamlio.dump(obj))
        self.count += 1

    def close(self) -> None:
        self.out.flush()


def report(result: InjectionResult, err: IO[str]) -> None:
    """Skips, rejections (every reason the core gives) and warnings of one object, one line each."""
    where = documents.object_name(result)
    if result.decision is Decision.REJECT:
        for reason in result.reasons:
            print(f"{where}: rejected ({reason.code}): {reason.message}; left out of the output", file=err)
    elif result.decision is Decision.SKIP:
        print(f"{where}: not injected ({result.reason.code}): {result.reason.message}", file=err)
    for warning in result.warnings:
        print(f"{where}: warning ({warning.code}): {warning.message}", file=err)


def run(args: argparse.Namespace) -> int:
    """Injected objects in input order, each written once injected; refused objects are left out
    (exit 1); skips and warnings on stderr; bad input or config exit 2."""
    try:
        config = load_config(args)
        labels = namespace_labels(args)
        source = open_input(args)
    except OfflineError as exc:
        print(f"mesh-injector kube-inject: {exc}", file=sys.stderr)
        return 2
    out: IO[str] = sys.stdout
    if args.output and args.output != "-":
        if args.output in ("yaml", "json"):
            print(f"mesh-injector kube-inject: writing to the file {args.output!r}: -o names the output "
                  "file, as in istioctl; the format is --output-format", file=sys.stderr)
        try:
            out = open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            print(f"mesh-injector kube-inject: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 2
    writer = JsonWriter(out) if (args.output_format or source.fmt) == "json" else YamlWriter(out)
    counter = ObjectCounter(source.limits, source.source)
    rejected = False
    try:
        try:
            for doc in source.documents():
                if documents.is_list(doc):
                    items = documents.list_items(doc, source.source)
                    counter.add(len(items))
                    results = [inject_one(item, config, labels, args) for item in items]
                else:
                    counter.add()
                    results = [inject_one(doc, config, labels, args)]
                for result in results:
                    report(result, sys.stderr)
                refused = [r.decision is Decision.REJECT for r in results]
                rejected = rejected or any(refused)
                if all(refused):
                    continue
                writer.write(_output(doc, results, refused) if documents.is_list(doc) else results[0].mutated)
        finally:
            writer.close()
    except DocumentError as exc:
        print(f"mesh-injector kube-inject: {exc}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if rejected else 0


def _output(doc: dict[str, Any], results: list[InjectionResult], refused: list[bool]) -> dict[str, Any]:
    """A list document as written: its items injected, refused ones left out (the core's List shape)."""
    if not any(refused) and not any(r.decision is Decision.INJECT for r in results):
        return dict(doc)
    return {**doc, "items": [r.mutated for r, no in zip(results, refused, strict=True) if not no]}
