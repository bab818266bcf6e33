"""The template context: ONE declaration of every template value, and the builders that fill it.

``DECLARED`` is the only list of template values: the template compiler accepts exactly these
names, and the builders below must produce exactly these keys (checked when a fixed context is
built, and by a test for the pod group). The ``proxy`` and ``mesh`` groups are computed from the
config and the pod's ``ProxySettings`` alone, so the settings object itself is the key under
which they (and the renderers specialised on them) are memoised: adding a value to the fixed
groups cannot forget the cache key, because the builder cannot read anything else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from cni import annotations as ann
from injector import envoy_bootstrap

if TYPE_CHECKING:
    from injector.config import InjectorConfig
    from injector.overrides import ProxySettings

#: group -> value names; see docs/injection.md#templates for their meaning.
DECLARED: Mapping[str, tuple[str, ...]] = {
    "proxy": (
        "name",
        "image",
        "envoyImage",
        "imagePullPolicy",
        "uid",
        "gid",
        "statusPort",
        "healthPort",
        "prometheusPort",
        "adminPort",
        "resources",
        "lifecycle",
        "logLevel",
        "componentLogLevel",
        "config",
        "interceptionMode",
        "envoyBootstrap",
        "agentLogLevel",
        "readinessInitialDelay",
        "readinessPeriod",
        "readinessFailureThreshold",
        "runAsUser",
        "runAsNonRoot",
        "addCapabilities",
        "startupProbe",
    ),
    "pod": (
        "name",
        "namespace",
        "serviceAccount",
        "appContainers",
        "podPorts",
        "appProbers",
        "prometheusAnnotations",
        "workloadName",
        "owner",
        "canonicalName",
        "canonicalRevision",
        "bootstrapOverride",
    ),
    "mesh": (
        "revision",
        "meshID",
        "clusterID",
        "trustDomain",
        "caAddress",
        "discoveryAddress",
        "plaintextDiscoveryAddress",
    ),
}
#: Groups fixed by (config, ProxySettings): substituted into the template once per settings.
FIXED_GROUPS: tuple[str, ...] = ("proxy", "mesh")
VARIABLES: frozenset[str] = frozenset(
    f"{group}.{name}" for group, names in DECLARED.items() for name in names
)


def compact_json(value: Any, *, sort: bool = False) -> str:
    """Compact JSON (what json.dumps gives with separators=(",", ":")), via orjson for speed."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort else 0).decode()
    except TypeError:  # e.g. an integer beyond 64 bits in hand-written input: json copes
        return json.dumps(value, sort_keys=sort, separators=(",", ":"), ensure_ascii=False, default=str)


class FixedContext:
    """The fixed groups for one ProxySettings, and the same as ``group.name`` constants."""

    __slots__ = ("consts", "groups")

    def __init__(self, groups: dict[str, dict[str, Any]]) -> None:
        for group in FIXED_GROUPS:
            if tuple(groups[group]) != DECLARED[group]:
                raise RuntimeError(f"template group {group!r} does not match its declaration")
        self.groups = groups
        self.consts = {
            f"{group}.{name}": value for group in FIXED_GROUPS for name, value in groups[group].items()
        }


def fixed_context(config: InjectorConfig, settings: ProxySettings) -> FixedContext:
    """The proxy and mesh groups, memoised on ``settings`` (their only input besides the config)."""
    found: FixedContext = config.memo.get("fixed", settings, lambda: _build_fixed(config, settings))
    return found


