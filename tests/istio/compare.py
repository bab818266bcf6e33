"""Compare our injection with Istio's, aspect by aspect, and match differences against the list.

An object becomes a flat mapping of aspects (``decision``, ``containers``, ``proxy.env.CA_ADDR``,
``volumes.istio-envoy``, ``app.web.readinessProbe``, ...). Two outcomes differ where an aspect's
value differs; each difference must be on tests/istio/differences.yaml, either as an intended
difference (with its reason) or as a known gap (with its issue), else the test fails.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from injector.quantity import parse_quantity
from tests.istio.oracle import INJECTED, Mode, Outcome, pod_metadata, pod_template

DIFFERENCES_FILE = Path(__file__).with_name("differences.yaml")
PROXY = "istio-proxy"
CAPTURE_INITS = ("istio-validation", "istio-init")
PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
JSON_ENV = ("ISTIO_KUBE_APP_PROBERS", "ISTIO_META_POD_PORTS", "PROXY_CONFIG", "ISTIO_PROMETHEUS_ANNOTATIONS")
STATUS = "sidecar.istio.io/status"
OVERRIDES = "proxy.istio.io/overrides"
ITEM = re.compile(r"^items\[\d+\]\.")


def _prune(value: Any) -> Any:
    """Drop nulls and empty mappings/lists: Go's encoder and ours disagree on writing them."""
    if isinstance(value, dict):
        out = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def _probe(value: Any) -> Any:
    """A probe as the API server stores it: httpGet's scheme defaults to HTTP."""
    if isinstance(value, dict) and isinstance(value.get("httpGet"), dict) \
            and value["httpGet"].get("scheme") == "HTTP":
        value = {**value, "httpGet": {k: v for k, v in value["httpGet"].items() if k != "scheme"}}
    return value


