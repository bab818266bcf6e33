"""What the images promise about their contents, checked without a Docker engine.

Dockerfile.cni installs only the `cni` package and pyroute2 (`pip install --no-deps . pyroute2`,
then deletes `injector`): every `mesh-cni` subcommand must work with nothing else importable.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

#: What the CNI image does not have.
ABSENT = ("injector", "fastapi", "pydantic", "kubernetes", "yaml", "cryptography", "uvicorn", "jsonpatch")
BLOCKER = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the CNI image)")
        return None
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.parametrize("module", ["cni.cli", "cni.install", "cni.validate", "cni.redirect", "cni.plugin"])
def test_cni_image_needs_only_cni_and_pyroute2(module: str) -> None:
    code = BLOCKER + f"import {module}\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr


def test_cni_subcommands_start_in_the_image_layout() -> None:
    code = (
        BLOCKER
        + "import sys; from cni.cli import main; sys.argv = ['mesh-cni', 'install', '--help']; main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0 and "--cni-bin-dir" in done.stdout, done.stdout + done.stderr


def test_the_pinned_pyroute2_is_the_one_the_project_allows() -> None:
    pinned = re.search(r"pyroute2==([\d.]+)", (REPO / "Dockerfile.cni").read_text())
    assert pinned, "Dockerfile.cni pins pyroute2"
    allowed = re.search(r'"pyroute2>=([\d.]+),<([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert allowed
    version = tuple(int(p) for p in pinned.group(1).split("."))
    low = tuple(int(p) for p in allowed.group(1).split("."))
    high = tuple(int(p) for p in allowed.group(2).split("."))
    assert low <= version < high
