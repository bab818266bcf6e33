"""The configuration in use, and its reload from a mounted ConfigMap directory.

ConfigMap volumes are updated by an atomic ``..data`` symlink swap that emits no dependable
file events, so the directory's contents are polled (they are small: hashing them is cheap).
A new config replaces the old one only when it loads completely; otherwise the old one keeps
serving and the failure is reported in the log, the metrics and ``/readyz``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from injector import config as config_mod
from injector.metrics import InjectorMetrics

log = logging.getLogger("injector.config")


def builtin_config() -> Any:
    """The built-in defaults (the core's compiled default configuration)."""
    default = getattr(config_mod.InjectorConfig, "default", None)
    if callable(default):
        return default()
    return config_mod.default_config()


def directory_fingerprint(root: Path) -> str:
    """Hash of every regular file's relative path and bytes under ``root`` (following symlinks).

    Kubernetes' ``..data``/``..2024_...`` entries are skipped: the visible names resolve
    through them, so the same bytes are counted once.
    """
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".."))
        for name in sorted(filenames):
            if name.startswith(".."):
                continue
            path = Path(dirpath, name)
            try:
                data = path.read_bytes()
            except OSError:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


class ConfigHolder:
    """Holds the current config; ``poll()`` reloads it when the directory changed."""

    def __init__(self, config_dir: str | os.PathLike[str] | None, metrics: InjectorMetrics) -> None:
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self.metrics = metrics
        self.current: Any = None
        self.fingerprint: str | None = None
        self.last_error: str | None = None

    @property
    def config_hash(self) -> str:
        return str(getattr(self.current, "config_hash", ""))

    def load_initial(self) -> None:
        """Load at start-up; raises ConfigError (the server must not start on a broken config)."""
        if self.config_dir is None:
            self._publish(builtin_config(), None)
            return
        fingerprint = directory_fingerprint(self.config_dir)
        try:
            new = config_mod.load_config_dir(self.config_dir)
        except config_mod.ConfigError:
            self.metrics.config_reloads.inc("failure")
            raise
        self._publish(new, fingerprint)

    def poll(self) -> bool:
        """Reload if the directory's contents changed. True when a new config was published."""
        if self.config_dir is None:
            return False
        fingerprint = directory_fingerprint(self.config_dir)
        if fingerprint == self.fingerprint:
            return False
        try:
            new = config_mod.load_config_dir(self.config_dir)
        except Exception as exc:  # ConfigError, or anything a broken file makes the loader raise
            self.fingerprint = fingerprint  # report once per broken version, not every poll
            self.last_error = f"{exc}"
            self.metrics.config_reloads.inc("failure")
            self.metrics.config_last_reload_success.set(0)
            log.error(
                "new configuration rejected; keeping the previous one",
                extra={"config_dir": str(self.config_dir), "error": self.last_error,
                       "config_hash": self.config_hash},
            )
            return False
        self._publish(new, fingerprint)
        return True

    def _publish(self, new: Any, fingerprint: str | None) -> None:
        old_hash = self.config_hash
        self.current = new
        self.fingerprint = fingerprint
        self.last_error = None
        self.metrics.config_reloads.inc("success")
        self.metrics.config_last_reload_success.set(1)
        if old_hash and old_hash != self.config_hash:
            self.metrics.config_info.set(0, old_hash)  # shared value files cannot forget a series
        self.metrics.config_info.set(1, self.config_hash)
        log.info(
            "configuration loaded",
            extra={"config_dir": str(self.config_dir) if self.config_dir else "<built-in>",
                   "config_hash": self.config_hash, "previous_hash": old_hash or None},
        )
