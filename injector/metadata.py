"""The injected pod's metadata: canonical labels, Prometheus merge, template labels and
annotations, the resolved traffic annotations and the status annotation (what we injected)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cni import annotations as ann
from injector.context import compact_json
from injector.uninject import PROM_STATS_PATH

if TYPE_CHECKING:
    from injector.config import InjectorConfig
    from injector.overrides import Overrides

_STATUS_FIELDS = ann.InjectionStatus.__slots__
#: kubectl logs' default container (kubectl.kubernetes.io/default-container is exec's and logs'
#: fallback); Istio sets both to the first app container, so `kubectl logs` shows the app.
DEFAULT_LOGS_CONTAINER = "kubectl.kubernetes.io/default-logs-container"
#: Istio's record of the pod's own containers laid over the ones injected (JSON, by pod list),
#: so the user's customisation can be told from what the injector rendered.
OVERRIDES = "proxy.istio.io/overrides"


def _status_json(fields: tuple[Any, ...]) -> str:
    return ann.InjectionStatus(**dict(zip(_STATUS_FIELDS, fields, strict=True))).to_json()


_LABEL_VALUE_END = re.compile(r"[^A-Za-z0-9]+$")
_LABEL_VALUE_START = re.compile(r"^[^A-Za-z0-9]+")


@functools.lru_cache(maxsize=4096)
def label_value(text: str) -> str:
    """Truncate to 63 characters and trim what a label value may not start or end with."""
    text = _LABEL_VALUE_START.sub("", text[:63])
    text = _LABEL_VALUE_END.sub("", text)
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def canonical_names(labels: Mapping[str, str], workload_name: str, pod_name: str) -> tuple[str | None, str]:
    """Istio's canonical service name and revision, from the usual labels, else the workload."""
    name = (
        labels.get(ann.CANONICAL_NAME)
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload_name
        or pod_name
    )
    revision = (
        labels.get(ann.CANONICAL_REVISION)
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return label_value(name) or None, label_value(revision) or "latest"


def prometheus_merge(annotations: dict[str, str], status_port: int) -> str | None:
    """Istio's Prometheus merge: the pod is scraped on the agent's status port; the app's own
    ``prometheus.io/*`` annotations are returned (JSON, for the proxy's env) when it had any.
    Edits ``annotations`` in place; ``prometheus.io/scrape: "false"`` leaves them alone."""
    scraped = ann.bool_or_none(annotations.get(ann.PROM_SCRAPE, "true")) is not False
    if not scraped or annotations.get(ann.PROM_PORT) == str(status_port):
        return None
    saved = None
    if any(k in annotations for k in (ann.PROM_SCRAPE, ann.PROM_PATH, ann.PROM_PORT)):
        saved = json.dumps(
            {
                "scrape": annotations.get(ann.PROM_SCRAPE, ""),
                "path": annotations.get(ann.PROM_PATH, ""),
                "port": annotations.get(ann.PROM_PORT, ""),
            },
            separators=(",", ":"),
        )
    annotations[ann.PROM_PORT] = str(status_port)
    annotations[ann.PROM_PATH] = PROM_STATS_PATH
    annotations[ann.PROM_SCRAPE] = "true"
    return saved


def injected_metadata(
    meta: Mapping[str, Any],
    labels: dict[str, str],
    annotations: dict[str, str],
    rendered: Mapping[str, Any],
    *,
    config: InjectorConfig,
    overrides: Overrides,
    default_container: str | None,
    status: tuple[Any, ...],
    user_overlays: Mapping[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The pod's metadata after injection (``labels``/``annotations`` are ours to edit).

    ``status`` holds ``InjectionStatus``'s fields in order: nearly every pod gets one of a
    handful, so its JSON text is memoised on that plain tuple (cheaper to hash than the record).
    """
    for key, value in (rendered.get("labels") or {}).items():
        labels.setdefault(key, value)
    for key, value in (rendered.get("annotations") or {}).items():
        annotations.setdefault(key, value)
    annotations.update(config.model.injected_annotations)
    if overrides.choice.options.capture:  # what the plugin/istio-init program; nothing without capture
        annotations.update(overrides.traffic.annotations)
    if default_container is not None:
        annotations.setdefault(DEFAULT_LOGS_CONTAINER, default_container)
        annotations.setdefault(ann.DEFAULT_CONTAINER, default_container)
    if user_overlays:
        annotations[OVERRIDES] = compact_json(dict(user_overlays))
    annotations[ann.STATUS] = config.memo.get("status", status, lambda: _status_json(status))
    new_meta = dict(meta)
    new_meta["labels"] = labels
    new_meta["annotations"] = annotations
    return new_meta
