"""The injection audit: for every pod, should it carry the sidecar, does it, and is it stale.

``audit_pods`` is pure (pods, namespace labels, owner lookups and a config in; report rows out)
and is shared by ``GET /audit`` and ``mesh-injector audit``. ``collect`` reads the cluster;
``handle`` is the HTTP shell, which exposes pod specs and therefore authenticates the caller's
bearer token (TokenReview) and checks that the caller may list pods in the scope asked for
(SubjectAccessReview) before reading anything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cni import annotations as ann
from injector import auth
from injector.auth import Denied
from injector.events import controller_of
from injector.result import Decision

if TYPE_CHECKING:
    from fastapi import Request

    from injector.server import ServerState

OwnerLookup = Callable[[str, str, str], Mapping[str, Any] | None]  # (namespace, kind, name) -> object


@dataclass
class PodAudit:
    namespace: str
    pod: str
    owner: str | None  # "Deployment/web", "StatefulSet/db", ... or None for a bare pod
    should_inject: bool
    injected: bool
    revision: str | None  # template revision it was injected with
    config_hash: str | None  # hash of the config it was injected with
    stale: bool | None  # injected with another config than the one running (None: unknown)
    needs_restart: bool
    decision: str
    reasons: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)


def owner_of(pod: Mapping[str, Any], namespace: str, lookup: OwnerLookup | None) -> str | None:
    """Follow controller references up to the top-level workload ("Kind/name")."""
    ref = controller_of(pod)
    if ref is None:
        return None
    kind, name = str(ref.get("kind", "")), str(ref.get("name", ""))
    for _ in range(3):
        if lookup is None or kind not in ("ReplicaSet", "Job"):
            break
        parent = lookup(namespace, kind, name)
        up = controller_of(parent) if parent else None
        if up is None:
            break
        kind, name = str(up.get("kind", "")), str(up.get("name", ""))
    return f"{kind}/{name}"


def audit_pod(
    pod: Mapping[str, Any],
    *,
    namespace_labels: Mapping[str, str],
    config: Any,
    inject: Callable[..., Any],
    owner_lookup: OwnerLookup | None = None,
) -> PodAudit:
    meta = pod.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    status_text = (meta.get("annotations") or {}).get(ann.STATUS)
    status = None
    if status_text:
        try:
            status = ann.parse_status(status_text)
        except Exception:  # an unreadable status still means someone injected it
            status = None
    injected = bool(status_text)
    # "Should it be injected" is the decision the webhook would make for this pod today, with
    # the namespace labels as they are now (the API server's selectors included).
    result = inject(dict(pod), config=config, namespace_labels=namespace_labels, namespace=namespace)
    should = result.decision is Decision.INJECT
    config_hash = status.config_hash if status and status.config_hash else None
    stale = None if not injected or config_hash is None else config_hash != config.config_hash
    return PodAudit(
        namespace=namespace,
        pod=str(meta.get("name") or ""),
        owner=owner_of(pod, namespace, owner_lookup),
        should_inject=should,
        injected=injected,
        revision=status.revision if status else None,
        config_hash=config_hash,
        stale=stale,
        needs_restart=(should != injected) or bool(stale and should),
        decision=result.decision.value,
        reasons=[r.as_dict() for r in result.reasons],
        warnings=[w.as_dict() for w in result.warnings],
    )


def _namespace_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "")


def audit_pods(
    pods: Sequence[Mapping[str, Any]],
    *,
    namespace_labels: Mapping[str, Mapping[str, str]],
    config: Any,
    inject: Callable[..., Any],
    owner_lookup: OwnerLookup | None = None,
) -> dict[str, Any]:
    rows = [
        audit_pod(pod, namespace_labels=namespace_labels.get(_namespace_of(pod), {}), config=config,
                  inject=inject, owner_lookup=owner_lookup)
        for pod in pods
    ]
    return {
        "configHash": config.config_hash,
        "summary": {
            "pods": len(rows),
            "shouldInject": sum(r.should_inject for r in rows),
            "injected": sum(r.injected for r in rows),
            "missingSidecar": sum(r.should_inject and not r.injected for r in rows),
            "unexpectedSidecar": sum(r.injected and not r.should_inject for r in rows),
            "stale": sum(bool(r.stale) for r in rows),
            "needsRestart": sum(r.needs_restart for r in rows),
        },
        "pods": [_camel(asdict(r)) for r in rows],
    }


def _camel(row: dict[str, Any]) -> dict[str, Any]:
    def key(k: str) -> str:
        head, *rest = k.split("_")
        return head + "".join(p.capitalize() for p in rest)

    return {key(k): v for k, v in row.items()}


# ---------------------------------------------------------------------------------------------
# cluster I/O (sync kubernetes client; callers run it in a thread)


def _raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a kubernetes client method and return the JSON body as plain dicts (camelCase keys)."""
    response = call(*args, _preload_content=False, **kwargs)
    return json.loads(response.data)


