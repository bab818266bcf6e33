"""A pod's annotations parsed once into a frozen ``Overrides``: what the pod asks of the injection.

Istio's ``injectPod`` reads the overrides (templates, proxy image, resources, log level, proxy
config, traffic annotations) before rendering; so does ours, once, here. Every later step reads
the frozen object, never the annotations. A bad value raises ``Rejected`` naming the
annotation. ``ProxySettings`` is the part the fixed template groups depend on: it is the key
of the config memo's fixed-context and render entries, so a render can only be shared by pods
whose settings are equal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from cni import annotations as ann
from injector.context import compact_json
from injector.quantity import parse_quantity
from injector.result import ReasonCode, Rejected
from injector.template import Template, TemplateOptions, merge_options

if TYPE_CHECKING:
    from injector.config import InjectorConfig

LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
#: pilot-agent's own log scopes and levels (its --log_output_level), Istio's default.
#: Istio's annotation: the proxy may bind ports below 1024 (it then runs as root, group 1337).
CAP_NET_BIND_SERVICE = "sidecar.istio.io/capNetBindService"
AGENT_LOG_LEVEL = "sidecar.istio.io/agentLogLevel"
#: Istio's annotations: JSON maps of volumes added to the pod / mounts added to the proxy, by name.
USER_VOLUME = "sidecar.istio.io/userVolume"
USER_VOLUME_MOUNT = "sidecar.istio.io/userVolumeMount"
_VOLUME_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
#: Istio's annotation: a ConfigMap whose custom_bootstrap.json pilot-agent merges into Envoy's.
BOOTSTRAP_OVERRIDE = "sidecar.istio.io/bootstrapOverride"
_CONFIGMAP_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
AGENT_LOG_LEVEL_DEFAULT = "default:info"
#: The proxy readiness probe's timing (Istio's annotations): name -> (annotation, default).
READINESS_ANNOTATIONS: tuple[tuple[str, str, int], ...] = (
    ("initialDelaySeconds", "readiness.status.sidecar.istio.io/initialDelaySeconds", 0),
    ("periodSeconds", "readiness.status.sidecar.istio.io/periodSeconds", 15),
    ("failureThreshold", "readiness.status.sidecar.istio.io/failureThreshold", 4),
)
#: Bounds that keep a probe meaningful (the API server takes any int32; a day is plenty).
READINESS_MAX_SECONDS = 86400
#: The four resource annotations, in the order ``ProxySettings.resources`` holds their values.
RESOURCE_ANNOTATIONS: tuple[tuple[str, str, str], ...] = (
    (ann.PROXY_CPU, "requests", "cpu"),
    (ann.PROXY_MEMORY, "requests", "memory"),
    (ann.PROXY_CPU_LIMIT, "limits", "cpu"),
    (ann.PROXY_MEMORY_LIMIT, "limits", "memory"),
)


@dataclass(frozen=True)
class TemplateChoice:
    """The templates a pod asked for (or the defaults), with their merged options."""

    templates: tuple[Template, ...]
    options: TemplateOptions
    container_names: frozenset[str]
    init_container_names: frozenset[str]


class ProxySettings(NamedTuple):
    """Everything the ``proxy`` and ``mesh`` template groups are computed from (with the config).

    Hashable: the config memo keys the fixed context and the specialised renderers on it. A
    NamedTuple, not a frozen dataclass: built per pod, and ~10x cheaper to build and hash.
    """

    image: str
    envoy_image: str
    log_level: str
    component_log_level: str
    config_json: str
    #: The four resource annotation values (RESOURCE_ANNOTATIONS order); None: config defaults.
    resources: tuple[str | None, ...] | None
    uid: int
    gid: int
    status_port: int
    mode: str
    #: The proxy's postStart wait (hold, not native, the template has a command); None: no wait.
    hold_command: tuple[str, ...] | None
    #: The native proxy's preStop drain (status port filled in); None: not native, or no command.
    drain_command: tuple[str, ...] | None = None
    agent_log_level: str = AGENT_LOG_LEVEL_DEFAULT
    #: NET_BIND_SERVICE added, run as root (the redirect still exempts it by its group).
    bind_low_ports: bool = False
    #: initialDelaySeconds, periodSeconds, failureThreshold of the proxy's readiness probe.
    readiness: tuple[int, int, int] = tuple(d for _, _, d in READINESS_ANNOTATIONS)  # type: ignore[assignment]


class Overrides(NamedTuple):
    """What the pod's annotations ask for, resolved over the config's defaults (immutable)."""

    choice: TemplateChoice
    traffic: ann.ResolvedTraffic
    native: bool
    #: Probe rewriting and Prometheus merge, after annotation, template and status port (0: off).
    rewrite_probes: bool
    prometheus_merge: bool
    proxy: ProxySettings
    #: The ConfigMap named by sidecar.istio.io/bootstrapOverride; None: not set.
    bootstrap_override: str | None = None
    #: sidecar.istio.io/userVolume / userVolumeMount, by name (sorted), name included.
    user_volumes: tuple[dict[str, Any], ...] = ()
    user_mounts: tuple[dict[str, Any], ...] = ()

    @property
    def plan(self) -> ann.RedirectPlan:
        return self.traffic.plan


def parse_overrides(annotations: Mapping[str, str], config: InjectorConfig) -> Overrides:
    """The pod's overrides over the config's defaults; raise Rejected on the first bad value."""
    choice = select_templates(annotations, config)
    traffic = resolve_traffic(annotations, config)
    plan = traffic.plan
    if plan.capture_dns and not choice.options.dns_proxy and config.proxy.capture != "none":
        raise Rejected(
            ReasonCode.INVALID_ANNOTATION,
            f"annotation {ann.CAPTURE_DNS}=true (or captureDNS in the config): template(s) "
            f"{', '.join(t.name for t in choice.templates)} have no DNS proxy on port "
            f"{ann.DNS_CAPTURE_PORT}, so all DNS would fail; use the sidecar template or set it to false",
        )
    defaults = config.pod_defaults
    image = annotations.get(ann.PROXY_IMAGE)
    if image is not None and not str(image).strip():
        raise Rejected(ReasonCode.INVALID_ANNOTATION, f"annotation {ann.PROXY_IMAGE} is empty")
    log_level = annotations.get(ann.LOG_LEVEL, defaults.log_level)
    if log_level not in LOG_LEVELS:
        raise Rejected(
            ReasonCode.INVALID_ANNOTATION,
            f"annotation {ann.LOG_LEVEL}={log_level!r}: expected one of {', '.join(LOG_LEVELS)}",
        )
    # A template whose proxy is the pod's main container (a gateway) never makes it native.
    native = _flag(annotations, ann.NATIVE_SIDECAR, defaults.native_sidecars)
    native = native and choice.options.native_sidecar
    rewrite = _flag(annotations, ann.REWRITE_PROBES, defaults.rewrite_probes)
    prom_merge = _flag(annotations, ann.PROMETHEUS_MERGE, defaults.prometheus_merge)
    proxy_config, hold = _proxy_config(annotations, config)
    resources = _resource_values(annotations)
    # A native proxy holds the app through its startupProbe, or through the hold command where
    # the template asks for that (nativeHold: the kubelet waits for postStart, not for a period).
    hold_effective = bool(choice.options.hold_command) and (choice.options.native_hold if native else hold)
    has_status_port = plan.status_port != 0  # Istio: port 0 is no status port, so nothing to probe
    settings = ProxySettings(
        image=image or defaults.image,
        envoy_image=image or defaults.envoy_image,
        log_level=log_level,
        component_log_level=annotations.get(ann.COMPONENT_LOG_LEVEL, defaults.component_log_level),
        config_json=_json_sorted(_with_hold(proxy_config, hold)) if proxy_config or hold else "{}",
        resources=resources,
        uid=plan.proxy_uid,
        gid=plan.proxy_gid,
        status_port=plan.status_port,
        mode=plan.mode,
        hold_command=choice.options.hold_command if hold_effective else None,
        drain_command=_drain(choice.options.drain_command, plan.status_port) if native else None,
        agent_log_level=_agent_log_level(annotations),
        bind_low_ports=_flag(annotations, CAP_NET_BIND_SERVICE, False),
        readiness=_readiness(annotations),
    )
    return Overrides(
        choice=choice,
        traffic=traffic,
        native=native,
        rewrite_probes=rewrite and choice.options.rewrite_probes and has_status_port,
        prometheus_merge=prom_merge and choice.options.prometheus_merge and has_status_port,
        proxy=settings,
        bootstrap_override=_bootstrap_override(annotations),
        user_volumes=_named_map(annotations, USER_VOLUME, config),
        user_mounts=_named_map(annotations, USER_VOLUME_MOUNT, config, required="mountPath"),
    )


def _named_map(
    annotations: Mapping[str, str], key: str, config: InjectorConfig, required: str | None = None
) -> tuple[dict[str, Any], ...]:
    """A JSON map of name -> object (``userVolume``, ``userVolumeMount``) as named objects,
    sorted by name as Istio adds them; bounded like proxy.istio.io/config, refused naming it."""
    raw = annotations.get(key)
    if raw is None:
        return ()
    text = str(raw)
    limit = config.model.limits.proxy_config_max_bytes

    def refuse(problem: str) -> Rejected:
        return Rejected(ReasonCode.INVALID_ANNOTATION, f"annotation {key}: {problem}")

    if len(text.encode()) > limit:
        raise refuse(f"over {limit} bytes (limits.proxyConfigMaxBytes)")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise refuse("not valid JSON") from None
    if not isinstance(body, dict):
        raise refuse("expected a JSON object of name: object")
    out = []
    for name in sorted(body):
        value = body[name]
        if not _VOLUME_NAME.match(name):
            raise refuse(f"{name[:100]!r} is not a volume name (a DNS label, at most 63 characters)")
        if not isinstance(value, dict) or (required and not isinstance(value.get(required), str)):
            raise refuse(f"{name!r} must be an object" + (f" with a string {required}" if required else ""))
        out.append({"name": name, **{k: v for k, v in value.items() if k != "name"}})
    return tuple(out)


def _bootstrap_override(annotations: Mapping[str, str]) -> str | None:
    """The ConfigMap name in ``sidecar.istio.io/bootstrapOverride`` (a valid name, or refused)."""
    raw = annotations.get(BOOTSTRAP_OVERRIDE)
    if raw is None:
        return None
    name = str(raw).strip()
    if len(name) > 253 or not _CONFIGMAP_NAME.match(name):
        raise Rejected(
            ReasonCode.INVALID_ANNOTATION,
            f"annotation {BOOTSTRAP_OVERRIDE}={name[:100]!r}: expected a ConfigMap name "
            "(lower-case letters, digits, '-' and '.', at most 253 characters)",
        )
    return name


def _agent_log_level(annotations: Mapping[str, str]) -> str:
    """``sidecar.istio.io/agentLogLevel`` (scope:level,...), one argument of pilot-agent's."""
    value = str(annotations.get(AGENT_LOG_LEVEL, AGENT_LOG_LEVEL_DEFAULT)).strip()
    if not value or len(value) > 1024 or any(c.isspace() for c in value):
        raise Rejected(
            ReasonCode.INVALID_ANNOTATION,
            f"annotation {AGENT_LOG_LEVEL}={value[:100]!r}: expected scope:level pairs such as "
            "default:info (no spaces, at most 1024 characters)",
        )
    return value


