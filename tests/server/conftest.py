"""Fixtures for the webhook server tests: one shared server with the built-in configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.helpers import RunningServer, start_server


@pytest.fixture(scope="session")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`mesh-injector serve` on loopback HTTPS with built-in defaults, for the whole session."""
    server = start_server(Path(tmp_path_factory.mktemp("webhook")))
    try:
        yield server
    finally:
        server.stop()
