"""The pinned Istio build must be there: a skip locally, a failure under CI."""

from __future__ import annotations

import pytest

from tests.conftest import require
from tests.istio import oracle


@pytest.fixture(scope="session")
def istioctl() -> str:
    tool = oracle.istioctl()
    require(tool is not None, f"needs istioctl {oracle.version()} in {oracle.bin_dir()} "
                              "(scripts/setup.d/60-istio.sh builds it)")
    return str(tool)