def _resources(value: Any) -> Any:
    """Quantities by value ("2" and "2000m" are one CPU)."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for part, amounts in value.items():
        if isinstance(amounts, dict):
            out[part] = {k: _quantity(v) for k, v in amounts.items()}
        else:
            out[part] = amounts
    return out


def _quantity(text: Any) -> Any:
    try:
        number = parse_quantity(str(text))
    except ValueError:
        return text
    return str(number.normalize()) if isinstance(number, Decimal) else number


def _json_or_text(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _env(container: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for item in container.get("env") or []:
        name = item.get("name")
        if "valueFrom" in item:
            value: Any = {"valueFrom": _prune(item["valueFrom"])}
            ref = value["valueFrom"].get("fieldRef")
            if isinstance(ref, dict):
                ref.pop("apiVersion", None)  # defaulted to v1 by the API server either way
            res = value["valueFrom"].get("resourceFieldRef")
            if isinstance(res, dict) and "divisor" in res:
                res["divisor"] = _quantity(res["divisor"])
        else:
            value = item.get("value", "")
            if name in JSON_ENV:
                value = _prune(_json_or_text(value))
        out[name] = value
    return out


def _container_aspects(prefix: str, container: dict[str, Any], out: dict[str, Any]) -> None:
    c = _prune(container)
    for field in ("image", "imagePullPolicy", "command", "args", "ports", "securityContext",
                  "lifecycle", "restartPolicy"):
        out[f"{prefix}.{field}"] = c.get(field)
    for probe in PROBES:
        out[f"{prefix}.{probe}"] = _probe(c.get(probe))
    out[f"{prefix}.resources"] = _resources(c.get("resources"))
    for name, value in _env(container).items():
        out[f"{prefix}.env.{name}"] = value
    out[f"{prefix}.env"] = [e.get("name") for e in container.get("env") or []]
    for mount in c.get("volumeMounts") or []:
        out[f"{prefix}.volumeMounts.{mount.get('mountPath')}"] = {
            k: v for k, v in mount.items() if k != "mountPath"}


def aspects(outcome: Outcome) -> dict[str, Any]:
    """The outcome as a flat mapping; only the decision for objects not injected."""
    out: dict[str, Any] = {"decision": outcome.decision}
    if outcome.decision != INJECTED or outcome.obj is None:
        return out
    if outcome.obj.get("kind") == "List":
        for i, item in enumerate(outcome.obj.get("items") or []):
            injected = STATUS in (pod_metadata(item).get("annotations") or {})
            one = Outcome(INJECTED if injected else "skipped", item)
            out.update({f"items[{i}].{k}": v for k, v in aspects(one).items()})
        return out
    pod = pod_template(outcome.obj) or {}
    meta, spec = pod_metadata(outcome.obj), pod.get("spec") or {}
    if outcome.obj.get("kind") == "CronJob":
        out["metadataAt"] = "jobTemplate" if meta is not pod.get("metadata") else "template"
    containers, inits = spec.get("containers") or [], spec.get("initContainers") or []
    out["containers"] = [c.get("name") for c in containers]
    out["initContainers"] = [c.get("name") for c in inits]
    for c in (*containers, *inits):
        name = c.get("name")
        if name == PROXY:
            _container_aspects("proxy", c, out)
        elif name in CAPTURE_INITS:
            _container_aspects("capture", c, out)
        else:
            for probe in PROBES:
                out[f"app.{name}.{probe}"] = _probe(_prune(c.get(probe)))
    for volume in _prune(spec.get("volumes") or []):
        out[f"volumes.{volume.get('name')}"] = {k: v for k, v in volume.items() if k != "name"}
    out["imagePullSecrets"] = _prune(spec.get("imagePullSecrets"))
    for key, value in (meta.get("labels") or {}).items():
        out[f"labels.{key}"] = value
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        if key == OVERRIDES:  # JSON: compared as data (Go writes its struct's field order)
            out[f"annotations.{key}"] = _prune(_json_or_text(value))
        elif key != STATUS:
            out[f"annotations.{key}"] = value
    status = _json_or_text(annotations.get(STATUS))
    if isinstance(status, dict):
        for key in ("initContainers", "containers", "volumes", "imagePullSecrets"):
            out[f"status.{key}"] = status.get(key) or []
    return out


@dataclass(frozen=True)
class Difference:
    aspect: str
    ours: Any
    istio: Any
    detail: str = ""  # for a decision: our reason ("ProxyUIDConflict: ..."), else Istio's error


def differences(ours: Outcome, istio: Outcome) -> list[Difference]:
    a, b = aspects(ours), aspects(istio)
    if a["decision"] != b["decision"]:
        return [Difference("decision", a["decision"], b["decision"], ours.message or istio.message)]
    return [Difference(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class Entry:
    """One line of differences.yaml: an aspect pattern, optional conditions, why."""

    id: str
    aspect: str
    kind: str  # "intended" or "gap"
    why: str
    issue: int | None = None
    ours: Any = "*"
    istio: Any = "*"
    modes: tuple[str, ...] = ()
    detail: str = "*"
    inputs: tuple[str, ...] = ()
    #: Met only by hypothesis-generated pods, so the staleness check cannot require it.
    generated_only: bool = False

    def matches(self, diff: Difference, mode: Mode, name: str = "") -> bool:
        aspect = ITEM.sub("", diff.aspect)  # a List's items are judged like objects
        if not fnmatch.fnmatchcase(aspect, self.aspect):
            return False
        if self.inputs and not any(fnmatch.fnmatchcase(name, g) for g in self.inputs):
            return False
        if self.modes and mode.name not in self.modes:
            return False
        if not fnmatch.fnmatchcase(diff.detail, self.detail):
            return False
        return _value_matches(self.ours, diff.ours) and _value_matches(self.istio, diff.istio)


def _value_matches(want: Any, got: Any) -> bool:
    if want == "*":
        return True
    if want == "absent":
        return got is None
    if want == "present":
        return got is not None
    return want == got


def load_entries(path: Path = DIFFERENCES_FILE) -> list[Entry]:
    data = yaml.safe_load(path.read_text())
    entries = []
    for kind, key in (("intended", "intended"), ("gap", "known_gaps")):
        for item in data.get(key) or []:
            entries.append(Entry(
                id=item["id"], aspect=item["aspect"], kind=kind, why=item["why"],
                issue=item.get("issue"), ours=item.get("ours", "*"), istio=item.get("istio", "*"),
                modes=tuple(item.get("modes") or ()), detail=item.get("detail", "*"),
                inputs=tuple(item.get("inputs") or ()),
                generated_only=bool(item.get("generated_only", False))))
    return entries


def unexplained(diffs: list[Difference], mode: Mode, entries: list[Entry],
                name: str = "") -> list[Difference]:
    return [d for d in diffs if not any(e.matches(d, mode, name) for e in entries)]
