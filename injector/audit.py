"""The injection audit: for every pod, should it carry the sidecar, does it, which revision, is it stale.

Memory stays at two pages of pods plus the summary, whatever the cluster size: every LIST is
paged (``limit`` + ``continue``), each page is audited as it arrives and its rows are written
out while the next page is read (one page ahead, no more). Owners (ReplicaSet, Job) and
namespace labels are read by name for the pods of the page, with small bounded caches, never
by listing everything.

Layers (pure first):
- ``audit_pod`` / ``Summary``: one pod's row, the running totals (pure);
- ``Pages``: the paging rules (pure over a fetch function), including the restart after a
  410 Expired continue token;
- ``ClusterReader``: the Kubernetes I/O (sync client; the server runs it in a thread);
- ``iter_report`` / ``stream_chunks``: the report as rows then a summary, rendered as a
  streamed JSON document or JSON lines; ``AuditGate`` bounds concurrency and time; ``handle``
  is ``GET /audit`` (authenticated with TokenReview + SubjectAccessReview before any read).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson

from cni import annotations as ann
from injector import auth
from injector.auth import Denied
from injector.events import controller_of
from injector.result import Decision
from injector.selectors import (
    REVISION_LABEL,
    evaluate_selection,
    webhook_selectors,
)

if TYPE_CHECKING:
    from fastapi import Request
    from starlette.responses import Response

    from injector.server import ServerState

#: (namespace, kind, name) of a ReplicaSet or Job -> its controller reference, if it has one.
OwnerLookup = Callable[[str, str, str], Mapping[str, Any] | None]

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 5000  # the API server's own default cap for one page's response is far above this
MAX_RESTARTS = 3  # consecutive 410 Expired restarts of one LIST before giving up
CACHE_ENTRIES = 2048  # namespace labels and owners kept between pages (bounded, not per cluster)
MAX_RESTART_TARGETS = 10_000  # workloads remembered for --restart
LOOKUP_WORKERS = 8  # concurrent GETs for the owners / namespaces of one page
RESTARTABLE = ("Deployment", "StatefulSet", "DaemonSet")
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # the annotation `kubectl rollout restart` sets
#: Bodies up to this size are decoded with orjson, larger ones with the stdlib (see kube_get).
ORJSON_MAX_BODY = 4 << 20
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"


class AuditError(Exception):
    """The audit cannot start (``status`` is the HTTP code the endpoint answers with)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_page_size(value: int) -> int:
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise ValueError(f"page size {value} is outside 1..{MAX_PAGE_SIZE} (the page-size limit)")
    return value


# ---------------------------------------------------------------------------------------------
# one pod (pure)


@dataclass
class PodAudit:
    namespace: str
    pod: str
    owner: str | None  # "Deployment/web", "StatefulSet/db", ... or None for a bare pod
    should_inject: bool
    injected: bool
    revision: str | None  # revision it was injected with (status annotation)
    wanted_revision: str | None  # revision whose webhook selects it now (None: none does)
    config_hash: str | None  # hash of the config it was injected with
    stale: bool | None  # old revision, or another config of the same revision (None: unknown)
    needs_restart: bool
    decision: str
    reasons: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace, "pod": self.pod, "owner": self.owner,
            "shouldInject": self.should_inject, "injected": self.injected, "revision": self.revision,
            "wantedRevision": self.wanted_revision, "configHash": self.config_hash, "stale": self.stale,
            "needsRestart": self.needs_restart, "decision": self.decision, "reasons": self.reasons,
            "warnings": self.warnings,
        }


def owner_of(pod: Mapping[str, Any], namespace: str, lookup: OwnerLookup | None) -> str | None:
    """Follow controller references up to the top-level workload ("Kind/name")."""
    ref = controller_of(pod)
    if ref is None:
        return None
    kind, name = str(ref.get("kind", "")), str(ref.get("name", ""))
    for _ in range(3):
        if lookup is None or kind not in ("ReplicaSet", "Job"):
            break
        up = lookup(namespace, kind, name)
        if up is None:
            break
        kind, name = str(up.get("kind", "")), str(up.get("name", ""))
    return f"{kind}/{name}"


