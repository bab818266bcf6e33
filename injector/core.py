"""The injection core: ``inject(obj, config=...)`` -> InjectionResult. Pure: no I/O, no clock.

Flow for one pod (or a workload's pod template): decide (policy) -> undo an earlier injection
(re-injection) -> validate annotations -> render the selected templates -> lay them into the
pod -> JSON Patch against the input. The mutated object shares every unchanged subtree with the
input (treat both as read-only); that, and a linear diff, keep large pods cheap.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import yaml

from cni import annotations as ann
from injector import envoy_bootstrap
from injector.config import InjectorConfig, default_config
from injector.merge import deep_merge, merge_keyed, overlay_container
from injector.patch import create_patch
from injector.policy import decide
from injector.probes import parse_probers, probers_json, restore_probes, rewrite_probes
from injector.quantity import parse_quantity
from injector.result import Decision, InjectionResult, Reason, ReasonCode
from injector.shape import pod_shape_problem
from injector.template import Template, TemplateError, TemplateOptions, merge_options

PROXY_NAME = "istio-proxy"
VALIDATION_NAME = "istio-validation"
REDIRECT_INIT_NAME = "istio-init"

#: The downward-API volume the redirect init container reads the pod's annotations from.
PODINFO_MOUNT = "/etc/istio/pod"
PODINFO_VOLUME: dict[str, Any] = {
    "name": "istio-podinfo",
    "downwardAPI": {
        "items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
        ]
    },
}

TEMPLATES = "inject.istio.io/templates"
NATIVE_SIDECAR = "sidecar.istio.io/nativeSidecar"
REWRITE_PROBES = "sidecar.istio.io/rewriteAppHTTPProbers"
PROXY_IMAGE = "sidecar.istio.io/proxyImage"
PROXY_CPU = "sidecar.istio.io/proxyCPU"
PROXY_MEMORY = "sidecar.istio.io/proxyMemory"
PROXY_CPU_LIMIT = "sidecar.istio.io/proxyCPULimit"
PROXY_MEMORY_LIMIT = "sidecar.istio.io/proxyMemoryLimit"
PROXY_CONFIG = "proxy.istio.io/config"
LOG_LEVEL = "sidecar.istio.io/logLevel"
COMPONENT_LOG_LEVEL = "sidecar.istio.io/componentLogLevel"
PROMETHEUS_MERGE = "prometheus.istio.io/merge-metrics"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
PROM_SCRAPE = "prometheus.io/scrape"
PROM_PORT = "prometheus.io/port"
PROM_PATH = "prometheus.io/path"
PROM_STATS_PATH = "/stats/prometheus"

#: Proxy env values computed from the pod: on re-injection they are recomputed, never kept.
DERIVED_ENV = frozenset(
    {
        "ISTIO_META_APP_CONTAINERS",
        "ISTIO_META_POD_PORTS",
        "ISTIO_KUBE_APP_PROBERS",
        "ISTIO_PROMETHEUS_ANNOTATIONS",
        "ISTIO_META_WORKLOAD_NAME",
        "ISTIO_META_OWNER",
        "PROXY_CONFIG",
        "ISTIO_META_INTERCEPTION_MODE",
    }
)
_LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
_TRUE = ("true", "y", "yes", "on", "1")
_FALSE = ("false", "n", "no", "off", "0")

#: kind -> path (as keys) from the object to its pod template.
WORKLOAD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_PLURALS = {
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "DaemonSet": "daemonsets",
    "ReplicaSet": "replicasets",
    "ReplicationController": "replicationcontrollers",
    "Job": "jobs",
    "CronJob": "cronjobs",
    "Pod": "pods",
}


def _json(value: Any, *, sort: bool = False) -> str:
    """Compact JSON (what json.dumps gives with separators=(",", ":")), via orjson for speed."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort else 0).decode()
    except TypeError:  # e.g. an integer beyond 64 bits in hand-written input: json copes
        return json.dumps(value, sort_keys=sort, separators=(",", ":"), ensure_ascii=False, default=str)


_STATUS_JSON: dict[tuple[Any, ...], str] = {}


def _status_json(**fields: Any) -> str:
    """The status annotation text; nearly every pod gets one of a handful, so it is memoised
    (keyed on plain tuples: cheaper to hash than the record)."""
    key = tuple(fields.values())
    found = _STATUS_JSON.get(key)
    if found is None:
        if len(_STATUS_JSON) >= 1024:
            _STATUS_JSON.clear()
        found = _STATUS_JSON[key] = ann.InjectionStatus(**fields).to_json()
    return found


