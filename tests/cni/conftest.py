"""Fixtures for the CNI plugin tests: root, real netns, reference plugins via libcni."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cni.cnitest import DRIVER, REFERENCE_PLUGIN_DIR, CniBed, nft_ruleset
from tests.conftest import require, require_root


def require_bed() -> None:
    require_root()
    require(shutil.which("nft") is not None, "needs nft (apt nftables) to inspect rulesets")
    require((REFERENCE_PLUGIN_DIR / "bridge").exists(), "needs Debian's containernetworking-plugins")
    require(DRIVER.exists(), f"needs the libcni driver at {DRIVER} (scripts/setup.d/20-libcni.sh)")


@pytest.fixture(scope="package", autouse=True)
def host_ruleset_untouched() -> Iterator[None]:
    """The host's own nftables ruleset is identical before and after the whole CNI suite."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        yield
        return
    before = nft_ruleset()
    yield
    assert nft_ruleset() == before, "the CNI suite changed the host's nftables ruleset"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniBed]:
    require_bed()
    bed = CniBed(Path(tmp_path_factory.mktemp("cni")))
    bed.conflist("meshnet")
    yield bed
    bed.cleanup("meshnet")