def wanted_revision(
    *, namespace: str, namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str],
    system_namespaces: Iterable[str] = (),
) -> str | None:
    """The revision whose webhook selects this pod today (the one selector definition), or None.

    Candidates are the revisions the labels name (namespace, then pod ``istio.io/rev``) and
    ``default``; the selectors decide, so ``istio-injection`` beating ``istio.io/rev`` and
    ``sidecar.istio.io/inject=false`` opting out come from the same place as the webhook's.
    """
    candidates = []
    for value in (namespace_labels.get(REVISION_LABEL), pod_labels.get(REVISION_LABEL), "default"):
        if value and value not in candidates:
            candidates.append(value)
    system = tuple(sorted(system_namespaces))
    for revision in candidates:
        if evaluate_selection(_selectors(revision, system), namespace=namespace,
                              namespace_labels=namespace_labels, pod_labels=pod_labels).selected:
            return revision
    return None


_SELECTORS: dict[tuple[str, tuple[str, ...]], list[Any]] = {}


def _selectors(revision: str, system: tuple[str, ...]) -> list[Any]:
    key = (revision, system)
    found = _SELECTORS.get(key)
    if found is None:
        if len(_SELECTORS) > 64:  # label values are the cluster's: keep the memo bounded
            _SELECTORS.clear()
        found = _SELECTORS[key] = webhook_selectors(revision, system)
    return found


def audit_pod(
    pod: Mapping[str, Any],
    *,
    namespace_labels: Mapping[str, str],
    config: Any,
    owner_lookup: OwnerLookup | None = None,
    config_for_revision: Callable[[Any, str], Any] | None = None,
) -> PodAudit:
    """One row. "Should" is the policy decision of the revision that selects the pod now.

    Only the decision is computed (``policy.decide``), not a render: the audit must stay well
    under a millisecond per pod, and an injected pod's patch is not what it asks about.
    """
    from injector.policy import decide

    meta = pod.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    labels = meta.get("labels") or {}
    status_text = (meta.get("annotations") or {}).get(ann.STATUS)
    status = None
    if status_text:
        try:
            status = ann.parse_status(status_text)
        except Exception:  # an unreadable status still means someone injected it
            status = None
    injected = bool(status_text)
    wanted = wanted_revision(namespace=namespace, namespace_labels=namespace_labels, pod_labels=labels,
                             system_namespaces=config.system_namespaces)
    judge = config
    if wanted and wanted != config.revision and config_for_revision is not None:
        judge = config_for_revision(config, wanted)  # this config's policy, as that revision runs it
    outcome = decide(metadata=meta, spec=pod.get("spec") or {}, namespace=namespace,
                     namespace_labels=namespace_labels, config=judge)
    should = outcome.decision is Decision.INJECT
    revision = status.revision if status else None
    config_hash = status.config_hash if status and status.config_hash else None
    stale: bool | None = None
    if injected and wanted and revision:
        if revision != wanted:
            stale = True  # e.g. the namespace was relabelled from default to canary
        elif wanted == config.revision and config_hash:
            stale = config_hash != config.config_hash
    return PodAudit(
        namespace=namespace,
        pod=str(meta.get("name") or ""),
        owner=owner_of(pod, namespace, owner_lookup),
        should_inject=should,
        injected=injected,
        revision=revision,
        wanted_revision=wanted if should else None,
        config_hash=config_hash,
        stale=stale,
        needs_restart=(should != injected) or bool(stale and should),
        decision=outcome.decision.value,
        reasons=[outcome.reason.as_dict()],
        warnings=[w.as_dict() for w in outcome.warnings],
    )


