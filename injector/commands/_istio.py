"""Istio's own files for ``kube-inject`` (``--injectConfigFile``, ``--meshConfigFile``, ``--valuesFile``).

They are what ``istioctl kube-inject`` takes: the ``config`` and ``values`` keys of the
``istio-sidecar-injector`` ConfigMap and the ``mesh`` key of the ``istio`` ConfigMap. What has a
counterpart in our configuration is mapped onto it; what has none is named once on stderr, so
nobody believes a setting took effect when it did not. Istio's injection templates are Go
templates, which we do not render: one with the name of a built-in of ours (``sidecar``) is
replaced by ours, with a note; any other is refused when the files make it a default template,
and otherwise dropped (a pod asking for it is refused as an unknown template).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from injector import yamlio
from injector.config import BUILTIN_TEMPLATES, InjectorConfig, compile_config
from injector.template import parse_template
from injector.yamlio import YamlLimits

#: Go template actions Istio's templates use; our placeholders are ``{{ path.to.value }}`` only.
_GO_TEMPLATE = re.compile(r"\{\{-?\s*(?:\.|\$|if\b|else\b|end\b|range\b|with\b|toYaml|include\b|"
                          r"template\b|define\b|annotation\b|index\b|default\b|-?\s*\}\})")
_LIMITS = YamlLimits(max_bytes=16 * yamlio.MiB, aliases=True)


class IstioFileError(ValueError):
    """A file cannot be used: the message names it and what is wrong."""


def _read(path: str, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise IstioFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        if text.lstrip()[:1] == "{":
            data = json.loads(text)
        else:
            data = yamlio.load_one(text, source=path, limits=_LIMITS)
    except ValueError as exc:
        message = str(exc) if str(exc).startswith(path) else f"{path}: {exc}"
        raise IstioFileError(f"{what} {message}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise IstioFileError(f"{what} {path}: expected a mapping")
    return data


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _leaves(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, Mapping) and data:
        return [leaf for k, v in data.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def _apply(source: Mapping[str, Any], mapping: Mapping[str, Callable[[Any], None]]) -> list[str]:
    """Run each setter whose dotted key is in ``source``; the leaves no setter covered."""
    for dotted, setter in mapping.items():
        value = _get(source, dotted)
        if value is not None:
            setter(value)
    return [leaf for leaf in _leaves(source) if leaf and not any(
        leaf == key or leaf.startswith(key + ".") for key in mapping)]


def _values_mapping(proxy: dict[str, Any], mesh: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    def setter(target: dict[str, Any], key: str, convert: Callable[[Any], Any] = lambda v: v):
        return lambda value: target.__setitem__(key, convert(value))

    def image(_: Any) -> None:
        name = str(_get(data, "global.proxy.image") or "proxyv2")
        if "/" not in name:
            hub, tag = _get(data, "global.hub"), _get(data, "global.tag")
            variant = _get(data, "global.variant")
            name = f"{hub}/{name}" if hub else name
            if tag:
                name += f":{tag}" + (f"-{variant}" if variant else "")
        proxy["image"] = name

    def capture(enabled: Any) -> None:
        proxy["capture"] = "cni" if str(enabled).lower() == "true" else "init"

    return {
        "global.hub": image, "global.tag": image, "global.variant": image, "global.proxy.image": image,
        "global.imagePullPolicy": setter(proxy, "imagePullPolicy"),
        "global.proxy.resources": setter(proxy, "resources"),
        "global.proxy.logLevel": setter(proxy, "logLevel"),
        "global.proxy.componentLogLevel": setter(proxy, "componentLogLevel"),
        "global.proxy.holdApplicationUntilProxyStarts": setter(proxy, "holdApplicationUntilProxyStarts"),
        "global.proxy.statusPort": setter(proxy, "statusPort"),
        "global.proxy.includeIPRanges": setter(proxy, "includeOutboundIpRanges", str),
        "global.proxy.excludeIPRanges": setter(proxy, "excludeOutboundIpRanges", str),
        "global.proxy.includeInboundPorts": setter(proxy, "includeInboundPorts", str),
        "global.proxy.excludeInboundPorts": setter(proxy, "excludeInboundPorts", str),
        "global.proxy.includeOutboundPorts": setter(proxy, "includeOutboundPorts", str),
        "global.proxy.excludeOutboundPorts": setter(proxy, "excludeOutboundPorts", str),
        "global.meshID": setter(mesh, "meshId"),
        "global.multiCluster.clusterName": setter(mesh, "clusterId"),
        "global.caAddress": setter(mesh, "caAddress"),
        "global.imagePullSecrets": setter(mesh, "imagePullSecrets"),
        "revision": lambda v: mesh.__setitem__("revision", v or "default"),
        "pilot.cni.enabled": capture, "istio_cni.enabled": capture,
        "sidecarInjectorWebhook.rewriteAppHTTPProbe": setter(proxy, "rewriteAppHttpProbers"),
        "pilot.env.ENABLE_NATIVE_SIDECARS": setter(proxy, "nativeSidecars", lambda v: str(v).lower()),
    }


def _mesh_mapping(proxy: dict[str, Any], mesh: dict[str, Any]) -> dict[str, Any]:
    def setter(target: dict[str, Any], key: str):
        return lambda value: target.__setitem__(key, value)

    return {
        "trustDomain": setter(mesh, "trustDomain"),
        "defaultConfig.discoveryAddress": setter(mesh, "discoveryAddress"),
        "defaultConfig.meshId": setter(mesh, "meshId"),
        "defaultConfig.holdApplicationUntilProxyStarts": setter(proxy, "holdApplicationUntilProxyStarts"),
        "defaultConfig.statusPort": setter(proxy, "statusPort"),
    }


def _templates(config: dict[str, Any], inject: Mapping[str, Any], path: str, notes: list[str]) -> None:
    sources = dict(inject.get("templates") or {})
    if inject.get("template"):  # Istio's legacy single template is the "sidecar" one
        sources.setdefault("sidecar", inject["template"])
    defaults = list(inject.get("defaultTemplates") or config.get("defaultTemplates") or ["sidecar"])
    for name, source in sources.items():
        text = source if isinstance(source, str) else json.dumps(source)
        if not _GO_TEMPLATE.search(text):
            try:
                parse_template(name, source)
            except ValueError as exc:
                raise IstioFileError(f"--injectConfigFile {path}: template {name!r}: {exc}") from None
            config.setdefault("templates", {})[name] = source
            continue
        if name in BUILTIN_TEMPLATES:
            notes.append(f"template {name!r} in {path} is an Istio Go template; using mesh-injector's "
                         f"built-in {name!r} in its place")
        elif name in defaults:
            raise IstioFileError(f"--injectConfigFile {path}: template {name!r} is a Go template, which "
                                 "mesh-injector cannot render, and it is a default template")
        else:
            notes.append(f"template {name!r} in {path} is an Istio Go template mesh-injector cannot "
                         "render; pods asking for it are refused")
    config["defaultTemplates"] = defaults


def apply_istio_files(base: InjectorConfig, *, inject_config: str | None, mesh_config: str | None,
                      values: str | None) -> tuple[InjectorConfig, list[str]]:
    """``base`` with Istio's files laid over it, and the notes to print (what was not used)."""
    if not (inject_config or mesh_config or values):
        return base, []
    config = base.model.model_dump(by_alias=True)
    proxy, mesh = config["values"]["proxy"], config["values"]["mesh"]
    notes: list[str] = []
    if values:
        data = _read(values, "--valuesFile")
        unused = _apply(data, _values_mapping(proxy, mesh, data))
        if unused:
            notes.append(f"not used from {values}: {', '.join(unused)}")
    if mesh_config:
        data = _read(mesh_config, "--meshConfigFile")
        unused = _apply(data, _mesh_mapping(proxy, mesh))
        if unused:
            notes.append(f"not used from {mesh_config}: {', '.join(unused)}")
    if inject_config:
        data = _read(inject_config, "--injectConfigFile")
        direct = {"policy": "policy", "alwaysInjectSelector": "alwaysInjectSelector",
                  "neverInjectSelector": "neverInjectSelector", "injectedAnnotations": "injectedAnnotations"}
        for key, ours in direct.items():
            if data.get(key) is not None:
                config[ours] = data[key]
        _templates(config, data, inject_config, notes)
        unused = [k for k in data if k not in (*direct, "templates", "template", "defaultTemplates")]
        if unused:
            notes.append(f"not used from {inject_config}: {', '.join(unused)}")
    return compile_config(config), notes
