"""Pure CNI network-config chaining: which file the runtime uses, and that file with our entry.

No I/O here: the agent reads the net dir, hands names and bytes to these functions and writes
what they return. That keeps every shape (bridge conflist, calico-like conflist, single .conf,
garbage, our own leftovers) testable as data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cni.config import KEYS

PLUGIN_TYPE = "mesh-cni"
#: The plugin's own defaults (cni.config), so the entry we write and the plugin agree.
PLUGIN_DEFAULTS: dict[str, Any] = {key: default for key, (_, _, default) in KEYS.items()}
POD_ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
#: What libcni (and so containerd / CRI-O) loads from a net dir, in the runtime's own order.
CONFLIST_SUFFIX = ".conflist"
CONF_SUFFIXES = (".conf", ".json")
CONFIG_SUFFIXES = (CONFLIST_SUFFIX, *CONF_SUFFIXES)


@dataclass(frozen=True)
class EntryOptions:
    """The contract-4 conflist entry the plugin parses; ``extra`` carries plugin-team additions."""

    kubeconfig: str = "/var/lib/mesh-cni/kubeconfig"
    log_file: str = "/var/log/mesh-cni/mesh-cni.log"
    log_level: str = PLUGIN_DEFAULTS["logLevel"]
    exclude_namespaces: tuple[str, ...] = PLUGIN_DEFAULTS["excludeNamespaces"]
    capture_dns: bool = PLUGIN_DEFAULTS["captureDNS"]
    extra: tuple[tuple[str, Any], ...] = ()

    def entry(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PLUGIN_TYPE,
            "capabilities": {POD_ANNOTATIONS_CAPABILITY: True},
            "kubeconfig": self.kubeconfig,
            "logFile": self.log_file,
            "logLevel": self.log_level,
            "excludeNamespaces": list(self.exclude_namespaces),
            "captureDNS": self.capture_dns,
        }
        body.update(dict(self.extra))
        return body


@dataclass(frozen=True)
class ParsedConfig:
    """A net-dir file the runtime would accept, normalised to conflist form."""

    name: str
    is_conflist: bool
    conflist: dict[str, Any]  # always a conflist body (a .conf is wrapped, keeping cniVersion)


def _valid_plugin(plugin: Any) -> bool:
    return isinstance(plugin, dict) and isinstance(plugin.get("type"), str) and bool(plugin["type"])


def parse_config(name: str, data: bytes) -> ParsedConfig | None:
    """The file as libcni would load it, or None when the runtime would skip it."""
    if not name.endswith(CONFIG_SUFFIXES) or name.startswith("."):
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if name.endswith(CONFLIST_SUFFIX):
        plugins = body.get("plugins")
        if not isinstance(plugins, list) or not plugins or not all(_valid_plugin(p) for p in plugins):
            return None
        if not isinstance(body.get("name", ""), str):
            return None
        return ParsedConfig(name, True, body)
    if not _valid_plugin(body):
        return None
    return ParsedConfig(name, False, conf_to_conflist(body))


def conf_to_conflist(conf: Mapping[str, Any]) -> dict[str, Any]:
    """Wrap a single-plugin .conf as a conflist: name and cniVersion move up, the rest stays."""
    plugin = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
    body: dict[str, Any] = {}
    if "cniVersion" in conf:
        body["cniVersion"] = conf["cniVersion"]
    body["name"] = conf.get("name", "")
    body["plugins"] = [plugin]
    return body


def conflist_name_for(conf_name: str) -> str:
    """The .conflist name that replaces a .conf/.json, sorting right where the .conf did."""
    stem = conf_name.rsplit(".", 1)[0]
    return stem + CONFLIST_SUFFIX


def is_our_entry(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def has_our_entry(conflist: Mapping[str, Any]) -> bool:
    return any(is_our_entry(p) for p in conflist.get("plugins", []))


def without_our_entry(conflist: Mapping[str, Any]) -> dict[str, Any]:
    body = dict(conflist)
    body["plugins"] = [p for p in conflist.get("plugins", []) if not is_our_entry(p)]
    return body


def with_our_entry(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Our entry appended last, any older entry of ours dropped first (never two of us)."""
    body = without_our_entry(conflist)
    body["plugins"] = [*body["plugins"], dict(entry)]
    return body


def is_installed(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """True when our entry is present exactly once, last and equal to what we would write."""
    plugins = conflist.get("plugins", [])
    ours = [p for p in plugins if is_our_entry(p)]
    return len(ours) == 1 and plugins[-1] == dict(entry)


def render(conflist: Mapping[str, Any]) -> bytes:
    """Stable serialisation: rendering the same body twice gives the same bytes (install twice = once)."""
    return (json.dumps(conflist, indent=2) + "\n").encode()


def primary(files: Iterable[tuple[str, bytes]]) -> ParsedConfig | None:
    """The lexically first file the runtime would accept; the one it actually uses."""
    for name, data in sorted(files):
        parsed = parse_config(name, data)
        if parsed is not None:
            return parsed
    return None


@dataclass(frozen=True)
class ChainPlan:
    """What to write to chain ourselves: ``target`` gets ``content``; ``replaces`` (a .conf) goes."""

    target: str
    content: bytes
    replaces: str | None
    already_installed: bool


def plan_chain(files: Iterable[tuple[str, bytes]], entry: Mapping[str, Any]) -> ChainPlan | None:
    """The write that chains us into the runtime's primary config, or None while there is none."""
    found = primary(files)
    if found is None:
        return None
    if found.is_conflist:
        done = is_installed(found.conflist, entry)
        return ChainPlan(found.name, render(with_our_entry(found.conflist, entry)), None, done)
    return ChainPlan(
        conflist_name_for(found.name), render(with_our_entry(found.conflist, entry)), found.name, False
    )
