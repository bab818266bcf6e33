"""A deliberately small template language for sidecar templates, compiled to closures once.

A template is a YAML document shaped like part of a Pod (``metadata`` labels/annotations,
``spec`` initContainers/containers/volumes/imagePullSecrets/securityContext, the pod's own
security context fields winning) plus ``options`` and
``appContainers`` (one container fragment, without a name, laid over every app container:
env by name, volumeMounts by path, as proxyless gRPC needs). Strings may hold
``{{ path.to.value }}`` placeholders:

- a string that is exactly one placeholder becomes the value itself, keeping its type (an int
  stays an int, a mapping is inserted as a mapping, not copied); a value of None removes the
  mapping key or the list item that held it, which is how templates express "only when set";
- placeholders inside longer strings are interpolated as text;
- a mapping with an ``$if: path`` key is dropped (from its list or parent) when the value at
  ``path`` is falsy; the ``$if`` key itself never reaches the output.

No loops, no expressions: anything cleverer is computed in Python and handed to the template as
a value. That keeps user templates declarative and rendering fast (no parsing per request).
Parts of a template without placeholders are shared by every rendered pod, not copied: the
rendered output, like the core's whole result, is read-only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from injector import yamlio
from injector.context import VARIABLES  # the one declaration of template values

_OMIT = object()
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}\}")


Renderer = Callable[[Mapping[str, Any]], Any]


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class TemplateOptions:
    """Per-template behaviour the core needs to know about (merged across selected templates)."""

    rewrite_probes: bool = True
    prometheus_merge: bool = True
    #: postStart command that blocks until the proxy is ready (holdApplicationUntilProxyStarts).
    hold_command: tuple[str, ...] = ()
    #: preStop command of a native-sidecar proxy: it is stopped after the app containers, so it
    #: must start draining when the pod starts shutting down. ``{{ proxy.statusPort }}`` in an
    #: argument is the pod's status port.
    drain_command: tuple[str, ...] = ()
    #: The proxy answers DNS captured to 15053 (pilot-agent does; plain Envoy does not).
    dns_proxy: bool = True
    #: False: no capture init container (istio-validation/istio-init): the pod's traffic is not
    #: redirected (a gateway is the proxy itself; proxyless gRPC talks xDS directly).
    capture: bool = True
    #: False: the proxy stays a regular container even where native sidecars are on (a gateway).
    native_sidecar: bool = True
    #: A native proxy gets ``hold_command`` as its postStart too (the kubelet then starts the app
    #: once the hook returned, instead of at the startupProbe's next period).
    native_hold: bool = False


@dataclass(frozen=True)
class Template:
    name: str
    options: Mapping[str, Any]
    container_names: tuple[str, ...] = ()
    init_container_names: tuple[str, ...] = ()
    doc: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def specialise(self, consts: Mapping[str, Any]) -> Renderer:
        """A renderer with the values in ``consts`` (``group.name`` -> value) substituted now.

        Everything that depends on those values only becomes a shared constant, so per call
        only the per-pod parts are built. The caller memoizes it per distinct ``consts`` (the
        config's memo, keyed by what ``consts`` is computed from).
        """
        static, compiled = _compile(self.doc, consts)
        return (lambda _ctx: compiled) if static else compiled


def _lookup(path: tuple[str, ...], text: str) -> Renderer:
    def missing() -> TemplateError:
        return TemplateError(f"template value {text!r} is not available")

    if len(path) == 2:  # every variable today: one lookup per level, no loop
        first, second = path

        def get2(ctx: Mapping[str, Any]) -> Any:
            try:
                return ctx[first][second]
            except (KeyError, TypeError):
                raise missing() from None

        return get2

    def get(ctx: Mapping[str, Any]) -> Any:
        try:
            value = ctx
            for key in path:
                value = value[key]
        except (KeyError, TypeError):
            raise missing() from None
        return value

    return get


def _placeholders(node: str) -> list[re.Match[str]]:
    matches = list(_PLACEHOLDER.finditer(node))
    for m in matches:
        if m.group(1) not in VARIABLES:
            raise TemplateError(f"unknown template value {{{{ {m.group(1)} }}}}")
    return matches


def _compile(node: Any, consts: Mapping[str, Any] | None = None) -> tuple[bool, Any]:
    """(True, value) for a part without placeholders, shared by every rendered pod and never
    copied (rendered output is read-only by contract); else (False, renderer). Values named in
    ``consts`` are substituted now; (True, _OMIT) marks a part that a constant None removes."""
    fixed = consts or {}
    if isinstance(node, str):
        matches = _placeholders(node)
        if not matches:
            return True, node
        if len(matches) == 1 and matches[0].span() == (0, len(node)):
            var = matches[0].group(1)
            if var in fixed:
                return True, _OMIT if fixed[var] is None else fixed[var]
            getter = _lookup(tuple(var.split(".")), var)

            def whole(ctx: Mapping[str, Any]) -> Any:
                value = getter(ctx)
                return _OMIT if value is None else value

            return False, whole
        pieces: list[str | Renderer] = []
        pos = 0
        for m in matches:
            if m.start() > pos:
                pieces.append(node[pos : m.start()])
            var = m.group(1)
            if var in fixed:
                pieces.append("" if fixed[var] is None else str(fixed[var]))
            else:
                pieces.append(_lookup(tuple(var.split(".")), var))
            pos = m.end()
        if pos < len(node):
            pieces.append(node[pos:])
        if all(isinstance(piece, str) for piece in pieces):
            return True, "".join(pieces)  # type: ignore[arg-type]

        def interpolate(ctx: Mapping[str, Any]) -> str:
            out = []
            for piece in pieces:
                if isinstance(piece, str):
                    out.append(piece)
                else:
                    value = piece(ctx)
                    out.append("" if value is None else str(value))
            return "".join(out)

        return False, interpolate
    if isinstance(node, dict):
        condition: Renderer | None = None
        if "$if" in node:
            cond_path = node["$if"]
            if not isinstance(cond_path, str) or cond_path not in VARIABLES:
                raise TemplateError(f"$if must name a template value, got {cond_path!r}")
            if cond_path in fixed:
                if not fixed[cond_path]:
                    return True, _OMIT
            else:
                condition = _lookup(tuple(cond_path.split(".")), cond_path)
        items = [(str(k), *_compile(v, consts)) for k, v in node.items() if k != "$if"]
        items = [(k, static, v) for k, static, v in items if not (static and v is _OMIT)]
        if condition is None and all(static for _, static, _ in items):
            return True, {k: v for k, _, v in items}

        def render_dict(ctx: Mapping[str, Any]) -> Any:
            if condition is not None and not condition(ctx):
                return _OMIT
            out: dict[str, Any] = {}
            for key, static, part in items:
                if static:
                    out[key] = part
                else:
                    value = part(ctx)
                    if value is not _OMIT:
                        out[key] = value
            return out

        return False, render_dict
    if isinstance(node, list):
        parts = [_compile(item, consts) for item in node]
        parts = [(static, v) for static, v in parts if not (static and v is _OMIT)]
        if all(static for static, _ in parts):
            return True, [v for _, v in parts]

        def render_list(ctx: Mapping[str, Any]) -> Any:
            out = []
            for static, part in parts:
                if static:
                    out.append(part)
                else:
                    value = part(ctx)
                    if value is not _OMIT:
                        out.append(value)
            return out

        return False, render_list
    if node is None or isinstance(node, bool | int | float):
        return True, node
    raise TemplateError(f"unsupported YAML value {node!r}")


_ALLOWED_TOP = {"options", "metadata", "spec", "appContainers"}
_OPTIONS = {
    "rewriteProbes", "prometheusMerge", "holdCommand", "drainCommand", "dnsProxy", "capture", "nativeSidecar",
    "nativeHold",
}
_ALLOWED_META = {"labels", "annotations"}
_ALLOWED_SPEC = {"initContainers", "containers", "volumes", "imagePullSecrets", "securityContext"}


def parse_template(name: str, source: Any) -> Template:
    """Parse and compile a template (YAML text, or what parsing it gave); raise TemplateError
    (a ValueError) saying what is wrong."""
    if isinstance(source, str):
        try:
            doc = yamlio.safe_load(source)
        except yaml.YAMLError as err:
            raise TemplateError(f"not valid YAML: {err}") from None
    else:
        doc = dict(source) if isinstance(source, Mapping) else source
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise TemplateError("a template must be a mapping")
    unknown = set(doc) - _ALLOWED_TOP
    if unknown:
        raise TemplateError(f"unknown top-level keys {sorted(unknown)}; allowed: {sorted(_ALLOWED_TOP)}")
    metadata = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    if not isinstance(metadata, dict) or set(metadata) - _ALLOWED_META:
        raise TemplateError(f"metadata may hold only {sorted(_ALLOWED_META)}")
    if not isinstance(spec, dict) or set(spec) - _ALLOWED_SPEC:
        raise TemplateError(f"spec may hold only {sorted(_ALLOWED_SPEC)}")

    def names(key: str) -> tuple[str, ...]:
        items = spec.get(key) or []
        if not isinstance(items, list):
            raise TemplateError(f"spec.{key} must be a list")
        out = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise TemplateError(f"every item of spec.{key} needs a literal name")
            out.append(item["name"])
        return tuple(out)

    options = doc.get("options") or {}
    if not isinstance(options, dict) or set(options) - _OPTIONS:
        raise TemplateError(f"options may hold only {', '.join(sorted(_OPTIONS))}")
    app = doc.get("appContainers") or {}
    if not isinstance(app, dict) or "name" in app:
        raise TemplateError("appContainers must be one container fragment without a name")
    body: dict[str, Any] = {"metadata": metadata, "spec": spec}
    if app:
        body["appContainers"] = app
    _compile(body)  # unknown values and unsupported YAML fail here, when the config loads
    return Template(
        name=name,
        options=options,
        container_names=names("containers"),
        init_container_names=names("initContainers"),
        doc=body,
    )


def merge_options(templates: list[Template]) -> TemplateOptions:
    merged: dict[str, Any] = {}
    for template in templates:
        merged.update(template.options)
    return TemplateOptions(
        rewrite_probes=bool(merged.get("rewriteProbes", True)),
        prometheus_merge=bool(merged.get("prometheusMerge", True)),
        hold_command=tuple(str(a) for a in merged.get("holdCommand") or ()),
        drain_command=tuple(str(a) for a in merged.get("drainCommand") or ()),
        dns_proxy=bool(merged.get("dnsProxy", True)),
        capture=bool(merged.get("capture", True)),
        native_sidecar=bool(merged.get("nativeSidecar", True)),
        native_hold=bool(merged.get("nativeHold", False)),
    )
