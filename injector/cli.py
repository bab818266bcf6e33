"""``mesh-injector``: a small dispatcher over the subcommand modules in ``injector.commands``.

Each module there is one subcommand (module ``kube_inject`` -> ``kube-inject``) exposing
``add_arguments(parser)``, ``run(args) -> int`` and a one-line docstring used as its help. Modules
are discovered by name and imported only when chosen, so ``--help`` and a short command stay quick.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType

import injector.commands


def _command_names() -> list[str]:
    return sorted(
        info.name.replace("_", "-")
        for info in pkgutil.iter_modules(injector.commands.__path__)
        if not info.name.startswith("_")
    )


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"injector.commands.{name.replace('-', '_')}")


def _summary(module: ModuleType) -> str:
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the chosen subcommand's module is imported (all of them for --help)."""
    parser = argparse.ArgumentParser(
        prog="mesh-injector",
        description="Istio-compatible sidecar injection: webhook server, offline injection, audit.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_names():
        if chosen is not None and name != chosen:
            subparsers.add_parser(name, add_help=False)
            continue
        module = _load(name)
        summary = _summary(module)
        sub = subparsers.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    names = _command_names()
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in names else None)
    args = parser.parse_args(args_list)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(run(args) or 0)
    except BrokenPipeError:
        # The reader went away (`kube-inject ... | head`): stop quietly, as other CLIs do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