@dataclass
class Summary:
    """Running totals; the only state that grows with the cluster is the bounded restart set."""

    pods: int = 0
    should_inject: int = 0
    injected: int = 0
    missing_sidecar: int = 0
    unexpected_sidecar: int = 0
    stale: int = 0
    needs_restart: int = 0
    revisions: dict[str, int] = field(default_factory=dict)
    pages: int = 0
    restarts: int = 0
    complete: bool = False
    error: str | None = None
    timed_out: bool = False
    workloads: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (ns, kind, name) -> pods
    unrestartable: int = 0  # pods needing a restart without a Deployment/StatefulSet/DaemonSet
    targets_dropped: int = 0

    def add(self, row: PodAudit) -> None:
        self.pods += 1
        self.should_inject += row.should_inject
        self.injected += row.injected
        self.missing_sidecar += row.should_inject and not row.injected
        self.unexpected_sidecar += row.injected and not row.should_inject
        self.stale += bool(row.stale)
        # Revisions come from pods' annotations: at most 256 distinct ones are counted by name.
        if row.revision and (row.revision in self.revisions or len(self.revisions) < 256):
            self.revisions[row.revision] = self.revisions.get(row.revision, 0) + 1
        if row.needs_restart:
            self.needs_restart += 1
            kind, _, name = (row.owner or "").partition("/")
            if kind not in RESTARTABLE:
                self.unrestartable += 1
                return
            key = (row.namespace, kind, name)
            if key in self.workloads or len(self.workloads) < MAX_RESTART_TARGETS:
                self.workloads[key] = self.workloads.get(key, 0) + 1
            else:
                self.targets_dropped += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "pods": self.pods, "shouldInject": self.should_inject, "injected": self.injected,
            "missingSidecar": self.missing_sidecar, "unexpectedSidecar": self.unexpected_sidecar,
            "stale": self.stale, "needsRestart": self.needs_restart, "revisions": dict(self.revisions),
            "workloadsToRestart": len(self.workloads), "unrestartablePods": self.unrestartable,
            "pages": self.pages, "listRestarts": self.restarts, "complete": self.complete,
            "error": self.error,
        }


# ---------------------------------------------------------------------------------------------
# paging (pure over a fetch function)


def is_expired(exc: BaseException) -> bool:
    """410 Gone: the continue token's snapshot was compacted away."""
    return getattr(exc, "status", None) == 410


