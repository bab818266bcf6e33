"""Per pod of the kubeconfig's cluster: should it have the sidecar, has it, which revision, is it stale.

The report streams: rows are printed page by page as the API server returns them (memory stays
at two pages whatever the cluster size), the summary comes last. ``--restart`` then rolls the
Deployments, StatefulSets and DaemonSets whose pods need it, as ``kubectl rollout restart``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

TABLE_HEADER = ("NAMESPACE", "POD", "OWNER", "SHOULD", "INJECTED", "REVISION", "WANTED", "STALE", "RESTART",
                "REASON")


def _page_size(text: str) -> int:
    from injector.audit import check_page_size

    try:
        return check_page_size(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from injector.audit import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

    parser.add_argument("-n", "--namespace", default=None,
                        help="audit one namespace (default: all namespaces)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                        help="kubeconfig to use (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    parser.add_argument("--config-dir", default=None,
                        help="injector configuration directory to judge against (default: built-in defaults)")
    parser.add_argument("-o", "--output", choices=["table", "json", "jsonl"], default="table",
                        help="table (rows stream, summary last), json (one document, streamed) or "
                             "jsonl (one line per pod, then a summary line) (default: %(default)s)")
    parser.add_argument("--page-size", type=_page_size, default=DEFAULT_PAGE_SIZE, metavar="N",
                        help=f"pods per LIST request, 1..{MAX_PAGE_SIZE} (default: %(default)s)")
    parser.add_argument("--restart", action="store_true",
                        help="after the audit, rolling-restart the Deployments/StatefulSets/DaemonSets "
                             "whose pods need it (missing or unexpected sidecar, old revision or config)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --restart: send the restart patches as server-side dry runs "
                             "(validated and authorised, nothing changes)")


def table_rows(pages: Iterator[list[Any]], out: IO[str]) -> None:
    """Print rows page by page; column widths are taken from the first page (and only grow)."""
    widths = [len(h) for h in TABLE_HEADER]
    printed_header = False
    for rows in pages:
        cells = [_cells(r) for r in rows]
        for row in cells:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        if not printed_header:
            out.write(_line(TABLE_HEADER, widths))
            printed_header = True
        out.write("".join(_line(row, widths) for row in cells))
        out.flush()
    if not printed_header:
        out.write(_line(TABLE_HEADER, widths))


def _line(cells: tuple[str, ...] | list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n"


def _cells(row: Any) -> list[str]:
    yes = {True: "yes", False: "no", None: "-"}
    return [row.namespace, row.pod, row.owner or "-", yes[row.should_inject], yes[row.injected],
            row.revision or "-", row.wanted_revision or "-", yes[row.stale], yes[row.needs_restart],
            row.reasons[0]["code"] if row.reasons else ""]


def summary_line(s: Any) -> str:
    revisions = ", ".join(f"{rev}: {n}" for rev, n in sorted(s.revisions.items())) or "none"
    line = (f"{s.pods} pods: {s.injected} injected, {s.missing_sidecar} missing the sidecar, "
            f"{s.unexpected_sidecar} injected but not selected, {s.stale} stale, "
            f"{s.needs_restart} need a restart (injected revisions: {revisions})")
    if s.restarts:
        line += f"; the list expired and was restarted {s.restarts} time(s)"
    return line


def run(args: argparse.Namespace) -> int:
    from kubernetes import config as kube_config

    from injector.audit import AuditError, ClusterReader, Report, render_chunks
    from injector.config import ConfigError, load_config_dir
    from injector.configwatch import builtin_config

    if args.dry_run and not args.restart:
        print("mesh-injector audit: --dry-run only applies to --restart", file=sys.stderr)
        return 2
    try:
        config = load_config_dir(args.config_dir) if args.config_dir else builtin_config()
    except ConfigError as exc:
        print(f"mesh-injector audit: {exc}", file=sys.stderr)
        return 2
    try:
        api = kube_config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
    except Exception as exc:
        print(f"mesh-injector audit: cannot use the kubeconfig: {exc}", file=sys.stderr)
        return 2
    reader = ClusterReader(api, args.namespace, page_size=args.page_size)
    try:
        reader.start()
    except AuditError as exc:
        print(f"mesh-injector audit: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"mesh-injector audit: API request failed: {reason}", file=sys.stderr)
        return 1
    report = Report(reader, config)
    out = sys.stdout
    if args.output == "table":
        table_rows(report.pages(), out)
        out.write("\n" + summary_line(report.summary) + "\n")
    else:
        for chunk in render_chunks(report, args.output):
            out.write(chunk.decode())
            out.flush()
    summary = report.summary
    if summary.error:
        print(f"mesh-injector audit: the report is incomplete: {summary.error}", file=sys.stderr)
        return 1
    if args.restart:
        return restart(api, summary, dry_run=args.dry_run, out=out if args.output == "table" else sys.stderr)
    return 0


def restart(api: Any, summary: Any, *, dry_run: bool, out: IO[str]) -> int:
    from injector.audit import MAX_RESTART_TARGETS, restart_workloads

    note = " (server-side dry run: nothing changes)" if dry_run else ""
    if not summary.workloads:
        out.write(f"\nnothing to restart{note}\n")
    else:
        out.write(f"\nrestarting {len(summary.workloads)} workload(s){note}:\n")
    failed = 0
    for target, error in restart_workloads(api, sorted(summary.workloads), dry_run=dry_run):
        namespace, kind, name = target
        pods = summary.workloads[target]
        if error:
            failed += 1
            out.write(f"  {kind.lower()}/{name} -n {namespace}: FAILED: {error}\n")
        else:
            verb = "would restart" if dry_run else "restarted"
            out.write(f"  {kind.lower()}/{name} -n {namespace}: {verb} ({pods} pod(s) need it)\n")
    if summary.unrestartable:
        out.write(f"  {summary.unrestartable} pod(s) need a restart but have no Deployment, StatefulSet or "
                  "DaemonSet: delete and re-create them yourself\n")
    if summary.targets_dropped:
        out.write(f"  {summary.targets_dropped} pod(s) of further workloads were not restarted: more than "
                  f"{MAX_RESTART_TARGETS} workloads (the restart limit); run again afterwards\n")
    out.flush()
    return 1 if failed else 0
