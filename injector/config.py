"""Injector configuration: validated once with pydantic, then compiled into plain data for the hot path.

The on-disk shape follows Istio's injector ConfigMap (``config`` with policy, selectors,
``defaultTemplates`` and ``templates``; ``values`` with proxy settings) so a user moving from
Istio recognises it. ``compile_config`` turns the validated model into an ``InjectorConfig``:
frozen, with templates parsed and traffic defaults resolved, so ``inject()`` never validates
configuration per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from cni import annotations as ann
from injector import yamlio
from injector.template import Template, parse_template
from injector.yamlio import _syntax_error as yaml_syntax_error

#: Namespaces never injected, whatever their labels (Istio skips the first two; the rest hold
#: cluster plumbing that must start without a mesh).
SYSTEM_NAMESPACES: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease", "local-path-storage")

BUILTIN_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
BUILTIN_TEMPLATES: tuple[str, ...] = ("sidecar", "envoy", "gateway", "grpc-agent", "grpc-simple")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class LabelSelector(_Model):
    """A Kubernetes LabelSelector (matchLabels + matchExpressions)."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("match_expressions")
    @classmethod
    def _check_expressions(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for expr in value:
            op = expr.get("operator")
            if not isinstance(expr.get("key"), str) or op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise ValueError(f"bad matchExpression {expr!r}")
            if op in ("In", "NotIn") and not expr.get("values"):
                raise ValueError(f"{op} needs values: {expr!r}")
        return value


class Resources(_Model):
    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


class ProxyValues(_Model):
    """The proxy container's settings (Istio's values.global.proxy, roughly)."""

    image: str = "docker.io/istio/proxyv2:1.30.3"  # = Istio's at the pin in tools/istio
    envoy_image: str = "ghcr.io/mesh-injector/mesh-proxy:0.1.0"  # Dockerfile.proxy
    #: The envoy template's JSON access logs on stdout (per pod: MESH_ACCESS_LOG, docs/envoy.md).
    envoy_access_log: bool = True
    cni_image: str = "ghcr.io/mesh-injector/mesh-cni:0.1.0"
    #: "" (Istio's default): unset, so the API server picks Always for ``:latest`` images and
    #: IfNotPresent for the rest.
    image_pull_policy: Literal["Always", "IfNotPresent", "Never", ""] = ""
    resources: Resources = Resources(
        requests={"cpu": "100m", "memory": "128Mi"}, limits={"cpu": "2000m", "memory": "1024Mi"}
    )
    log_level: str = "warning"
    component_log_level: str = "misc:error"
    hold_application_until_proxy_starts: bool = False
    native_sidecars: Literal["auto", "true", "false"] = "auto"
    #: How traffic reaches the proxy: our CNI plugin (default), an init container, or not at all.
    capture: Literal["cni", "init", "none"] = "cni"
    rewrite_app_http_probers: bool = True
    enable_prometheus_merge: bool = True
    uid: int = ann.PROXY_UID_DEFAULT
    gid: int = ann.PROXY_UID_DEFAULT
    status_port: int = ann.STATUS_PORT_DEFAULT
    include_outbound_ip_ranges: str = "*"
    exclude_outbound_ip_ranges: str = ""
    include_inbound_ports: str = "*"
    exclude_inbound_ports: str = ""
    include_outbound_ports: str = ""
    exclude_outbound_ports: str = ""
    exclude_interfaces: str = ""
    capture_dns: bool = Field(default=False, alias="captureDNS")

    @field_validator("image_pull_policy", mode="before")
    @classmethod
    def _unset_policy(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("native_sidecars", mode="before")
    @classmethod
    def _bool_text(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value


class MeshValues(_Model):
    """Cluster-wide identity the sidecar template passes to the proxy."""

    revision: str = "default"
    mesh_id: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    ca_address: str = "istiod.istio-system.svc:15012"
    discovery_address: str = "istiod.istio-system.svc:15012"
    #: "1.30" etc.; decides nativeSidecars=auto (native sidecars are on by default from 1.29).
    kubernetes_version: str = ""
    image_pull_secrets: list[str] = Field(default_factory=list)


class Values(_Model):
    proxy: ProxyValues = ProxyValues()
    mesh: MeshValues = MeshValues()


class Limits(_Model):
    """Bounds on what one pod may cost the injector; exceeding one rejects the pod, naming it.

    Not part of the config hash: a limit changes which pods are admitted, not what they get.
    """

    #: The JSON Patch for one admitted pod or workload (bytes).
    max_patch_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: ``proxy.istio.io/config`` (bytes and nesting depth; YAML aliases are always refused).
    proxy_config_max_bytes: int = Field(default=64 * 1024, ge=1)
    proxy_config_max_depth: int = Field(default=16, ge=1)


class ConfigModel(_Model):
    """The whole configuration as a user writes it (YAML/JSON)."""

    policy: Literal["enabled", "disabled"] = "enabled"
    always_inject_selector: list[LabelSelector] = Field(default_factory=list)
    never_inject_selector: list[LabelSelector] = Field(default_factory=list)
    system_namespaces: list[str] = Field(default_factory=list)
    default_templates: list[str] = Field(default_factory=lambda: ["sidecar"])
    #: name -> template document (YAML text or mapping); same name as a built-in replaces it.
    templates: dict[str, Any] = Field(default_factory=dict)
    #: Annotations added to every injected pod (Istio's injectedAnnotations).
    injected_annotations: dict[str, str] = Field(default_factory=dict)
    values: Values = Values()
    limits: Limits = Limits()


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which part and why."""


def describe_errors(err: ValidationError) -> str:
    """Each problem as ``path.in.the.file: what is wrong (got value)``, in the user's key names:
    no model class names, error type tags or documentation links."""
    parts = []
    for item in err.errors(include_url=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        if item["type"] == "extra_forbidden":
            problem = "unknown key"
        else:
            problem = re.sub(r" or instance of \w+", "", str(item["msg"]).removeprefix("Value error, "))
            problem = problem.replace("a valid dictionary", "a mapping")
            if "input" in item and not isinstance(item["input"], dict | list):
                problem += f" (got {str(repr(item['input']))[:80]})"
        parts.append(f"{where or 'the config'}: {problem}")
    return "; ".join(parts)


class PodDefaults(NamedTuple):
    """The values.proxy settings a pod's annotations override, as plain data: read per pod,
    and a pydantic attribute chain costs ~0.3 us a read."""

    image: str
    envoy_image: str
    log_level: str
    component_log_level: str
    native_sidecars: bool
    rewrite_probes: bool
    prometheus_merge: bool
    hold: bool
    #: The proxy UID check applies: capture is not ``none``.
    captures: bool


class Memo:
    """The one memo of a compiled config: results that depend on the config and a small key only.

    Owned by the (frozen) config, so an entry can never outlive or serve another config. Each
    kind (traffic, templates, fixed context, render, status, ...) holds at most ``limit``
    entries and starts over when full: hostile pods with ever-new values cost a recompute, never
    memory. ``limit=0`` stores nothing (a fresh render every time; the property tests use it).
    """

    __slots__ = ("_kinds", "limit")
    #: Kinds with heavier entries get fewer (a compiled config per revision, a compiled template).
    KIND_LIMITS: Mapping[str, int] = {"revision": 16, "render": 256, "fixed": 256}

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._kinds: dict[str, dict[Hashable, Any]] = {}

    def get(self, kind: str, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value for (kind, key), made by ``make()`` on a miss (an exception stores nothing)."""
        try:
            return self._kinds[kind][key]
        except KeyError:
            return self._make(kind, key, make)

    def _make(self, kind: str, key: Hashable, make: Callable[[], Any]) -> Any:
        entries = self._kinds.get(kind)
        if entries is None:
            entries = self._kinds[kind] = {}
        value = make()
        limit = min(self.limit, self.KIND_LIMITS.get(kind, self.limit))
        if limit:
            if len(entries) >= limit:
                entries.clear()
            entries[key] = value
        return value

    def size(self) -> int:
        return sum(len(entries) for entries in self._kinds.values())


@dataclass(frozen=True)
class InjectorConfig:
    """Compiled configuration: everything ``inject()`` needs, precomputed, and the memo of what
    is computed from it per distinct pod setting."""

    model: ConfigModel
    templates: Mapping[str, Template]
    system_namespaces: frozenset[str]
    traffic_defaults: ann.TrafficDefaults
    config_hash: str
    native_sidecars_default: bool
    pod_defaults: PodDefaults
    memo: Memo = field(default_factory=Memo, compare=False, repr=False)

    def without_memo(self) -> InjectorConfig:
        """The same config with a memo that stores nothing: every render from scratch."""
        return dataclasses.replace(self, memo=Memo(limit=0))

    def for_revision(self, revision: str | None) -> InjectorConfig:
        """This config, or the same config as the named revision's injector would run it
        (dry-run and kube-inject ``--revision``); compiled once per revision."""
        if not revision or revision == self.revision:
            return self

        def compile_revision() -> InjectorConfig:
            data = self.model.model_dump(by_alias=True)
            data.setdefault("values", {}).setdefault("mesh", {})["revision"] = revision
            return compile_config(data)

        found: InjectorConfig = self.memo.get("revision", revision, compile_revision)
        return found

    @property
    def proxy(self) -> ProxyValues:
        return self.model.values.proxy

    @property
    def mesh(self) -> MeshValues:
        return self.model.values.mesh

    @property
    def revision(self) -> str:
        return self.model.values.mesh.revision


def _version_at_least(version: str, major: int, minor: int) -> bool:
    text = version.strip().lstrip("v")
    parts = text.split(".")
    try:
        got = (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0))
    except (ValueError, IndexError):
        return False
    return got >= (major, minor)


def _builtin_template_sources() -> dict[str, str]:
    return {name: (BUILTIN_TEMPLATE_DIR / f"{name}.yaml").read_text() for name in BUILTIN_TEMPLATES}


def compile_config(model: ConfigModel | Mapping[str, Any] | None = None) -> InjectorConfig:
    """Validate and precompute; raise ConfigError with a readable message on any problem."""
    if model is None:
        model = ConfigModel()
    elif not isinstance(model, ConfigModel):
        try:
            model = ConfigModel.model_validate(dict(model))
        except ValidationError as err:
            raise ConfigError(f"invalid injector config: {describe_errors(err)}") from None

    sources: dict[str, Any] = dict(_builtin_template_sources())
    sources.update(model.templates)
    templates: dict[str, Template] = {}
    parsed: dict[str, Any] = {}  # each source parsed once: compiled here, hashed below
    for name, source in sources.items():
        try:
            parsed[name] = yamlio.safe_load(source) if isinstance(source, str) else source
            templates[name] = parse_template(name, parsed[name] if parsed[name] is not None else {})
        except yaml.YAMLError as err:
            raise ConfigError(f"template {name!r}: not valid YAML: {err}") from None
        except ValueError as err:
            raise ConfigError(f"template {name!r}: {err}") from None
    for name in model.default_templates:
        if name not in templates:
            raise ConfigError(f"defaultTemplates names unknown template {name!r}")
    for selector_list in (model.always_inject_selector, model.never_inject_selector):
        for selector in selector_list:
            if not selector.match_labels and not selector.match_expressions:
                raise ConfigError("an empty label selector would match every pod; remove it")

    proxy = model.values.proxy
    defaults = ann.TrafficDefaults(
        interception_mode=ann.MODE_NONE if proxy.capture == "none" else ann.MODE_REDIRECT,
        include_outbound_ip_ranges=proxy.include_outbound_ip_ranges,
        exclude_outbound_ip_ranges=proxy.exclude_outbound_ip_ranges,
        include_inbound_ports=proxy.include_inbound_ports,
        exclude_inbound_ports=proxy.exclude_inbound_ports,
        include_outbound_ports=proxy.include_outbound_ports,
        exclude_outbound_ports=proxy.exclude_outbound_ports,
        exclude_interfaces=proxy.exclude_interfaces,
        status_port=proxy.status_port,
        proxy_uid=proxy.uid,
        proxy_gid=proxy.gid,
        capture_dns=proxy.capture_dns,
    )
    try:  # the mesh-wide defaults must themselves be valid, or every pod would be rejected
        ann.resolve_traffic({}, defaults)
    except ann.AnnotationError as err:
        raise ConfigError(f"values.proxy traffic defaults: {err}") from None

    # Hash what the templates say, not how they are written: comments and layout do not count.
    canonical = json.dumps(
        {"model": model.model_dump(mode="json", by_alias=True, exclude={"limits"}), "templates": parsed},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    native = proxy.native_sidecars
    native_default = native == "true" or (
        native == "auto" and _version_at_least(model.values.mesh.kubernetes_version, 1, 29)
    )
    return InjectorConfig(
        model=model,
        templates=templates,
        system_namespaces=frozenset(SYSTEM_NAMESPACES) | frozenset(model.system_namespaces),
        traffic_defaults=defaults,
        config_hash=hashlib.sha256(canonical.encode()).hexdigest()[:16],
        native_sidecars_default=native_default,
        pod_defaults=PodDefaults(
            image=proxy.image,
            envoy_image=proxy.envoy_image,
            log_level=proxy.log_level,
            component_log_level=proxy.component_log_level,
            native_sidecars=native_default,
            rewrite_probes=proxy.rewrite_app_http_probers,
            prometheus_merge=proxy.enable_prometheus_merge,
            hold=proxy.hold_application_until_proxy_starts,
            captures=proxy.capture != "none",
        ),
    )


#: Files ``load_config_dir`` reads; a directory with none of them (and no template) is refused.
CONFIG_DIR_FILES = ("config", "config.yaml", "values", "values.yaml")


def load_config_dir(path: str | Path) -> InjectorConfig:
    """Load a config directory (a mounted ConfigMap).

    ``config`` or ``config.yaml`` holds the ConfigModel (optional: built-in defaults); ``values``
    or ``values.yaml`` may hold the values separately, as in Istio's ConfigMap; every
    ``templates/<name>.yaml`` and every ``<name>.template.yaml`` adds or replaces a template.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"config directory {root} does not exist")

    def parsed(file: Path, text: str) -> Any:
        try:
            return yamlio.safe_load(text)
        except yaml.YAMLError as err:  # named by file and line, not PyYAML's "<unicode string>"
            raise ConfigError(str(yaml_syntax_error(err, str(file)))) from None

    def read_template(file: Path) -> Any:
        """The parsed template (a syntax error names the file); compile_config takes it as is."""
        text = file.read_text()
        doc = parsed(file, text)
        return doc if doc is not None else text

    def read_yaml(*names: str) -> dict[str, Any] | None:
        for name in names:
            file = root / name
            if file.is_file():
                data = parsed(file, file.read_text()) or {}
                if not isinstance(data, dict):
                    raise ConfigError(f"{file}: expected a mapping")
                return data
        return None

    template_files = sorted((root / "templates").glob("*.yaml")) if (root / "templates").is_dir() else []
    if not any((root / name).is_file() for name in CONFIG_DIR_FILES) and not template_files and not any(
        root.glob("*.template.yaml")
    ):
        # A mistyped path or an empty mount would otherwise run silently on the built-in defaults.
        raise ConfigError(f"{root} holds no injector config (expected one of {', '.join(CONFIG_DIR_FILES)}, "
                          "templates/*.yaml or *.template.yaml)")
    data = read_yaml("config", "config.yaml") or {}
    values = read_yaml("values", "values.yaml")
    if values is not None:
        data["values"] = values
    templates = dict(data.get("templates") or {})
    for file in template_files:
        templates[file.stem] = read_template(file)
    for file in sorted(root.glob("*.template.yaml")):
        templates[file.name.removesuffix(".template.yaml")] = read_template(file)
    if templates:
        data["templates"] = templates
    return compile_config(data)


_DEFAULT: InjectorConfig | None = None


def default_config() -> InjectorConfig:
    """The built-in configuration, compiled once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = compile_config()
    return _DEFAULT