def _readiness(annotations: Mapping[str, str]) -> tuple[int, int, int]:
    """The readiness probe's timing from ``readiness.status.sidecar.istio.io/*``, bounded."""
    values = []
    for field, key, default in READINESS_ANNOTATIONS:
        raw = annotations.get(key)
        if raw is None:
            values.append(default)
            continue
        text = str(raw).strip()
        low = 0 if field == "initialDelaySeconds" else 1
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= READINESS_MAX_SECONDS:
            raise Rejected(
                ReasonCode.INVALID_ANNOTATION,
                f"annotation {key}={text[:100]!r}: expected a whole number from {low} "
                f"to {READINESS_MAX_SECONDS}",
            )
        values.append(int(text))
    return values[0], values[1], values[2]


_STATUS_PORT_PLACEHOLDER = re.compile(r"\{\{\s*proxy\.statusPort\s*\}\}")


def _drain(command: tuple[str, ...], status_port: int) -> tuple[str, ...] | None:
    """The template's drain command for this pod's status port; None when it has none."""
    if not command:
        return None
    return tuple(_STATUS_PORT_PLACEHOLDER.sub(str(status_port), part) for part in command)


def _flag(annotations: Mapping[str, str], key: str, default: bool) -> bool:
    if key not in annotations:
        return default
    try:
        return ann.parse_bool(key, annotations[key])
    except ann.AnnotationError as err:
        raise Rejected(ReasonCode.INVALID_ANNOTATION, str(err)) from None


