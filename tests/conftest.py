"""Shared test plumbing: capability gates that skip locally but fail under CI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.testbed.plugin"]  # fixtures control_plane, node (test-bed team)


def require(condition: bool, why: str) -> None:
    """Skip when a capability is missing; under CI (CI set) a missing capability is a failure."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this capability: {why}", pytrace=False)
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root for network namespaces and nftables")
    require(shutil.which("ip") is not None, "needs iproute2's ip")
