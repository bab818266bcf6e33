"""``mesh-cni``: the CNI plugin when CNI_COMMAND is set, else a small subcommand dispatcher.

Plugin mode is the hot path (a fresh process per pod start): nothing is imported before we know
which mode we are in, and subcommand modules are imported only when chosen.
"""

from __future__ import annotations

import sys

#: subcommand -> (module, function taking argv and returning the exit code, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "validate": ("cni.validate", "main", "prove by real traffic that this pod's redirect is in place"),
    "redirect": ("cni.redirect", "main", "program the redirect from an init container (NET_ADMIN)"),
    "agent": ("cni.agent", "main", "run the resident node agent that serves plugin calls warm"),
    "install": ("cni.install", "main", "install the plugin and chain it into the node's CNI config"),
    "uninstall": ("cni.install", "uninstall_main", "remove the plugin and its conflist entry"),
    "version": ("cni.cli", "version_main", "print the version and the CNI spec versions supported"),
}


def _usage() -> str:
    lines = ["usage: mesh-cni <command> [options]   (CNI plugin mode when CNI_COMMAND is set)", "",
             "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "`mesh-cni <command> --help` lists the command's options with their defaults."]
    return "\n".join(lines) + "\n"


def argument_parser(prog: str, doc: str | None):  # type: ignore[no-untyped-def]
    """A subcommand's parser: the module docstring's first line as plain text (no reST markup)
    and every option's default shown in --help."""
    import argparse

    summary = (doc or "").strip().splitlines()[0] if doc else ""
    summary = summary.replace("``", "")
    if summary.startswith(prog + ":"):
        summary = summary[len(prog) + 1:].strip()
    summary = summary[:1].upper() + summary[1:]
    return argparse.ArgumentParser(prog=prog, description=summary,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def plugin_mode() -> int:
    """Stdin config in, result or error JSON out. Asks the node agent first when one is configured
    (importing only what forwarding needs: not even ``os``, ~2 ms), else runs the plugin here."""
    from posix import environ  # bytes -> bytes; already loaded by the interpreter

    from cni.spec import MAX_STDIN_BYTES

    stdin = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)  # one byte over: parse_request names the limit
    outcome = None
    if environ.get(b"CNI_COMMAND") != b"VERSION" and b'"agentSocket"' in stdin:
        from cni.agent import forward

        cni_env = {k.decode(): v.decode() for k, v in environ.items() if k.startswith(b"CNI_")}
        outcome = forward(cni_env, stdin)
    if outcome is None:
        import os

        from cni.plugin import run

        outcome = run(os.environ, stdin)
    code, out = outcome
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    from posix import environ

    if b"CNI_COMMAND" in environ:
        return plugin_mode()
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0 if args else 2
    entry = SUBCOMMANDS.get(args[0])
    if entry is None:
        sys.stderr.write(f"mesh-cni: unknown command {args[0]!r}\n" + _usage())
        return 2
    import importlib

    module_name, function, _ = entry
    return int(getattr(importlib.import_module(module_name), function)(args[1:]) or 0)


def version_main(argv: list[str]) -> int:
    """``mesh-cni version``: the package version and the CNI spec versions the plugin speaks."""
    import argparse
    from importlib import metadata

    from cni.spec import SUPPORTED_VERSIONS

    parser = argparse.ArgumentParser(
        prog="mesh-cni version",
        description="The package version and the CNI spec versions the plugin speaks.",
    )
    parser.add_argument("--short", action="store_true", help="the version number only (default: off)")
    args = parser.parse_args(argv)
    try:
        version = metadata.version("mesh-injector")
    except metadata.PackageNotFoundError:
        version = "unknown"
    if args.short:
        sys.stdout.write(version + "\n")
    else:
        sys.stdout.write(f"mesh-cni {version} (CNI spec {', '.join(SUPPORTED_VERSIONS)})\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
