"""Print the version of mesh-injector (and, without --short, of what it runs on)."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata


def package_version(name: str = "mesh-injector") -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true", help="print the version number only")


def run(args: argparse.Namespace) -> int:
    """``mesh-injector 0.1.0`` plus Python and YAML backend, or just ``0.1.0`` with --short."""
    version = package_version()
    if args.short:
        print(version)
        return 0
    from injector import yamlio

    backend = "libyaml" if yamlio.c_available() else "pure Python"
    print(f"mesh-injector {version} (Python {platform.python_version()}, "
          f"PyYAML {package_version('PyYAML')} with {backend})")
    return 0