def object_key(obj: Mapping[str, Any]) -> str:
    """The storage order of a LIST (namespace/name), used to resume after a restart."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


class ListExpired(Exception):
    """The LIST kept expiring: MAX_RESTARTS restarts were not enough."""


class Pages:
    """Page through one LIST: ``fetch(limit, continue_token)`` returns the parsed list body.

    The API's rules for consistent paging: the first request carries no resourceVersion (a
    consistent, most recent read) and the following ones only the ``continue`` token (never a
    resourceVersion beside it). When a token has expired (410, the snapshot was compacted),
    a consistent result needs a fresh LIST without ``continue``: we start again and skip what
    was already yielded (objects at or before the last key), so every object is reported once;
    the pages after a restart come from the newer snapshot (``snapshots`` lists them).
    """

    def __init__(self, fetch: Callable[[int, str | None], Mapping[str, Any]], *,
                 page_size: int = DEFAULT_PAGE_SIZE, max_restarts: int = MAX_RESTARTS) -> None:
        self.fetch = fetch
        self.page_size = check_page_size(page_size)
        self.max_restarts = max_restarts
        self.pages = 0
        self.restarts = 0
        self.snapshots: list[str] = []

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        token: str | None = None
        last_key: str | None = None  # the last object yielded
        resume_after: str | None = None  # set by a restart: skip what was already yielded
        while True:
            try:
                body = self.fetch(self.page_size, token)
            except Exception as exc:
                if token is None or not is_expired(exc):
                    raise
                if self.restarts >= self.max_restarts:
                    raise ListExpired(f"the list expired {self.restarts + 1} times in a row "
                                      f"(the limit is {self.max_restarts} restarts)") from exc
                self.restarts += 1
                token, resume_after = None, last_key
                continue
            self.pages += 1
            meta = body.get("metadata") or {}
            if token is None:
                self.snapshots.append(str(meta.get("resourceVersion") or ""))
            items = body.get("items") or []
            if resume_after is not None:
                items = [i for i in items if object_key(i) > resume_after]
            if items:
                last_key = object_key(items[-1])
                yield items
            token = meta.get("continue") or None
            if not token:
                return


class PodPages:
    """Several LISTs paged one after the other (pods without, then with hostNetwork), as one."""

    def __init__(self, lists: list[Pages]) -> None:
        self.lists = lists

    @property
    def pages(self) -> int:
        return sum(p.pages for p in self.lists)

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self.lists)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        for pages in self.lists:
            yield from pages


# ---------------------------------------------------------------------------------------------
# cluster I/O (sync kubernetes client; the server runs it in a thread)


class KubeError(Exception):
    """A non-2xx answer; ``status`` and ``reason`` as the API server gave them."""

    def __init__(self, status: int, reason: str, body: bytes = b"") -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.body = status, reason, body


def kube_get(api: Any, path: str, query: Mapping[str, Any] | None = None, *,
             accept: str = "application/json", timeout: float = 30.0) -> Any:
    """GET through the ApiClient's REST layer (its TLS, auth and token refresh), JSON via orjson.

    orjson sets aside 12 times the body while it decodes (measured: 28 MiB for a 2.3 MiB page
    of 500 pods' metadata, 280 MiB at the 5,000-pod page limit), twice as fast as the stdlib
    (17 vs 36 ms CPU for that page), which needs little beyond the result: bodies above
    ``ORJSON_MAX_BODY`` (large pages, or pods with large metadata) take the stdlib, so the
    decoding's peak stays under some 48 MiB whatever the page size.

    Not the generated ``CoreV1Api`` & co: importing those costs seconds of CLI start-up, and
    their models are never used here (every body is read as plain dicts).
    """
    config = api.configuration
    headers = {"Accept": accept, **dict(getattr(api, "default_headers", {}) or {})}
    for setting in config.auth_settings().values():
        if setting.get("in") == "header" and setting.get("value"):
            headers[setting["key"]] = setting["value"]
    url = config.host.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")
    response = api.rest_client.request("GET", url, headers=headers, _request_timeout=timeout)
    data = response.read()
    if not 200 <= response.status < 300:
        raise KubeError(response.status, str(response.reason or ""), data or b"")
    with _collector_paused():
        return orjson.loads(data) if len(data) <= ORJSON_MAX_BODY else json.loads(data)


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a page is decoded: a page of 500 pods is some 200,000
    new dicts and lists (managedFields, mostly), which set off collection after collection
    (two thirds of the decoding time) although JSON cannot hold a cycle. Process-wide, so
    counted across threads: the last one out restores what was there before."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


#: glibc keeps blocks from this size up out of its heaps (its own default, made fixed): see below.
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
#: "dynamic" leaves glibc's default behaviour: bench/scale_audit.py measures both side by side.
HEAP_SWITCH = "MESH_AUDIT_MMAP_THRESHOLD"
_heap_fixed = False


def keep_pages_off_heap() -> bool:
    """Fix glibc's mmap threshold at its default (once per server process); True if now fixed.

    glibc raises the threshold to the size of every large block freed (up to 32 MiB): after
    the first page's response body (megabytes) is freed, the next bodies, their decoded
    pieces and the written chunks come from the heaps instead, one heap per thread (read
    ahead, lookups, the server's executor), and stay there as free heap once released. Peak
    RSS then grows with every page read and every audit: in one process, 3 audits of 5,000
    pods left 62, 94, 126 MiB free in the heaps and RSS at 92, 100, 111 MiB; with the
    threshold fixed, 4, 6, 7 MiB free and 75, 80, 83 MiB. Each large block is then its own
    mapping, handed back when freed (a page's few large blocks cost some page faults, not
    measurable beside its parsing). Process-wide, so the webhook's large reviews (> 128 KiB)
    are mapped too. Only the server's ``/audit`` fixes it: in the one-shot CLI the growth across
    audits cannot happen, and the dynamic threshold was both smaller and faster there
    (bench/scale_audit.py, 1,000 -> 20,000 pods: peak x1.17 vs x1.26, 0.13 vs 0.17 ms CPU/pod).
    """
    global _heap_fixed
    if _heap_fixed or os.environ.get(HEAP_SWITCH) == "dynamic":
        return _heap_fixed
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no such symbol): nothing to fix
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _heap_fixed = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return _heap_fixed


class _Lru(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class ClusterReader:
    """Reads pods page by page, and per page the labels of their namespaces and their owners."""

    def __init__(self, api: Any, namespace: str | None, *, page_size: int = DEFAULT_PAGE_SIZE,
                 request_timeout: float = 30.0) -> None:
        self.api = api
        self.namespace = namespace
        self.page_size = check_page_size(page_size)
        self.timeout = request_timeout
        self._namespaces: _Lru = _Lru(CACHE_ENTRIES)
        self._owners: _Lru = _Lru(CACHE_ENTRIES)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _map(self, fn: Callable[[Any], Any], keys: list[Any]) -> list[Any]:
        if len(keys) <= 1:
            return [fn(k) for k in keys]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(LOOKUP_WORKERS, thread_name_prefix="audit-lookup")
        return list(self._pool.map(fn, keys))

    def start(self) -> None:
        """Fail early (404, 403) on a namespace we cannot judge, before any row is written."""
        if self.namespace:
            try:
                self._namespaces.put(self.namespace, self._read_namespace(self.namespace, missing_ok=False))
            except Exception as exc:
                if getattr(exc, "status", None) == 404:
                    raise AuditError(404, f"namespace {self.namespace!r} not found") from None
                raise

    def _read_namespace(self, name: str, *, missing_ok: bool = True) -> dict[str, str]:
        try:
            body = kube_get(self.api, f"/api/v1/namespaces/{quote(name)}", accept=METADATA_ONLY,
                            timeout=self.timeout)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if missing_ok and status == 404:
                return {}  # deleted since its pods were listed: judged as unlabelled
            if status == 403:  # judging without the labels would report every pod wrongly
                raise AuditError(403, f"may not get namespace {name!r}: the audit needs its labels "
                                      "(get on namespaces)") from None
            raise
        return dict((body.get("metadata") or {}).get("labels") or {})

    def _fetch_pods(self, limit: int, token: str | None, host_network: bool = False) -> dict[str, Any]:
        """One page of pods as metadata only, with ``spec.hostNetwork`` known from the field selector.

        The decision needs the metadata and, from the spec, only ``hostNetwork``: asking for
        PartialObjectMetadata per field-selected half keeps the page a fraction of full pods
        (the injected containers are most of a pod) for the API server to encode and us to parse.
        """
        selector = f"spec.hostNetwork={str(host_network).lower()}"
        query: dict[str, Any] = {"limit": limit, "fieldSelector": selector}
        if token:
            query["continue"] = token  # and no resourceVersion beside it (the API's rule)
        path = f"/api/v1/namespaces/{quote(self.namespace)}/pods" if self.namespace else "/api/v1/pods"
        body = kube_get(self.api, path, query, accept=METADATA_LIST, timeout=self.timeout)
        for item in body.get("items") or ():
            # managedFields are most of a page's objects and nothing here reads them: dropped at
            # once, the page held while the next one is decoded is a ninth of its decoded size
            # (1.3 of 11.6 MiB for 500 pods; the freeing costs what it would later, ~5 ms).
            (item.get("metadata") or {}).pop("managedFields", None)
            if host_network:
                item["spec"] = {"hostNetwork": True}
        return body  # type: ignore[no-any-return]

    def pages(self) -> PodPages:
        return PodPages([
            Pages(lambda limit, token, hn=hn: self._fetch_pods(limit, token, hn), page_size=self.page_size)
            for hn in (False, True)
        ])

    def namespace_labels(self, pods: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
        names = {str((p.get("metadata") or {}).get("namespace") or "") for p in pods}
        missing = sorted(n for n in names if n not in self._namespaces)
        for name, labels in zip(missing, self._map(self._read_namespace, missing), strict=True):
            self._namespaces.put(name, labels)
        return {n: self._namespaces[n] for n in names if n in self._namespaces}

    def _read_owner(self, key: tuple[str, str, str]) -> Mapping[str, Any] | None:
        namespace, kind, name = key
        group, plural = ("apps/v1", "replicasets") if kind == "ReplicaSet" else ("batch/v1", "jobs")
        path = f"/apis/{group}/namespaces/{quote(namespace)}/{plural}/{quote(name)}"
        try:
            return kube_get(self.api, path, accept=METADATA_ONLY, timeout=self.timeout)  # type: ignore[no-any-return]
        except Exception:  # gone, or no permission to read owners: report the first step only
            return None

    def owner_lookup(self, pods: list[dict[str, Any]]) -> OwnerLookup:
        """Resolve this page's ReplicaSet/Job owners by name, concurrently, with a bounded cache."""
        wanted: set[tuple[str, str, str]] = set()
        for pod in pods:
            ref = controller_of(pod)
            if ref is not None and ref.get("kind") in ("ReplicaSet", "Job"):
                namespace = str((pod.get("metadata") or {}).get("namespace") or "")
                wanted.add((namespace, str(ref["kind"]), str(ref.get("name", ""))))
        missing = sorted(k for k in wanted if k not in self._owners)
        # Only each owner's controller reference is kept: the cache lives across pages, and
        # whole objects (managedFields and all) made peak memory grow until it was full.
        for key, obj in zip(missing, self._map(self._read_owner, missing), strict=True):
            self._owners.put(key, controller_of(obj) if obj is not None else None)
        page = {k: self._owners.get(k) for k in wanted}

        def lookup(namespace: str, kind: str, name: str) -> Mapping[str, Any] | None:
            return page.get((namespace, kind, name))

        return lookup


# ---------------------------------------------------------------------------------------------
# the report: rows page by page, then the summary


@dataclass
class Report:
    """A running audit: iterate ``pages()`` for lists of rows; ``summary`` is final afterwards."""

    reader: ClusterReader
    config: Any
    summary: Summary = field(default_factory=Summary)
    deadline: float | None = None  # time.monotonic() value after which no page is read

    def header(self) -> dict[str, Any]:
        return {"configHash": self.config.config_hash, "revision": self.config.revision,
                "namespace": self.reader.namespace}

    def pages(self) -> Iterator[list[PodAudit]]:
        """Audit page after page; errors end the iteration and land in ``summary.error``."""
        from injector.documents import config_for_revision

        pages = self.reader.pages()
        try:
            for pods, ns_labels, lookup in self._read_ahead(iter(pages)):
                rows = [
                    audit_pod(p, namespace_labels=ns_labels.get(_namespace_of(p), {}), config=self.config,
                              owner_lookup=lookup, config_for_revision=config_for_revision)
                    for p in pods
                ]
                for row in rows:
                    self.summary.add(row)
                self.summary.pages, self.summary.restarts = pages.pages, pages.restarts
                yield rows
            self.summary.complete = True
        except Exception as exc:
            self.summary.error = _describe(exc)
            self.summary.timed_out = isinstance(exc, TimeoutError)
        finally:
            self.summary.pages, self.summary.restarts = pages.pages, pages.restarts
            self.reader.close()

    def _read_ahead(self, iterator: Iterator[list[dict[str, Any]]]
                    ) -> Iterator[tuple[list[dict[str, Any]], dict[str, dict[str, str]], OwnerLookup]]:
        """Each page with its namespaces' labels and owners, the next one read in a background
        thread while this one is audited and written: the API server's time overlaps ours, and
        at most two pages are held. No page is read once the deadline has passed."""

        def read() -> tuple[list[dict[str, Any]], dict[str, dict[str, str]], OwnerLookup] | None:
            pods = next(iterator, None)
            if pods is None:
                return None
            return pods, self.reader.namespace_labels(pods), self.reader.owner_lookup(pods)

        def next_page() -> Future[Any]:
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise TimeoutError("the audit ran past its deadline; the report is incomplete")
            return pool.submit(read)

        pool = ThreadPoolExecutor(1, thread_name_prefix="audit-read-ahead")
        try:
            ahead = next_page()
            while (page := ahead.result()) is not None:
                try:
                    ahead = next_page()
                except TimeoutError:
                    yield page
                    raise
                yield page
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # the reader is closed after this


def _namespace_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, ListExpired, AuditError)):
        return str(exc)
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status:
        return f"Kubernetes API request failed: {status} {reason or ''}".rstrip()
    return f"Kubernetes API request failed: {type(exc).__name__}: {exc}"


