"""Uninjection: take out what the status annotation says we injected, as Linkerd keeps it apart.

Used before every injection (a pod that carries our status is re-injected from what it was
before), and so re-injection is idempotent: the same pod gives the same pod.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cni import annotations as ann
from injector.merge import named
from injector.probes import parse_probers, restore_probes
from injector.result import Reason, ReasonCode, Rejected

if TYPE_CHECKING:
    from injector.config import InjectorConfig

#: Where the ``sidecar`` template's agent serves merged metrics (the Prometheus merge target).
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


@dataclass
class PodView:
    """Shallow copies of the pod's metadata and spec that the steps replace fields of."""

    metadata: dict[str, Any]
    spec: dict[str, Any]
    warnings: list[Reason] = field(default_factory=list)


def env_value(container: Mapping[str, Any], name: str) -> str | None:
    for item in container.get("env") or ():
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get("value")
            return value if isinstance(value, str) else None
    return None


@dataclass
class Previous:
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


def uninject(view: PodView, config: InjectorConfig) -> Previous:
    """Take out what the status annotation says we injected, restoring probes and Prometheus annotations.

    When the pod was injected with the current config, injected containers come back as
    overlays without their pod-derived env, so a user's ``istio-proxy`` customisation survives
    and everything computed from the pod is recomputed.
    """
    previous = Previous()
    annotations = view.metadata.get("annotations") or {}
    raw = annotations.get(ann.STATUS)
    if raw is None:
        return previous
    try:
        status = ann.parse_status(raw)
    except ann.AnnotationError as err:
        raise Rejected(ReasonCode.INVALID_ANNOTATION, str(err)) from None
    spec = view.spec
    ours = set(status.containers) | set(status.init_containers)
    proxy = None
    for item in named(spec.get("containers")) + named(spec.get("initContainers")):
        if item.get("name") == ann.PROXY_CONTAINER and item.get("name") in ours:
            proxy = item
    status_port = _status_port_hint(annotations, config)
    # Rendered with this very config (an API-server reinvocation, a second kube-inject): keep
    # what was injected as the user's overlay. Rendered with another config (or by Istio):
    # render afresh, or the old proxy would outlive the config that replaced it.
    keep = status.config_hash == config.config_hash
    probers = parse_probers(env_value(proxy, "ISTIO_KUBE_APP_PROBERS")) if proxy else {}
    lists = (("containers", set(status.containers)), ("initContainers", set(status.init_containers)))
    for key, names in lists:
        if key in spec:
            spec[key] = _strip(spec[key], names, previous if keep else None, status_port, probers)
    if "volumes" in spec:
        previous.volume_order = list(spec["volumes"] or ())
        spec["volumes"] = _strip_volumes(spec["volumes"], set(status.volumes), previous if keep else None)
    if "imagePullSecrets" in spec:
        secrets = set(status.image_pull_secrets)
        spec["imagePullSecrets"] = [s for s in spec["imagePullSecrets"] or () if s.get("name") not in secrets]
    annotations = dict(annotations)
    del annotations[ann.STATUS]
    _restore_prometheus(annotations, status_port, proxy)
    view.metadata["annotations"] = annotations
    return previous


def _strip(
    items: Any, names: set[str], previous: Previous | None, status_port: int, probers: Mapping[str, Any]
) -> list[Any]:
    """The containers that are not ours, probes restored; ours become overlays in ``previous``
    (when kept) without their pod-derived env."""
    kept = []
    for item in items or ():
        name = item.get("name") if isinstance(item, dict) else None
        if name in names:
            if previous is not None:
                previous.overlays[name] = _overlay(item, name, previous)  # type: ignore[arg-type]
            continue
        if probers:  # app containers, and native sidecars among the init containers
            item = restore_probes(item, status_port, probers) or item
        kept.append(item)
    return kept


def _overlay(item: dict[str, Any], name: str, previous: Previous) -> dict[str, Any]:
    over = {k: v for k, v in item.items() if k != "restartPolicy"}
    if "env" in over:
        env = []
        for e in over["env"]:
            if isinstance(e, dict) and e.get("name") in DERIVED_ENV:
                previous.derived_env.setdefault(name, {})[e["name"]] = e
            else:
                env.append(e)
        over["env"] = env
    return over


def _strip_volumes(volumes: Any, ours: set[str], previous: Previous | None) -> list[Any]:
    kept = []
    for v in volumes or ():
        if v.get("name") not in ours:
            kept.append(v)
        elif previous is not None:
            previous.volumes[v["name"]] = v
    return kept


def _restore_prometheus(
    annotations: dict[str, str], status_port: int, proxy: Mapping[str, Any] | None
) -> None:
    """Undo the Prometheus merge: the app's own scrape annotations back from the proxy's env."""
    if not (
        annotations.get(ann.PROM_PATH) == PROM_STATS_PATH
        and annotations.get(ann.PROM_PORT) == str(status_port)
        and annotations.get(ann.PROM_SCRAPE) == "true"
    ):
        return
    for key in (ann.PROM_SCRAPE, ann.PROM_PORT, ann.PROM_PATH):
        del annotations[key]
    saved = env_value(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS") if proxy else None
    if not saved:
        return
    try:
        scrape = json.loads(saved)
    except (ValueError, RecursionError):  # a nesting deeper than the parser's recursion
        return
    for key, name in (("scrape", ann.PROM_SCRAPE), ("path", ann.PROM_PATH), ("port", ann.PROM_PORT)):
        if isinstance(scrape, dict) and scrape.get(key):
            annotations[name] = str(scrape[key])


def _status_port_hint(annotations: Mapping[str, str], config: InjectorConfig) -> int:
    try:
        return ann.parse_port(ann.STATUS_PORT, annotations[ann.STATUS_PORT], low=0)
    except (KeyError, ann.AnnotationError):
        return config.traffic_defaults.status_port