def _build_fixed(config: InjectorConfig, settings: ProxySettings) -> FixedContext:
    from injector.overrides import resources

    mesh = config.mesh
    hold = settings.hold_command
    proxy = {
        "name": ann.PROXY_CONTAINER,
        "image": settings.image,
        "envoyImage": settings.envoy_image,
        "imagePullPolicy": config.proxy.image_pull_policy or None,  # None: the key is left out
        "uid": settings.uid,
        "gid": settings.gid,
        "statusPort": settings.status_port,
        "healthPort": ann.HEALTH_PORT,
        "prometheusPort": ann.PROMETHEUS_PORT,
        "adminPort": envoy_bootstrap.ADMIN_PORT,
        "resources": resources(settings, config),
        "lifecycle": _lifecycle(hold, settings.drain_command),
        "logLevel": settings.log_level,
        "componentLogLevel": settings.component_log_level,
        "config": settings.config_json,
        "interceptionMode": settings.mode,
        "envoyBootstrap": envoy_bootstrap.bootstrap_json(
            envoy_bootstrap.BootstrapSettings(access_log=config.proxy.envoy_access_log)
        ),
        "agentLogLevel": settings.agent_log_level,
        "readinessInitialDelay": settings.readiness[0] or None,  # None: the key is left out
        "readinessPeriod": settings.readiness[1],
        "readinessFailureThreshold": settings.readiness[2],
        # sidecar.istio.io/capNetBindService: binding ports below 1024 takes root and the capability.
        "runAsUser": 0 if settings.bind_low_ports else settings.uid,
        "runAsNonRoot": not settings.bind_low_ports,
        "addCapabilities": ["NET_BIND_SERVICE"] if settings.bind_low_ports else None,
        # False when the postStart hold already gates the proxy's start: a startupProbe would
        # only add a wait for its next period (and the kubelet's next relist) after Envoy is ready.
        "startupProbe": hold is None,
    }
    mesh_group = {
        "revision": mesh.revision,
        "meshID": mesh.mesh_id,
        "clusterID": mesh.cluster_id,
        "trustDomain": mesh.trust_domain,
        "caAddress": mesh.ca_address,
        "discoveryAddress": mesh.discovery_address,
        "plaintextDiscoveryAddress": plaintext_discovery(mesh.discovery_address),
    }
    return FixedContext({"proxy": proxy, "mesh": mesh_group})


def _lifecycle(hold: tuple[str, ...] | None, drain: tuple[str, ...] | None) -> dict[str, Any] | None:
    """The proxy's lifecycle: the postStart wait that holds the app back and (a native sidecar)
    the preStop drain; None: neither."""
    lifecycle: dict[str, Any] = {}
    if hold is not None:
        lifecycle["postStart"] = {"exec": {"command": list(hold)}}
    if drain is not None:
        lifecycle["preStop"] = {"exec": {"command": list(drain)}}
    return lifecycle or None


#: istiod's plaintext xDS port (proxyless gRPC without an agent cannot do istiod's TLS).
PLAINTEXT_XDS_PORT = 15010


def plaintext_discovery(address: str) -> str:
    """The discovery address's host with istiod's plaintext xDS port (``host:15010``)."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):  # no port given (or a bare IPv6 literal)
        host = address
    return f"{host}:{PLAINTEXT_XDS_PORT}"


def pod_group(
    *,
    pod_name: str,
    namespace: str,
    service_account: str,
    app_containers: list[dict[str, Any]],
    pod_containers: list[dict[str, Any]],
    app_probers: str | None,
    prometheus_annotations: str | None,
    workload_kind: str,
    workload_api: str,
    workload_name: str,
    canonical_name: str | None,
    canonical_revision: str,
    bootstrap_override: str | None = None,
) -> dict[str, Any]:
    """The ``pod`` group: the values computed from this pod (never memoised).

    ``podPorts`` are the ports of every container the pod declares (as Istio lists them), its own
    ``istio-proxy`` too: a gateway declares its listeners there."""
    owner_kind = _PLURALS.get(workload_kind, workload_kind.lower() + "s")
    api = workload_api or "v1"
    pod_ports = [p for c in pod_containers for p in c.get("ports") or () if isinstance(p, dict)]
    return {
        "name": pod_name,
        "namespace": namespace,
        "serviceAccount": service_account,
        "appContainers": ",".join(c.get("name", "") for c in app_containers),
        "podPorts": compact_json(pod_ports),
        "appProbers": app_probers,
        "prometheusAnnotations": prometheus_annotations,
        "workloadName": workload_name or pod_name,
        "owner": f"kubernetes://apis/{api}/namespaces/{namespace}/{owner_kind}/{workload_name}"
        if workload_name
        else None,
        "canonicalName": canonical_name,
        "canonicalRevision": canonical_revision,
        "bootstrapOverride": bootstrap_override,
    }


def template_context(fixed: FixedContext, pod: dict[str, Any]) -> dict[str, Any]:
    """The whole context a template renders from (the fixed groups are shared, read-only)."""
    return {"pod": pod, **fixed.groups}


_PLURALS = {
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "DaemonSet": "daemonsets",
    "ReplicaSet": "replicasets",
    "ReplicationController": "replicationcontrollers",
    "Job": "jobs",
    "CronJob": "cronjobs",
    "DeploymentConfig": "deploymentconfigs",
    "Pod": "pods",
}
