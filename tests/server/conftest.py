"""Fixtures for the webhook server tests: one shared server with the built-in configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import fake_apiserver
from tests.server.fake_apiserver import FakeApiServer
from tests.server.helpers import RunningServer, start_server


@pytest.fixture(scope="session")
def fake_api() -> Iterator[FakeApiServer]:
    """TokenReview/SubjectAccessReview/Events/version for the shared server (see fake_apiserver)."""
    fake = fake_apiserver.standard()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="session")
def webhook(tmp_path_factory: pytest.TempPathFactory, fake_api: FakeApiServer) -> Iterator[RunningServer]:
    """`mesh-injector serve` on loopback HTTPS with built-in defaults, for the whole session."""
    workdir = Path(tmp_path_factory.mktemp("webhook"))
    kubeconfig = fake_api.kubeconfig(workdir / "kubeconfig")
    server = start_server(workdir, extra_args=["--kubeconfig", str(kubeconfig)])
    try:
        yield server
    finally:
        server.stop()