class _Rejected(Exception):
    def __init__(self, code: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(code, message)


@dataclass
class _Workload:
    """Who owns the pod, for workload name, owner and canonical-name defaults."""

    kind: str
    api_version: str
    name: str


@dataclass
class _PodView:
    metadata: dict[str, Any]
    spec: dict[str, Any]
    warnings: list[Reason] = field(default_factory=list)


# --- public entry point -------------------------------------------------------------------------


def inject(
    obj: Mapping[str, Any],
    *,
    config: InjectorConfig | None = None,
    namespace_labels: Mapping[str, str] | None = None,
    namespace: str | None = None,
) -> InjectionResult:
    """Inject a Pod, a workload's pod template, or every item of a List.

    ``namespace_labels`` None means the caller (the API server) already applied the webhook
    selectors; pass the namespace's labels to have them evaluated here (dry-run, CLI, audit).
    ``namespace`` defaults to the object's own; "default" when neither is known.
    """
    config = config or default_config()
    if not isinstance(obj, dict):  # plain dicts: ABC isinstance checks cost microseconds each
        return _malformed(obj, "Unknown", "the object must be a mapping")
    kind = obj.get("kind") or "Pod"
    if not isinstance(kind, str):
        return _malformed(obj, "Unknown", "kind must be a string")
    if kind == "List":
        if not isinstance(obj.get("items") or [], list) or not all(
            isinstance(i, dict) for i in obj.get("items") or []
        ):
            return _malformed(obj, kind, "items must be a list of objects")
        return _inject_list(obj, config=config, namespace_labels=namespace_labels, namespace=namespace)
    if kind == "Pod":
        path: tuple[str, ...] = ()
    elif kind in WORKLOAD_TEMPLATE_PATHS:
        path = WORKLOAD_TEMPLATE_PATHS[kind]
    else:
        return InjectionResult(
            Decision.PASSTHROUGH,
            [Reason(ReasonCode.UNSUPPORTED_KIND, f"{kind} has no pod template; left unchanged")],
            mutated=dict(obj),
            kind=kind,
        )
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict) or not all(
        isinstance(meta.get(k), (str, type(None))) for k in ("name", "generateName", "namespace")
    ):
        return _malformed(obj, kind, "metadata must be a mapping with string name and namespace")
    ns = namespace or meta.get("namespace") or "default"
    template: Any = obj
    for depth, key in enumerate(path):
        template = template.get(key)
        if not isinstance(template, dict):
            return _malformed(obj, kind, f"{'.'.join(path[: depth + 1])} must be a mapping")
    problem = pod_shape_problem(template)
    if problem:
        where = ".".join(path)
        return _malformed(obj, kind, f"{where}: {problem}" if where else problem)
    if kind == "Pod":
        workload = _pod_workload(meta)
    else:
        workload = _Workload(kind, obj.get("apiVersion") or "", meta.get("name") or "")
    result = _inject_pod(
        template,
        namespace=ns,
        namespace_labels=namespace_labels,
        config=config,
        workload=workload,
        pod_name=meta.get("name") or meta.get("generateName") or "",
    )
    result.kind = kind
    if result.decision is Decision.INJECT and path:
        result.mutated = _replace_at(obj, path, result.mutated)
    elif result.decision is not Decision.INJECT:
        result.mutated = dict(obj)
    if result.decision is Decision.INJECT:
        spec_path = "".join(f"/{part}" for part in (*path, "spec"))
        result.patch = create_patch(obj, result.mutated, whole_fields_at=spec_path)
        if not result.patch and result.reasons[0].code is ReasonCode.INJECTED:
            result.reasons[0] = Reason(ReasonCode.ALREADY_INJECTED, "already injected; nothing to change")
    return result


def _malformed(obj: Any, kind: str, problem: str) -> InjectionResult:
    mutated = dict(obj) if isinstance(obj, dict) else {}
    return InjectionResult(
        Decision.REJECT, [Reason(ReasonCode.MALFORMED_OBJECT, problem)], mutated=mutated, kind=kind
    )


def inject_many(
    objects: list[Mapping[str, Any]],
    *,
    config: InjectorConfig | None = None,
    namespace_labels: Mapping[str, str] | None = None,
    namespace: str | None = None,
) -> list[InjectionResult]:
    """``inject`` for each object of a multi-document input, in order."""
    return [inject(o, config=config, namespace_labels=namespace_labels, namespace=namespace) for o in objects]