FORMATS = ("json", "jsonl")


def render_chunks(
    report: Report, fmt: str = "json", extra: Mapping[str, Any] | None = None
) -> Iterator[bytes]:
    """The report as bytes, one chunk per page (the first chunk only once the first page is in).

    ``json``: one JSON object written as it goes: the header keys, ``"pods": [...]`` (rows
    streamed) and ``"summary"`` last. ``jsonl``: one JSON line per pod, then one line
    ``{"summary": ..., <header>}``. Either way a consumer knows the end came by the summary's
    ``complete`` (false with ``error`` when the audit stopped early).
    """
    header = {**report.header(), **(extra or {})}
    if fmt == "jsonl":
        for rows in report.pages():
            yield b"".join(orjson.dumps(r.as_dict()) + b"\n" for r in rows)
        yield orjson.dumps({"summary": report.summary.as_dict(), **header}) + b"\n"
        return
    opening = orjson.dumps(header)[:-1] + b',"pods":['
    for rows in report.pages():
        body = b",\n".join(orjson.dumps(r.as_dict()) for r in rows)
        yield (opening + b"\n" if opening else b",\n") + body
        opening = b""
    yield opening + b'\n],"summary":' + orjson.dumps(report.summary.as_dict()) + b"}\n"


# ---------------------------------------------------------------------------------------------
# --restart: the rollout-restart patch `kubectl rollout restart` sends


