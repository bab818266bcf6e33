"""Per pod of the kubeconfig's cluster: should it have the sidecar, has it, is it stale."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", default=None,
                        help="audit one namespace (default: all namespaces)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                        help="kubeconfig to use (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    parser.add_argument("--config-dir", default=None,
                        help="injector configuration directory to judge against (default: built-in defaults)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table",
                        help="output format (default: %(default)s)")


def _table(report: dict[str, Any]) -> str:
    header = ("NAMESPACE", "POD", "OWNER", "SHOULD", "INJECTED", "REVISION", "STALE", "RESTART", "REASON")
    rows = [header]
    for p in report["pods"]:
        reason = p["reasons"][0]["code"] if p["reasons"] else ""
        rows.append((
            p["namespace"], p["pod"], p["owner"] or "-", "yes" if p["shouldInject"] else "no",
            "yes" if p["injected"] else "no", p["revision"] or "-",
            {True: "yes", False: "no", None: "-"}[p["stale"]], "yes" if p["needsRestart"] else "no", reason,
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    s = report["summary"]
    lines.append("")
    lines.append(
        f"{s['pods']} pods: {s['injected']} injected, {s['missingSidecar']} missing the sidecar, "
        f"{s['unexpectedSidecar']} injected but not selected, {s['stale']} stale, "
        f"{s['needsRestart']} need a restart"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kubernetes import config as kube_config

    from injector.audit import run_audit
    from injector.config import ConfigError, load_config_dir
    from injector.configwatch import builtin_config
    from injector.core import inject

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
    try:
        report = run_audit(api, config, inject, args.namespace)
    except Exception as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"mesh-injector audit: API request failed: {reason}", file=sys.stderr)
        return 1
    if args.output == "json":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(report))
    return 0
