"""Fixtures for the data-plane tests: root, real netns wired by libcni with our redirect."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cni.cnitest import DRIVER, REFERENCE_PLUGIN_DIR, CniBed, Pod
from tests.conftest import require, require_root


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniBed]:
    require_root()
    require((REFERENCE_PLUGIN_DIR / "bridge").exists(), "needs Debian's containernetworking-plugins")
    require(DRIVER.exists(), f"needs the libcni driver at {DRIVER} (scripts/setup.d/20-libcni.sh)")
    bed = CniBed(Path(tmp_path_factory.mktemp("envoy")))
    bed.conflist("meshnet")
    yield bed
    bed.cleanup("meshnet")


@pytest.fixture(scope="module")
def peer(bed: CniBed) -> Pod:
    """An unmeshed pod: the far end of outbound traffic and the client of inbound traffic."""
    return bed.add_pod("meshnet", {}, name="peer")