def _replace_at(obj: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = dict(obj)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _replace_at(obj.get(path[0]) or {}, path[1:], value)
    return out


def _inject_list(obj: Mapping[str, Any], **kwargs: Any) -> InjectionResult:
    items = obj.get("items") or []
    children = [inject(item, **kwargs) for item in items]
    mutated = dict(obj)
    mutated["items"] = [c.mutated for c in children]
    decisions = {c.decision for c in children}
    if Decision.REJECT in decisions:
        decision = Decision.REJECT
    elif Decision.INJECT in decisions:
        decision = Decision.INJECT
    elif Decision.SKIP in decisions:
        decision = Decision.SKIP
    else:
        decision = Decision.PASSTHROUGH
    reasons = [c.reason for c in children if c.decision is decision] or [
        Reason(ReasonCode.UNSUPPORTED_KIND, "empty List")
    ]
    warnings = [w for c in children for w in c.warnings]
    result = InjectionResult(decision, reasons, warnings, kind="List")
    result.items = children
    if decision is Decision.INJECT:
        result.mutated = mutated
        result.patch = create_patch(obj, mutated)
    else:
        result.mutated = dict(obj)
    return result


# --- one pod ------------------------------------------------------------------------------------


def _pod_workload(meta: Mapping[str, Any]) -> _Workload:
    """The controller that owns a pod (a Deployment for ReplicaSet-owned pods), else the pod itself."""
    for ref in meta.get("ownerReferences") or ():
        if not ref.get("controller"):
            continue
        kind, name, api = (str(ref.get(k) or "") for k in ("kind", "name", "apiVersion"))
        template_hash = (meta.get("labels") or {}).get("pod-template-hash")
        if kind == "ReplicaSet" and template_hash and name.endswith("-" + template_hash):
            return _Workload("Deployment", "apps/v1", name[: -len(template_hash) - 1])
        return _Workload(kind, api, name)
    name = meta.get("name") or (meta.get("generateName") or "").rstrip("-")
    return _Workload("Pod", "v1", name)


def _inject_pod(
    pod: Mapping[str, Any],
    *,
    namespace: str,
    namespace_labels: Mapping[str, str] | None,
    config: InjectorConfig,
    workload: _Workload,
    pod_name: str,
) -> InjectionResult:
    meta: dict[str, Any] = pod.get("metadata") or {}
    spec: dict[str, Any] = pod.get("spec") or {}
    outcome = decide(
        metadata=meta, spec=spec, namespace=namespace, namespace_labels=namespace_labels, config=config
    )
    if outcome.decision is not Decision.INJECT:
        return InjectionResult(outcome.decision, [outcome.reason], outcome.warnings, mutated=dict(pod))
    try:
        view = _PodView(dict(meta), dict(spec))
        previous = _uninject(view, config)
        mutated_meta, mutated_spec = _render_into(
            view, previous, namespace=namespace, config=config, workload=workload, pod_name=pod_name
        )
    except _Rejected as rejected:
        return InjectionResult(Decision.REJECT, [rejected.reason], outcome.warnings, mutated=dict(pod))
    mutated = dict(pod)
    mutated["metadata"] = mutated_meta
    mutated["spec"] = mutated_spec
    reasons = [Reason(ReasonCode.INJECTED, "sidecar injected"), outcome.reason]
    return InjectionResult(Decision.INJECT, reasons, outcome.warnings + view.warnings, mutated=mutated)


def _named(items: Any) -> list[dict[str, Any]]:
    return [i for i in items or () if isinstance(i, dict)]


def _env_value(container: Mapping[str, Any], name: str) -> str | None:
    for item in container.get("env") or ():
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get("value")
            return value if isinstance(value, str) else None
    return None


@dataclass
class _Previous:
    """What an earlier injection left, turned back into user input (overlays) and records.

    On a reinvocation the API server sends our own output back with its defaults filled in
    (terminationMessagePath, volume defaultMode, fieldRef apiVersion, the token mount...): the
    old containers and volumes are kept as overlays so those fields survive, and the volume
    order is remembered so ours go back where they were.
    """

    overlays: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: container name -> env name -> the old item of a pod-derived variable (kept if unchanged).
    derived_env: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: volume name -> our old volume, laid over the rendered one.
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the pod's volumes before ours were taken out (None: not a re-injection).
    volume_order: list[Any] | None = None


def _uninject(view: _PodView, config: InjectorConfig) -> _Previous:
    """Take out what the status annotation says we injected, restoring probes and Prometheus annotations.

    When the pod was injected with the current config, injected containers come back as
    overlays without their pod-derived env, so a user's ``istio-proxy`` customisation survives
    and everything computed from the pod is recomputed.
    """
    previous = _Previous()
    annotations = view.metadata.get("annotations") or {}
    raw = annotations.get(ann.STATUS)
    if raw is None:
        return previous
    try:
        status = ann.parse_status(raw)
    except ann.AnnotationError as err:
        raise _Rejected(ReasonCode.INVALID_ANNOTATION, str(err)) from None
    injected_containers = set(status.containers)
    injected_inits = set(status.init_containers)
    spec = view.spec
    proxy = None
    for item in _named(spec.get("containers")) + _named(spec.get("initContainers")):
        if item.get("name") == PROXY_NAME and item.get("name") in injected_containers | injected_inits:
            proxy = item
    status_port = _status_port_hint(annotations, config)
    # Rendered with this very config (an API-server reinvocation, a second kube-inject): keep
    # what was injected as the user's overlay. Rendered with another config (or by Istio):
    # render afresh, or the old proxy would outlive the config that replaced it.
    keep_overlays = status.config_hash == config.config_hash
    probers = parse_probers(_env_value(proxy, "ISTIO_KUBE_APP_PROBERS")) if proxy else {}

    def strip(key: str, names: set[str]) -> None:
        if key not in spec:
            return
        kept = []
        for item in spec.get(key) or ():
            name = item.get("name") if isinstance(item, dict) else None
            if name in names:
                if keep_overlays:
                    over = {k: v for k, v in item.items() if k != "restartPolicy"}
                    if "env" in over:
                        env = []
                        for e in over["env"]:
                            if isinstance(e, dict) and e.get("name") in DERIVED_ENV:
                                previous.derived_env.setdefault(name, {})[e["name"]] = e
                            else:
                                env.append(e)
                        over["env"] = env
                    previous.overlays[name] = over
                continue
            if probers and key == "containers":
                item = restore_probes(item, status_port, probers) or item
            kept.append(item)
        spec[key] = kept

    strip("containers", injected_containers)
    strip("initContainers", injected_inits)
    if "volumes" in spec:
        ours = set(status.volumes)
        previous.volume_order = list(spec["volumes"] or ())
        kept_volumes = []
        for v in spec["volumes"] or ():
            if v.get("name") not in ours:
                kept_volumes.append(v)
            elif keep_overlays:
                previous.volumes[v["name"]] = v
        spec["volumes"] = kept_volumes
    if "imagePullSecrets" in spec:
        spec["imagePullSecrets"] = [
            s for s in spec["imagePullSecrets"] or () if s.get("name") not in set(status.image_pull_secrets)
        ]
    annotations = dict(annotations)
    del annotations[ann.STATUS]
    if (
        annotations.get(PROM_PATH) == PROM_STATS_PATH
        and annotations.get(PROM_PORT) == str(status_port)
        and annotations.get(PROM_SCRAPE) == "true"
    ):
        for key in (PROM_SCRAPE, PROM_PORT, PROM_PATH):
            del annotations[key]
        saved = _env_value(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS") if proxy else None
        if saved:
            try:
                scrape = json.loads(saved)
            except ValueError:
                scrape = {}
            for key, name in (("scrape", PROM_SCRAPE), ("path", PROM_PATH), ("port", PROM_PORT)):
                if isinstance(scrape, dict) and scrape.get(key):
                    annotations[name] = str(scrape[key])
    view.metadata["annotations"] = annotations
    return previous


def _status_port_hint(annotations: Mapping[str, str], config: InjectorConfig) -> int:
    try:
        return ann.parse_port(ann.STATUS_PORT, annotations[ann.STATUS_PORT])
    except (KeyError, ann.AnnotationError):
        return config.traffic_defaults.status_port


def _parse_bool(key: str, value: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _Rejected(ReasonCode.INVALID_ANNOTATION, f"annotation {key}={value!r}: expected true or false")


def _effective_uid(container: Mapping[str, Any], pod_security: Mapping[str, Any]) -> Any:
    own = (container.get("securityContext") or {}).get("runAsUser")
    return own if own is not None else pod_security.get("runAsUser")


def _default_resources(config: InjectorConfig) -> dict[str, Any] | None:
    defaults = config.proxy.resources
    out: dict[str, Any] = {}
    if defaults.requests:
        out["requests"] = dict(defaults.requests)
    if defaults.limits:
        out["limits"] = dict(defaults.limits)
    return out or None


def _resources(annotations: Mapping[str, str], config: InjectorConfig) -> dict[str, Any] | None:
    keys = (
        (PROXY_CPU, "requests", "cpu"),
        (PROXY_MEMORY, "requests", "memory"),
        (PROXY_CPU_LIMIT, "limits", "cpu"),
        (PROXY_MEMORY_LIMIT, "limits", "memory"),
    )
    if not any(k in annotations for k, _, _ in keys):
        return _static_context(config)["defaultResources"]
    # Any resource annotation replaces the defaults entirely (Istio's behaviour).
    out: dict[str, dict[str, str]] = {}
    parsed: dict[tuple[str, str], Any] = {}
    for key, section, resource in keys:
        if key not in annotations:
            continue
        value = str(annotations[key]).strip()
        try:
            parsed[(section, resource)] = parse_quantity(value)
        except ValueError as err:
            raise _Rejected(ReasonCode.INVALID_ANNOTATION, f"annotation {key}={value!r}: {err}") from None
        out.setdefault(section, {})[resource] = value
    for resource in ("cpu", "memory"):
        request, limit = parsed.get(("requests", resource)), parsed.get(("limits", resource))
        if request is not None and limit is not None and request > limit:
            raise _Rejected(
                ReasonCode.INVALID_ANNOTATION,
                f"proxy {resource} request {out['requests'][resource]} exceeds its limit "
                f"{out['limits'][resource]}",
            )
    return out


_LABEL_VALUE_END = re.compile(r"[^A-Za-z0-9]+$")
_LABEL_VALUE_START = re.compile(r"^[^A-Za-z0-9]+")


@functools.lru_cache(maxsize=4096)
def _label_value(text: str) -> str:
    """Truncate to 63 characters and trim what a label value may not start or end with."""
    text = _LABEL_VALUE_START.sub("", text[:63])
    text = _LABEL_VALUE_END.sub("", text)
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def _proxy_config(annotations: Mapping[str, str], config: InjectorConfig) -> tuple[dict[str, Any], bool]:
    """The pod's ProxyConfig overrides (proxy.istio.io/config) and the effective hold setting."""
    raw = annotations.get(PROXY_CONFIG)
    body: dict[str, Any] = {}
    if raw is not None:
        try:
            body = yaml.safe_load(raw) or {}
        except yaml.YAMLError:
            raise _Rejected(
                ReasonCode.INVALID_ANNOTATION, f"annotation {PROXY_CONFIG}: not valid YAML/JSON"
            ) from None
        if not isinstance(body, dict):
            raise _Rejected(ReasonCode.INVALID_ANNOTATION, f"annotation {PROXY_CONFIG}: expected a mapping")
    hold = config.proxy.hold_application_until_proxy_starts
    if "holdApplicationUntilProxyStarts" in body:
        value = body["holdApplicationUntilProxyStarts"]
        if not isinstance(value, bool):
            raise _Rejected(
                ReasonCode.INVALID_ANNOTATION,
                f"annotation {PROXY_CONFIG}: holdApplicationUntilProxyStarts must be true or false",
            )
        hold = value
    return body, hold


_STATIC_CONTEXT: dict[int, tuple[InjectorConfig, dict[str, Any]]] = {}


def _static_context(config: InjectorConfig) -> dict[str, Any]:
    """The parts of the template context that depend on the config only, computed once per config."""
    found = _STATIC_CONTEXT.get(id(config))
    if found is not None and found[0] is config:
        return found[1]
    mesh = config.mesh
    static = {
        "mesh": {
            "revision": mesh.revision,
            "meshID": mesh.mesh_id,
            "clusterID": mesh.cluster_id,
            "trustDomain": mesh.trust_domain,
            "caAddress": mesh.ca_address,
            "discoveryAddress": mesh.discovery_address,
        },
        "envoyBootstrap": envoy_bootstrap.bootstrap_json(
            envoy_bootstrap.BootstrapSettings(access_log=config.proxy.envoy_access_log)
        ),
        "choices": {},
        "captures": {},
        "defaultResources": _default_resources(config),
    }
    if len(_STATIC_CONTEXT) > 16:
        _STATIC_CONTEXT.clear()
    _STATIC_CONTEXT[id(config)] = (config, static)
    return static


#: Template value groups that do not depend on the pod: rendered once per distinct value set.
_FIXED_GROUPS = ("proxy", "mesh")

_TRAFFIC_CACHE: dict[tuple[Any, ...], tuple[ann.TrafficDefaults, ann.ResolvedTraffic]] = {}


def _resolve_traffic(annotations: Mapping[str, str], config: InjectorConfig) -> ann.ResolvedTraffic:
    """resolve_traffic, memoised: most pods carry the same few traffic annotations (usually none)."""
    defaults = config.traffic_defaults
    present = tuple((k, annotations[k]) for k in ann.TRAFFIC_ANNOTATIONS if k in annotations)
    key = (id(defaults), present)
    cached = _TRAFFIC_CACHE.get(key)
    if cached is not None and cached[0] is defaults:
        return cached[1]
    try:
        found = ann.resolve_traffic(annotations, defaults)
    except ann.AnnotationError as err:
        raise _Rejected(ReasonCode.INVALID_TRAFFIC_ANNOTATION, str(err)) from None
    if len(_TRAFFIC_CACHE) >= 4096:
        _TRAFFIC_CACHE.clear()
    _TRAFFIC_CACHE[key] = (defaults, found)
    return found


@dataclass(frozen=True)
class _TemplateChoice:
    templates: tuple[Template, ...]
    options: TemplateOptions
    container_names: frozenset[str]
    init_container_names: frozenset[str]


def _select_templates(annotations: Mapping[str, str], config: InjectorConfig) -> _TemplateChoice:
    """The templates a pod asks for (or the defaults), memoised per config and annotation value."""
    raw = annotations.get(TEMPLATES)
    cache = _static_context(config)["choices"]
    found = cache.get(raw)
    if found is not None:
        return found
    names = (
        [n.strip() for n in raw.split(",") if n.strip()]
        if raw is not None
        else list(config.model.default_templates)
    )
    if not names:
        raise _Rejected(ReasonCode.UNKNOWN_TEMPLATE, f"annotation {TEMPLATES}={raw!r} names no template")
    out = []
    for name in names:
        template = config.templates.get(name)
        if template is None:
            raise _Rejected(
                ReasonCode.UNKNOWN_TEMPLATE,
                f"annotation {TEMPLATES}={raw!r}: unknown template {name!r}; "
                f"known: {', '.join(sorted(config.templates))}",
            )
        out.append(template)
    found = _TemplateChoice(
        templates=tuple(out),
        options=merge_options(out),
        container_names=frozenset(n for t in out for n in t.container_names),
        init_container_names=frozenset(n for t in out for n in t.init_container_names),
    )
    if len(cache) < 256:
        cache[raw] = found
    return found


def _capture_init(mode: str, config: InjectorConfig) -> dict[str, Any] | None:
    proxy = config.proxy
    if mode == ann.MODE_NONE or proxy.capture == "none":
        return None
    small = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}}
    if proxy.capture == "init":
        # Same redirect code as the CNI plugin, from the same resolved annotations.
        return {
            "name": REDIRECT_INIT_NAME,
            "image": proxy.cni_image,
            "imagePullPolicy": proxy.image_pull_policy,
            "command": ["mesh-cni", "redirect"],
            # The pod's own (resolved) annotations through the downward API, as the CNI reads them.
            "args": ["--annotations-file", f"{PODINFO_MOUNT}/annotations"],
            "volumeMounts": [{"mountPath": PODINFO_MOUNT, "name": PODINFO_VOLUME["name"], "readOnly": True}],
            "resources": small,
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
                "privileged": False,
                "readOnlyRootFilesystem": True,
                "runAsGroup": 0,
                "runAsNonRoot": False,
                "runAsUser": 0,
            },
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
    return {
        "name": VALIDATION_NAME,
        "image": proxy.cni_image,
        "imagePullPolicy": proxy.image_pull_policy,
        "command": ["mesh-cni", "validate"],
        "resources": small,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": proxy.gid,
            "runAsNonRoot": True,
            "runAsUser": proxy.uid,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _render_into(
    view: _PodView,
    previous: _Previous,
    *,
    namespace: str,
    config: InjectorConfig,
    workload: _Workload,
    pod_name: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    meta, spec = view.metadata, view.spec
    annotations: dict[str, str] = dict(meta.get("annotations") or {})
    labels: dict[str, str] = dict(meta.get("labels") or {})

    choice = _select_templates(annotations, config)
    templates, options = choice.templates, choice.options
    template_containers, template_inits = choice.container_names, choice.init_container_names
    traffic = _resolve_traffic(annotations, config)
    plan = traffic.plan
    if plan.capture_dns and not options.dns_proxy and config.proxy.capture != "none":
        raise _Rejected(
            ReasonCode.INVALID_ANNOTATION,
            f"annotation {ann.CAPTURE_DNS}=true (or captureDNS in the config): template(s) "
            f"{', '.join(t.name for t in templates)} have no DNS proxy on port {ann.DNS_CAPTURE_PORT}, "
            "so all DNS would fail; use the sidecar template or set it to false",
        )

    user_containers = _named(spec.get("containers"))
    user_inits = _named(spec.get("initContainers"))
    overlays = dict(previous.overlays)
    app_containers = []
    for c in user_containers:
        if c.get("name") in template_containers or c.get("name") == PROXY_NAME:
            overlays[c["name"]] = overlay_container(overlays.get(c["name"], {}), c)
        else:
            app_containers.append(c)
    plain_inits = []
    for c in user_inits:
        if c.get("name") in template_inits or c.get("name") in (
            PROXY_NAME,
            VALIDATION_NAME,
            REDIRECT_INIT_NAME,
        ):
            overlays[c["name"]] = overlay_container(overlays.get(c["name"], {}), c)
        else:
            plain_inits.append(c)

    pod_security = spec.get("securityContext") or {}
    captured = plan.redirects and config.proxy.capture != "none"  # without a redirect nothing is bypassed
    for c in app_containers if captured else ():
        if _effective_uid(c, pod_security) == plan.proxy_uid:
            raise _Rejected(
                ReasonCode.PROXY_UID_CONFLICT,
                f"container {c.get('name')!r} runs as UID {plan.proxy_uid}, the proxy's UID: its "
                "traffic would bypass the sidecar; run it as another user",
            )

    image = annotations.get(PROXY_IMAGE)
    if image is not None and not str(image).strip():
        raise _Rejected(ReasonCode.INVALID_ANNOTATION, f"annotation {PROXY_IMAGE} is empty")
    log_level = annotations.get(LOG_LEVEL, config.proxy.log_level)
    if log_level not in _LOG_LEVELS:
        raise _Rejected(
            ReasonCode.INVALID_ANNOTATION,
            f"annotation {LOG_LEVEL}={log_level!r}: expected one of {', '.join(_LOG_LEVELS)}",
        )
    native = config.native_sidecars_default
    if NATIVE_SIDECAR in annotations:
        native = _parse_bool(NATIVE_SIDECAR, annotations[NATIVE_SIDECAR])
    rewrite = config.proxy.rewrite_app_http_probers
    if REWRITE_PROBES in annotations:
        rewrite = _parse_bool(REWRITE_PROBES, annotations[REWRITE_PROBES])
    prom_merge = config.proxy.enable_prometheus_merge
    if PROMETHEUS_MERGE in annotations:
        prom_merge = _parse_bool(PROMETHEUS_MERGE, annotations[PROMETHEUS_MERGE])
    proxy_config, hold = _proxy_config(annotations, config)
    resources = _resources(annotations, config)

    # Probes of app containers -> the agent's status port.
    probers: dict[str, Any] = {}
    if rewrite and options.rewrite_probes:
        rewritten = []
        for c in app_containers:
            new = rewrite_probes(c, plan.status_port, probers)
            rewritten.append(new if new is not None else c)
        app_containers = rewritten
        for path, entry in probers.items():
            port = (entry.get("httpGet") or entry.get("tcpSocket") or {}).get("port")
            if isinstance(port, str):
                view.warnings.append(
                    Reason(
                        ReasonCode.UNRESOLVED_PROBE_PORT,
                        f"probe {path} uses port {port!r}, which no container port names",
                    )
                )

    # Prometheus: the agent scrapes the app and serves both on the status port.
    prometheus_saved = None
    if options.prometheus_merge and prom_merge:
        scrape_value = str(annotations.get(PROM_SCRAPE, "true")).strip().lower()
        scraped = scrape_value not in _FALSE
        if scraped and annotations.get(PROM_PORT) != str(plan.status_port):
            if any(k in annotations for k in (PROM_SCRAPE, PROM_PATH, PROM_PORT)):
                prometheus_saved = json.dumps(
                    {
                        "scrape": annotations.get(PROM_SCRAPE, ""),
                        "path": annotations.get(PROM_PATH, ""),
                        "port": annotations.get(PROM_PORT, ""),
                    },
                    separators=(",", ":"),
                )
            annotations[PROM_PORT] = str(plan.status_port)
            annotations[PROM_PATH] = PROM_STATS_PATH
            annotations[PROM_SCRAPE] = "true"

    static = _static_context(config)
    owner_kind = _PLURALS.get(workload.kind, workload.kind.lower() + "s")
    api = workload.api_version or "v1"
    canonical_name = (
        labels.get(CANONICAL_NAME)
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload.name
        or pod_name
    )
    canonical_rev = (
        labels.get(CANONICAL_REVISION)
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    pod_ports = [p for c in app_containers for p in c.get("ports") or ()]
    hold_effective = hold and not native and bool(options.hold_command)
    context = {
        "proxy": {
            "name": PROXY_NAME,
            "image": image or config.proxy.image,
            "envoyImage": image or config.proxy.envoy_image,
            "imagePullPolicy": config.proxy.image_pull_policy,
            "uid": plan.proxy_uid,
            "gid": plan.proxy_gid,
            "statusPort": plan.status_port,
            "healthPort": ann.HEALTH_PORT,
            "prometheusPort": ann.PROMETHEUS_PORT,
            "adminPort": envoy_bootstrap.ADMIN_PORT,
            "resources": resources,
            "lifecycle": {"postStart": {"exec": {"command": list(options.hold_command)}}}
            if hold_effective
            else None,
            "logLevel": log_level,
            "componentLogLevel": annotations.get(COMPONENT_LOG_LEVEL, config.proxy.component_log_level),
            "config": _json(_with_hold(proxy_config, hold), sort=True) if proxy_config or hold else "{}",
            "interceptionMode": plan.mode,
            "envoyBootstrap": static["envoyBootstrap"],
        },
        "pod": {
            "name": pod_name,
            "namespace": namespace,
            "serviceAccount": spec.get("serviceAccountName") or "default",
            "appContainers": ",".join(c.get("name", "") for c in app_containers),
            "podPorts": _json(pod_ports),
            "appProbers": probers_json(probers),
            "prometheusAnnotations": prometheus_saved,
            "workloadName": workload.name or pod_name,
            "owner": f"kubernetes://apis/{api}/namespaces/{namespace}/{owner_kind}/{workload.name}"
            if workload.name
            else None,
            "canonicalName": _label_value(canonical_name) or None,
            "canonicalRevision": _label_value(canonical_rev) or "latest",
        },
        "mesh": static["mesh"],
    }
    proxy_ctx = context["proxy"]
    # Identifies every value of the proxy and mesh groups (the mesh group and the rest of the
    # proxy group are fixed by the config, which owns these template objects).
    fixed_key = (
        proxy_ctx["image"],
        proxy_ctx["envoyImage"],
        proxy_ctx["logLevel"],
        proxy_ctx["componentLogLevel"],
        proxy_ctx["config"],
        plan.proxy_uid,
        plan.proxy_gid,
        plan.status_port,
        plan.mode,
        tuple(annotations.get(k) for k in (PROXY_CPU, PROXY_MEMORY, PROXY_CPU_LIMIT, PROXY_MEMORY_LIMIT)),
        options.hold_command if hold_effective else None,
    )
    rendered: dict[str, Any] = {}
    try:
        for template in templates:
            part = template.render_fixed(context, _FIXED_GROUPS, fixed_key)
            rendered = deep_merge(rendered, part) if rendered else part
    except TemplateError as err:
        raise _Rejected(ReasonCode.UNKNOWN_TEMPLATE, f"template rendering failed: {err}") from None
    r_meta = rendered.get("metadata") or {}
    r_spec = rendered.get("spec") or {}

    # The API server's ServiceAccount plugin mounts the token into every container that lacks
    # it; it re-runs after a webhook changes the pod, and would then change ours, which calls us
    # again (reinvocationPolicy IfNeeded). Mount it as it would, so nothing changes after us.
    token_mount = _token_mount(app_containers, plain_inits)

    def finish(container: dict[str, Any]) -> dict[str, Any]:
        name = container.get("name")
        over = overlays.get(name)
        out = overlay_container(container, over) if over else container
        derived = previous.derived_env.get(name) if previous.derived_env else None
        if derived:
            out = _keep_derived_env(out, derived)
        if token_mount is not None:
            out = _with_mount(out, token_mount)
        return out

    r_containers = [finish(c) for c in _named(r_spec.get("containers"))]
    r_inits = [finish(c) for c in _named(r_spec.get("initContainers"))]
    proxy = next((c for c in r_containers if c.get("name") == PROXY_NAME), None)
    others = [c for c in r_containers if c is not proxy]
    captures = _static_context(config)["captures"]
    if plan.mode not in captures:
        captures[plan.mode] = _capture_init(plan.mode, config)
    capture = captures[plan.mode]
    capture_inits = [finish(capture)] if capture else []

    if native and proxy is not None:
        proxy = dict(proxy)
        proxy["restartPolicy"] = "Always"
        init_list = [*capture_inits, proxy, *r_inits, *plain_inits]
        container_list = app_containers + others
    else:
        init_list = capture_inits + r_inits + plain_inits
        if proxy is None:
            container_list = app_containers + others
        elif hold_effective:
            container_list = [proxy, *app_containers, *others]
        else:
            container_list = [*app_containers, *others, proxy]

    new_spec = dict(spec)
    new_spec["containers"] = container_list
    if init_list or "initContainers" in spec:
        new_spec["initContainers"] = init_list
    r_volumes = _named(r_spec.get("volumes"))
    if capture is not None and capture["name"] == REDIRECT_INIT_NAME:
        r_volumes = merge_keyed([PODINFO_VOLUME], r_volumes, "name")
    existing_volumes = {v.get("name") for v in _named(spec.get("volumes"))}
    added_volumes = [v for v in r_volumes if v.get("name") not in existing_volumes]
    if previous.volumes:
        added_volumes = [
            deep_merge(v, previous.volumes[v["name"]]) if v.get("name") in previous.volumes else v
            for v in added_volumes
        ]
    if previous.volume_order is not None:
        kept_volumes = spec.get("volumes") or []
        new_spec["volumes"] = _volumes_in_place(previous.volume_order, kept_volumes, added_volumes)
    elif added_volumes or "volumes" in spec:
        new_spec["volumes"] = list(spec.get("volumes") or ()) + added_volumes
    secrets = _named(r_spec.get("imagePullSecrets")) + [{"name": n} for n in config.mesh.image_pull_secrets]
    existing_secrets = {s.get("name") for s in _named(spec.get("imagePullSecrets"))}
    added_secrets = merge_keyed([], [s for s in secrets if s.get("name") not in existing_secrets], "name")
    if added_secrets or "imagePullSecrets" in spec:
        new_spec["imagePullSecrets"] = list(spec.get("imagePullSecrets") or ()) + added_secrets
    # Drop keys we created empty so the output matches what the API server would store.
    for key in ("initContainers", "volumes", "imagePullSecrets"):
        if key in new_spec and not new_spec[key] and key not in spec:
            del new_spec[key]
    for key in ("initContainers", "volumes", "imagePullSecrets"):
        if key in spec and spec[key] == new_spec.get(key):
            new_spec[key] = spec[key]

    for key, value in (r_meta.get("labels") or {}).items():
        labels.setdefault(key, value)
    for key, value in (r_meta.get("annotations") or {}).items():
        annotations.setdefault(key, value)
    annotations.update(config.model.injected_annotations)
    annotations.update(traffic.annotations)
    if app_containers and DEFAULT_CONTAINER not in annotations:
        annotations[DEFAULT_CONTAINER] = app_containers[0].get("name", "")
    annotations[ann.STATUS] = _status_json(
        init_containers=tuple(
            c["name"] for c in capture_inits + ([proxy] if native and proxy else []) + r_inits
        ),
        containers=tuple(c["name"] for c in ([] if native or proxy is None else [proxy]) + others),
        volumes=tuple(v["name"] for v in added_volumes),
        image_pull_secrets=tuple(s["name"] for s in added_secrets),
        revision=config.revision,
        templates=tuple(t.name for t in templates),
        config_hash=config.config_hash,
    )

    new_meta = dict(meta)
    new_meta["labels"] = labels
    new_meta["annotations"] = annotations
    return new_meta, new_spec


SERVICE_ACCOUNT_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _token_mount(*groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The service-account token mount the pod's own containers carry (any volume name), as
    the ServiceAccount admission plugin writes it; None when they have none (opted out)."""
    for containers in groups:
        for c in containers:
            for mount in c.get("volumeMounts") or ():
                if isinstance(mount, dict) and mount.get("mountPath") == SERVICE_ACCOUNT_MOUNT_PATH:
                    return {"mountPath": mount["mountPath"], "name": mount.get("name"), "readOnly": True}
    return None


def _with_mount(container: dict[str, Any], mount: dict[str, Any]) -> dict[str, Any]:
    """``container`` with ``mount`` appended, unless something is mounted at its path already."""
    mounts = container.get("volumeMounts") or []
    path = mount["mountPath"]
    if any(isinstance(m, dict) and m.get("mountPath") == path for m in mounts):
        return container
    out = dict(container)
    out["volumeMounts"] = [*mounts, dict(mount)]  # a copy each: no object shared between containers
    return out


def _keep_derived_env(container: dict[str, Any], old: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Keep an old pod-derived env item whose recomputed value means the same (JSON values
    compared as data: a pod read back through kubectl has its keys sorted)."""
    env = container.get("env")
    if not env:
        return container
    out: list[Any] | None = None
    for i, item in enumerate(env):
        previous = old.get(item.get("name")) if isinstance(item, dict) else None
        if previous is None or previous is item or previous == item:
            continue
        if not _same_value(previous.get("value"), item.get("value")) or set(previous) != set(item):
            continue
        if out is None:
            out = list(env)
        out[i] = previous
    if out is None:
        return container
    result = dict(container)
    result["env"] = out
    return result


def _same_value(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return False


def _volumes_in_place(before: list[Any], kept: list[Any], ours: list[dict[str, Any]]) -> list[Any]:
    """The pod's volumes with ours back in the places they held (re-injection), new ones last.

    ``before`` is the list as it came, ``kept`` the same without ours, ``ours`` what we add now.
    """
    by_name = {v.get("name"): v for v in ours}
    kept_ids = {id(v) for v in kept}
    out: list[Any] = []
    for v in before:
        if id(v) in kept_ids:
            out.append(v)
        elif isinstance(v, dict) and v.get("name") in by_name:
            out.append(by_name.pop(v.get("name")))
    out.extend(v for v in ours if v.get("name") in by_name)
    return out


def _with_hold(proxy_config: Mapping[str, Any], hold: bool) -> dict[str, Any]:
    out = dict(proxy_config)
    if hold:
        out["holdApplicationUntilProxyStarts"] = True
    return out