def select_templates(annotations: Mapping[str, str], config: InjectorConfig) -> TemplateChoice:
    """The templates a pod asks for (or the defaults), memoised per config and annotation value."""
    raw = annotations.get(ann.TEMPLATES)
    found: TemplateChoice = config.memo.get("templates", raw, lambda: _choose(raw, config))
    return found


def _choose(raw: str | None, config: InjectorConfig) -> TemplateChoice:
    names = (
        [n.strip() for n in raw.split(",") if n.strip()]
        if raw is not None
        else list(config.model.default_templates)
    )
    if not names:
        raise Rejected(ReasonCode.UNKNOWN_TEMPLATE, f"annotation {ann.TEMPLATES}={raw!r} names no template")
    out = []
    for name in names:
        template = config.templates.get(name)
        if template is None:
            raise Rejected(
                ReasonCode.UNKNOWN_TEMPLATE,
                f"annotation {ann.TEMPLATES}={raw!r}: unknown template {name!r}; "
                f"known: {', '.join(sorted(config.templates))}",
            )
        out.append(template)
    return TemplateChoice(
        templates=tuple(out),
        options=merge_options(out),
        container_names=frozenset(n for t in out for n in t.container_names),
        init_container_names=frozenset(n for t in out for n in t.init_container_names),
    )


