"""Our conflist entry, parsed once into a typed object with every default in one place.

libcni hands each plugin its entry merged with ``cniVersion``/``name`` (and ``runtimeConfig``,
``prevResult``); unknown keys are ignored, as the spec asks. A key of the wrong type is the
spec's error 7 naming the key. Hot path: a plain ``__slots__`` class (no dataclasses import).
"""

from __future__ import annotations

from cni.spec import INVALID_CONFIG, POD_ANNOTATIONS_CAPABILITY, CniError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (hot path)
if TYPE_CHECKING:
    from collections.abc import Mapping

LOG_LEVELS = ("debug", "info", "warn", "warning", "error")

#: conflist key -> (attribute, accepted types, default). The one table of what we read.
KEYS: dict[str, tuple[str, tuple[type, ...], object]] = {
    "kubeconfig": ("kubeconfig", (str,), ""),
    "logFile": ("log_file", (str,), ""),
    "logLevel": ("log_level", (str,), "info"),
    "logMaxBytes": ("log_max_bytes", (int,), 1 << 20),
    "excludeNamespaces": ("exclude_namespaces", (list,), ("kube-system",)),
    "captureDNS": ("capture_dns", (bool,), False),
    "agentSocket": ("agent_socket", (str,), ""),
    "cniPodNamePrefix": ("cni_pod_name_prefix", (str,), "mesh-cni-"),
    "apiTimeoutSeconds": ("api_timeout_s", (int, float), 2.0),
    "apiRetries": ("api_retries", (int,), 3),
    "runtimeConfig": ("runtime_config", (dict,), None),
    "prevResult": ("prev_result", (dict,), None),
    "cni.dev/valid-attachments": ("valid_attachments", (list,), None),
}


class PluginConfig:
    """The typed entry; ``raw`` keeps the decoded JSON (for prevResult pass-through)."""

    __slots__ = ("agent_socket", "api_retries", "api_timeout_s", "capture_dns", "cni_pod_name_prefix",
                 "exclude_namespaces", "kubeconfig", "log_file", "log_level", "log_max_bytes", "name",
                 "prev_result", "raw", "runtime_config", "valid_attachments")

    name: str
    kubeconfig: str
    log_file: str
    log_level: str
    log_max_bytes: int
    exclude_namespaces: tuple[str, ...]
    capture_dns: bool
    agent_socket: str
    cni_pod_name_prefix: str
    api_timeout_s: float
    api_retries: int
    runtime_config: dict | None
    prev_result: dict | None
    valid_attachments: list | None
    raw: dict

    def __init__(self, raw: Mapping[str, object]) -> None:
        self.raw = dict(raw)
        name = raw.get("name")
        self.name = name if isinstance(name, str) else ""
        for key, (attribute, kinds, default) in KEYS.items():
            value = raw.get(key)
            if value is None:
                value = default
            elif not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
                raise CniError(INVALID_CONFIG, f"config key {key!r} has the wrong type: {value!r}")
            setattr(self, attribute, value)
        if not all(isinstance(n, str) for n in self.exclude_namespaces):
            raise CniError(INVALID_CONFIG, "config key 'excludeNamespaces' must be a list of strings")
        self.exclude_namespaces = tuple(self.exclude_namespaces)
        if self.log_level.lower() not in LOG_LEVELS:
            raise CniError(INVALID_CONFIG,
                           f"config key 'logLevel' {self.log_level!r} is not debug/info/warn/error")
        # 0 keeps the default, as it always has for these three.
        self.api_timeout_s = float(self.api_timeout_s or KEYS["apiTimeoutSeconds"][2])  # type: ignore[arg-type]
        self.api_retries = self.api_retries or 3
        self.log_max_bytes = self.log_max_bytes or 1 << 20
        self.cni_pod_name_prefix = self.cni_pod_name_prefix or "mesh-cni-"

    def pod_annotations(self) -> dict[str, str] | None:
        """Pod annotations passed by the runtime (containerd, CRI-O: the capability), or None."""
        if self.runtime_config is None:
            return None
        annotations = self.runtime_config.get(POD_ANNOTATIONS_CAPABILITY)
        if not isinstance(annotations, dict):
            return None
        return {str(k): str(v) for k, v in annotations.items()}
