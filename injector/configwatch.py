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
from collections.abc import Callable
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
        self.loaded: Any = None  # as compiled from the files, before the cluster's version applied
        self.fingerprint: str | None = None
        self.last_error: str | None = None
        #: Reads the API server's version (``GET /version``) for ``nativeSidecars: auto``; None
        #: when there is no API access. Called at start (``refresh_cluster_version``) and on reload.
        self.cluster_version: Callable[[], str | None] | None = None

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

    def refresh_cluster_version(self) -> None:
        """Apply the API server's version to the loaded config (a worker calls this at start)."""
        if self.loaded is not None:
            self._publish(self.loaded, self.fingerprint, count=False)

    def _native_sidecars(self, config: Any) -> Any:
        """``nativeSidecars: auto`` decided as Istio does: the API server's version, else the
        config's ``kubernetesVersion``, else off (with a warning)."""
        model = getattr(config, "model", None)
        if model is None or model.values.proxy.native_sidecars != "auto":
            return config
        version = None
        if self.cluster_version is not None:
            try:
                version = self.cluster_version()
            except Exception as exc:  # unreachable or forbidden: fall back, say so
                log.warning("cannot read the API server's version for nativeSidecars: auto",
                            extra={"error": f"{type(exc).__name__}: {exc}"})
        configured = model.values.mesh.kubernetes_version
        if version:
            if version != configured:
                data = model.model_dump(by_alias=True)
                data.setdefault("values", {}).setdefault("mesh", {})["kubernetesVersion"] = version
                config = config_mod.compile_config(data)
            source = "API server"
        elif configured:
            version, source = configured, "config kubernetesVersion"
        else:
            log.warning("nativeSidecars: auto, but neither the API server's version nor the config's "
                        "kubernetesVersion is known: native sidecars off")
            return config
        log.info("nativeSidecars: auto decided", extra={
            "kubernetes_version": version, "source": source,
            "native_sidecars": config.native_sidecars_default})
        return config

    def _publish(self, new: Any, fingerprint: str | None, count: bool = True) -> None:
        old_hash = self.config_hash
        self.loaded = new
        new = self._native_sidecars(new)
        self.current = new
        self.fingerprint = fingerprint
        self.last_error = None
        if count:
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
