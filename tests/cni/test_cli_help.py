"""`mesh-cni --help` and every subcommand's: plain text, each option's default shown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cni.cli import SUBCOMMANDS
from tests.cni.cnitest import REPO

#: Options without a meaningful default (flags and --help) are exempt from "(default: ...)".
NO_DEFAULT = ("-h, --help", "--quiet", "--capture-dns", "--dry-run", "--once", "--keep-on-exit",
              "--no-remove-taint")


def _help(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cni.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=30, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_top_level_help_lists_every_command() -> None:
    text = _help("--help")
    assert all(name in text for name in SUBCOMMANDS) and "--help" in text


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help_shows_defaults_and_no_rest_markup(command: str) -> None:
    text = _help(command, "--help")
    assert "``" not in text and ":func:" not in text
    options: list[str] = []  # one entry per option, its wrapped help lines joined
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            options.append(line.strip())
        elif options and line.startswith("   "):
            options[-1] += " " + line.strip()
    assert options
    for line in options:
        if not line.startswith(NO_DEFAULT):
            assert "(default:" in line, f"{command}: {line}"