def restart_patch(now: datetime | None = None) -> dict[str, Any]:
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}


def restart_workloads(api: Any, targets: Iterable[tuple[str, str, str]], *, dry_run: bool,
                      now: datetime | None = None) -> Iterator[tuple[tuple[str, str, str], str | None]]:
    """Patch each workload's pod template (a rolling restart); yields (target, error or None).

    ``dry_run`` sends the same patches with ``dryRun=All``: the API server validates and
    authorises them without persisting, so a dry run finds missing RBAC too.
    """
    from kubernetes import client

    apps = client.AppsV1Api(api)
    calls = {"Deployment": apps.patch_namespaced_deployment,
             "StatefulSet": apps.patch_namespaced_stateful_set,
             "DaemonSet": apps.patch_namespaced_daemon_set}
    body = restart_patch(now)
    for target in targets:
        namespace, kind, name = target
        kwargs: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        try:
            calls[kind](name, namespace, body, _preload_content=False,
                        _content_type="application/strategic-merge-patch+json", **kwargs)
        except Exception as exc:
            status = getattr(exc, "status", None)
            yield target, f"{status} {getattr(exc, 'reason', '')}".strip() if status else str(exc)
            continue
        yield target, None


# ---------------------------------------------------------------------------------------------
# GET /audit