Collected = tuple[list[dict[str, Any]], dict[str, dict[str, str]], OwnerLookup]


def collect(api: Any, namespace: str | None) -> Collected:
    """Pods, namespace labels and an owner lookup (ReplicaSets/Jobs read once per namespace)."""
    from kubernetes import client

    core, apps, batch = client.CoreV1Api(api), client.AppsV1Api(api), client.BatchV1Api(api)
    if namespace:
        pods = _raw(core.list_namespaced_pod, namespace)["items"]
        ns = _raw(core.read_namespace, namespace)
        ns_labels = {namespace: (ns.get("metadata") or {}).get("labels") or {}}
    else:
        pods = _raw(core.list_pod_for_all_namespaces)["items"]
        ns_labels = {
            (n.get("metadata") or {}).get("name", ""): (n.get("metadata") or {}).get("labels") or {}
            for n in _raw(core.list_namespace)["items"]
        }
    cache: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}

    def lookup(ns_name: str, kind: str, name: str) -> Mapping[str, Any] | None:
        key = (ns_name, kind)
        if key not in cache:
            try:
                if kind == "ReplicaSet":
                    items = _raw(apps.list_namespaced_replica_set, ns_name)["items"]
                else:
                    items = _raw(batch.list_namespaced_job, ns_name)["items"]
            except Exception:  # no permission to read owners: report the first step only
                items = []
            cache[key] = {str(i["metadata"]["name"]): i for i in items}
        return cache[key].get(name)

    return pods, ns_labels, lookup


def authorize(api: Any, token: str, namespace: str | None) -> str:
    """TokenReview then SubjectAccessReview for ``list pods`` in ``namespace`` (or cluster-wide)."""
    return auth.authorize(api, token, verb="list", resource="pods", namespace=namespace)


def run_audit(api: Any, config: Any, inject: Callable[..., Any], namespace: str | None) -> dict[str, Any]:
    pods, ns_labels, lookup = collect(api, namespace)
    return audit_pods(pods, namespace_labels=ns_labels, config=config, inject=inject, owner_lookup=lookup)


async def handle(request: Request, state: ServerState, namespace: str | None) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for ``GET /audit``."""
    if state.api is None:
        return 503, {"error": "this server has no Kubernetes API access (start it with --kubeconfig "
                              "or in a pod)"}
    try:
        token = auth.bearer_token(request.headers)
        user = await asyncio.to_thread(authorize, state.api, token, namespace)
        from injector.core import inject

        report = await asyncio.to_thread(run_audit, state.api, state.config.current, inject, namespace)
    except Denied as exc:
        return exc.status, {"error": str(exc)}
    except Exception as exc:
        status = getattr(exc, "status", None)
        if status == 404:
            return 404, {"error": f"namespace {namespace!r} not found"}
        return 502, {"error": f"Kubernetes API request failed: {type(exc).__name__}: {exc}"}
    report["requestedBy"] = user
    report["namespace"] = namespace
    return 200, report