def resolve_traffic(annotations: Mapping[str, str], config: InjectorConfig) -> ann.ResolvedTraffic:
    """resolve_traffic, memoised: most pods carry the same few traffic annotations (usually none)."""
    found = _TRAFFIC_KEYS.intersection(annotations)  # C speed; nearly always empty or tiny
    present = tuple((k, annotations[k]) for k in sorted(found)) if found else ()

    def resolve() -> ann.ResolvedTraffic:  # from the key alone, so the key cannot miss an input
        try:
            return ann.resolve_traffic(dict(present), config.traffic_defaults)
        except ann.AnnotationError as err:
            raise Rejected(ReasonCode.INVALID_TRAFFIC_ANNOTATION, str(err)) from None

    found: ann.ResolvedTraffic = config.memo.get("traffic", present, resolve)
    return found


_TRAFFIC_KEYS = frozenset(ann.TRAFFIC_ANNOTATIONS)
_RESOURCE_KEYS = frozenset(k for k, _, _ in RESOURCE_ANNOTATIONS)


def _resource_values(annotations: Mapping[str, str]) -> tuple[str | None, ...] | None:
    """The resource annotations' values, validated (quantities; request <= limit); None: none set."""
    if _RESOURCE_KEYS.isdisjoint(annotations):
        return None
    values: dict[tuple[str, str], str] = {}
    parsed: dict[tuple[str, str], Any] = {}
    for key, section, resource in RESOURCE_ANNOTATIONS:
        if key not in annotations:
            continue
        value = values[(section, resource)] = str(annotations[key]).strip()
        try:
            parsed[(section, resource)] = parse_quantity(value)
        except ValueError as err:
            raise Rejected(ReasonCode.INVALID_ANNOTATION, f"annotation {key}={value!r}: {err}") from None
    for resource in ("cpu", "memory"):
        request, limit = parsed.get(("requests", resource)), parsed.get(("limits", resource))
        if request is not None and limit is not None and request > limit:
            raise Rejected(
                ReasonCode.INVALID_ANNOTATION,
                f"proxy {resource} request {values[('requests', resource)]} exceeds its limit "
                f"{values[('limits', resource)]}",
            )
    return tuple(values.get((section, resource)) for _, section, resource in RESOURCE_ANNOTATIONS)