def authorize(api: Any, token: str, namespace: str | None) -> str:
    """TokenReview then SubjectAccessReview for ``list pods`` in ``namespace`` (or cluster-wide)."""
    return auth.authorize(api, token, verb="list", resource="pods", namespace=namespace)


class AuditGate:
    """Bounds ``GET /audit``: at most ``max_concurrent`` audits at once (others get 429 at once,
    not a queue), each stopped after ``deadline_s`` (the report then ends with an error)."""

    def __init__(self, max_concurrent: int = 2, deadline_s: float = 120.0) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent {max_concurrent} must be at least 1 "
                             "(the audit concurrency limit)")
        self.max_concurrent = max_concurrent
        self.deadline_s = deadline_s
        self.running = 0

    def try_enter(self) -> bool:
        if self.running >= self.max_concurrent:
            return False
        self.running += 1
        return True

    def leave(self) -> None:
        self.running -= 1


GATE = AuditGate()  # one per process; the server may replace it (e.g. from its flags)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


async def handle(request: Request, state: ServerState, namespace: str | None,
                 gate: AuditGate | None = None) -> Response:
    """``GET /audit``: authorise, then stream the report (``?format=json|jsonl``, ``?pageSize=``).

    Errors found before the first row (auth, bad parameters, a missing namespace, the API
    failing on the first page) get their status code; later ones end the report with
    ``summary.complete: false`` and ``summary.error``.
    """
    from starlette.responses import StreamingResponse

    gate = gate or GATE
    if state.api is None:
        return _error(503, "this server has no Kubernetes API access (start it with --kubeconfig "
                           "or in a pod)")
    params = request.query_params
    fmt = params.get("format") or ("jsonl" if "ndjson" in request.headers.get("accept", "") else "json")
    if fmt not in FORMATS:
        return _error(400, f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    try:
        page_size = check_page_size(int(params.get("pageSize") or DEFAULT_PAGE_SIZE))
    except ValueError as exc:
        return _error(400, f"pageSize: {exc}")
    try:
        token = auth.bearer_token(request.headers)
    except Denied as exc:
        return _error(exc.status, f"{exc} of a user allowed to list pods")
    if not gate.try_enter():
        return _error(429, f"{gate.max_concurrent} audits are already running (the audit concurrency "
                           "limit); retry later", {"retry-after": "5"})
    chunks: Iterator[bytes] | None = None
    try:
        user = await asyncio.to_thread(authorize, state.api, token, namespace)
        keep_pages_off_heap()  # a long-lived server: see there (the one-shot CLI leaves glibc alone)
        reader = ClusterReader(state.api, namespace, page_size=page_size)
        await asyncio.to_thread(reader.start)
        report = Report(reader, state.config.current, deadline=time.monotonic() + gate.deadline_s)
        chunks = render_chunks(report, fmt, {"requestedBy": user})
        first = await asyncio.to_thread(next, chunks)  # the first page: API errors still get a status
        if report.summary.error and report.summary.pages == 0:
            raise AuditError(504 if report.summary.timed_out else 502, report.summary.error)
    except Exception as exc:
        if chunks is not None:
            chunks.close()
        gate.leave()
        if isinstance(exc, (Denied, AuditError)):
            return _error(exc.status, str(exc))
        return _error(502, _describe(exc))

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in _drain(chunks):
                yield chunk
        finally:
            await asyncio.to_thread(chunks.close)
            gate.leave()

    media = "application/x-ndjson" if fmt == "jsonl" else "application/json"
    return StreamingResponse(body(), media_type=media)


async def _drain(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A blocking chunk iterator driven from a thread, one chunk (one API page) at a time."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, chunks, done)
        if chunk is done:
            return
        yield chunk  # type: ignore[misc]