def resources(settings: ProxySettings, config: InjectorConfig) -> dict[str, Any] | None:
    """The proxy's resources: only the annotations' when any is set (Istio's rule), else the config's."""
    if settings.resources is None:
        defaults = config.proxy.resources
        out: dict[str, Any] = {}
        if defaults.requests:
            out["requests"] = dict(defaults.requests)
        if defaults.limits:
            out["limits"] = dict(defaults.limits)
        return out or None
    chosen: dict[str, dict[str, str]] = {}
    for (_, section, resource), value in zip(RESOURCE_ANNOTATIONS, settings.resources, strict=True):
        if value is not None:
            chosen.setdefault(section, {})[resource] = value
    return chosen


def _proxy_config(annotations: Mapping[str, str], config: InjectorConfig) -> tuple[dict[str, Any], bool]:
    """The pod's ProxyConfig overrides (proxy.istio.io/config) and the effective hold setting."""
    raw = annotations.get(ann.PROXY_CONFIG)
    body: Any = {}
    if raw is not None:
        from injector import yamlio

        # A small mapping: these bounds (config ``limits``) refuse YAML bombs (aliases, nesting)
        # before they cost memory; the error names the limit.
        bounds = config.model.limits
        limits = yamlio.YamlLimits(
            max_bytes=bounds.proxy_config_max_bytes, max_depth=bounds.proxy_config_max_depth, aliases=False
        )
        try:
            body = yamlio.load_one(str(raw), source=f"annotation {ann.PROXY_CONFIG}", limits=limits) or {}
        except yamlio.YamlLimitError as err:  # names the source (the annotation) and the limit
            raise Rejected(ReasonCode.INVALID_ANNOTATION, str(err)) from None
        except (ValueError, yaml.YAMLError, RecursionError):
            raise Rejected(
                ReasonCode.INVALID_ANNOTATION, f"annotation {ann.PROXY_CONFIG}: not valid YAML/JSON"
            ) from None
        if not isinstance(body, dict):
            raise Rejected(
                ReasonCode.INVALID_ANNOTATION, f"annotation {ann.PROXY_CONFIG}: expected a mapping"
            )
    hold = config.pod_defaults.hold
    if "holdApplicationUntilProxyStarts" in body:
        value = body["holdApplicationUntilProxyStarts"]
        if not isinstance(value, bool):
            raise Rejected(
                ReasonCode.INVALID_ANNOTATION,
                f"annotation {ann.PROXY_CONFIG}: holdApplicationUntilProxyStarts must be true or false",
            )
        hold = value
    return body, hold


def _with_hold(proxy_config: Mapping[str, Any], hold: bool) -> dict[str, Any]:
    out = dict(proxy_config)
    if hold:
        out["holdApplicationUntilProxyStarts"] = True
    return out


def _json_sorted(value: Any) -> str:
    return compact_json(value, sort=True)

