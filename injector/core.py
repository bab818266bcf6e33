"""The injection core: ``inject(obj, config=...)`` -> InjectionResult. Pure: no I/O, no clock.

One pod (or a workload's pod template) goes through named steps, as Istio's ``injectPod``:
decide (``policy``) -> uninject an earlier injection (``uninject``) -> parse the annotations
once (``overrides``) -> rewrite probes (``probes``), merge Prometheus (``metadata``) -> build
the template context (``context``) -> render and lay out (``render``) -> order the containers
(``reorder``) -> labels, annotations, status (``metadata``) -> JSON Patch against the input,
bounded (``patch``). The mutated object shares every unchanged subtree with the input (treat
both as read-only); that, the config's memo and a linear diff keep large pods cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cni import annotations as ann
from injector import context as ctx
from injector import metadata, render, reorder
from injector.config import InjectorConfig, default_config
from injector.merge import deep_merge, named, overlay_container
from injector.overrides import Overrides, parse_overrides
from injector.patch import create_patch, patch_json
from injector.policy import decide
from injector.probes import probers_json, rewrite_app_probes
from injector.result import Decision, InjectionResult, Reason, ReasonCode, Rejected
from injector.shape import pod_shape_problem
from injector.uninject import PodView, Previous, uninject

#: kind -> path (as keys) from the object to its pod template.
WORKLOAD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "DeploymentConfig": ("spec", "template"),  # OpenShift, apps.openshift.io/v1
}
#: The label OpenShift puts on pods of a DeploymentConfig (their controller is a
#: ReplicationController named ``<name>-<version>``).
DEPLOYMENT_CONFIG_LABEL = "deploymentconfig"
@dataclass
class _Workload:
    """Who owns the pod, for workload name, owner and canonical-name defaults."""

    kind: str
    api_version: str
    name: str


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
        elif result.patch:
            result.patch_json = patch_json(result.patch)
            limit = config.model.limits.max_patch_bytes
            if len(result.patch_json) > limit:
                problem = (
                    f"the patch for this {kind} would be {len(result.patch_json)} bytes, over the limit "
                    f"of {limit} bytes (limits.maxPatchBytes)"
                )
                return InjectionResult(
                    Decision.REJECT, [Reason(ReasonCode.PATCH_TOO_LARGE, problem)], result.warnings,
                    mutated=dict(obj), kind=kind,
                )
    return result


def _malformed(obj: Any, kind: str, problem: str) -> InjectionResult:
    mutated = dict(obj) if isinstance(obj, dict) else {}
    return InjectionResult(
        Decision.REJECT, [Reason(ReasonCode.MALFORMED_OBJECT, problem)], mutated=mutated, kind=kind
    )


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
    """The controller that owns a pod, as Istio's webhook resolves it: only for a pod the API
    server is still to name (generateName: a controller made it; a StatefulSet's pods carry
    their own names, so they are their own workload), a Deployment for a ReplicaSet with the
    pod's template hash, an Argo Rollout likewise, a DeploymentConfig for its
    ReplicationController, a CronJob for a Job named ``<cronjob>-<8-10 digits>``."""
    name = meta.get("name") or (meta.get("generateName") or "").rstrip("-")
    if not meta.get("generateName"):
        return _Workload("Pod", "v1", name)
    labels = meta.get("labels") or {}
    for ref in meta.get("ownerReferences") or ():
        if not (isinstance(ref, dict) and ref.get("controller")):
            continue
        kind, owner, api = (str(ref.get(k) or "") for k in ("kind", "name", "apiVersion"))
        template_hash = labels.get("pod-template-hash")
        rollout_hash = labels.get("rollouts-pod-template-hash")
        if kind == "ReplicaSet" and template_hash and owner.endswith(template_hash):
            return _Workload("Deployment", api, owner.removesuffix("-" + template_hash))
        if kind == "ReplicaSet" and rollout_hash and owner.endswith(rollout_hash):
            return _Workload("Rollout", "v1alpha1", owner.removesuffix("-" + rollout_hash))
        deployment_config = labels.get(DEPLOYMENT_CONFIG_LABEL)
        if kind == "ReplicationController" and deployment_config:  # as Istio: kind changes, API stays
            return _Workload("DeploymentConfig", api, deployment_config)
        cron = _CRONJOB_JOB.fullmatch(owner) if kind == "Job" else None
        if cron:
            return _Workload("CronJob", "batch/v1", cron.group(1))
        return _Workload(kind, api, owner or name)
    return _Workload("Pod", "v1", name)


#: A Job a CronJob made: ``<cronjob>-<scheduled time in minutes>`` (Istio's heuristic).
_CRONJOB_JOB = re.compile(r"(.+)-[0-9]{8,10}")


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
        view = PodView(dict(meta), dict(spec))
        previous = uninject(view, config)
        mutated_meta, mutated_spec = _inject_steps(
            view, previous, namespace=namespace, config=config, workload=workload, pod_name=pod_name
        )
    except Rejected as rejected:
        return InjectionResult(Decision.REJECT, [rejected.reason], outcome.warnings, mutated=dict(pod))
    mutated = dict(pod)
    mutated["metadata"] = mutated_meta
    mutated["spec"] = mutated_spec
    reasons = [Reason(ReasonCode.INJECTED, "sidecar injected"), outcome.reason]
    return InjectionResult(Decision.INJECT, reasons, outcome.warnings + view.warnings, mutated=mutated)


def _inject_steps(
    view: PodView,
    previous: Previous,
    *,
    namespace: str,
    config: InjectorConfig,
    workload: _Workload,
    pod_name: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Istio's injectPod, step by step: overrides, split, checks, probes, Prometheus, context,
    render, finish, reorder, volumes, metadata."""
    meta, spec = view.metadata, view.spec
    annotations: dict[str, str] = dict(meta.get("annotations") or {})
    labels: dict[str, str] = dict(meta.get("labels") or {})
    overrides = parse_overrides(annotations, config)
    choice = overrides.choice

    overlays, app_containers, user_inits = _split(spec, overrides, previous)
    user_overlays = _user_overlays(spec, overrides)
    _check_proxy_uid(app_containers, spec, overrides, config)

    # Probes of app containers and of native sidecars -> the agent's status port.
    probers: dict[str, Any] = {}
    if overrides.rewrite_probes:
        sidecars = [i for i, c in enumerate(user_inits) if c.get("restartPolicy") == "Always"]  # native
        probed = app_containers + [user_inits[i] for i in sidecars]
        # A native proxy runs before the user's init containers, except those asked to go first.
        after_proxy: frozenset[str] = frozenset()
        if sidecars and overrides.native:
            before = reorder.before_proxy_names(annotations)
            after_proxy = frozenset(user_inits[i].get("name", "") for i in sidecars) - set(before)
        rewritten, probers, unresolved = rewrite_app_probes(probed, overrides.proxy.status_port, after_proxy)
        app_containers = rewritten[: len(app_containers)]
        user_inits = list(user_inits)
        for i, container in zip(sidecars, rewritten[len(app_containers) :], strict=True):
            user_inits[i] = container
        for path, port in unresolved:
            view.warnings.append(
                Reason(
                    ReasonCode.UNRESOLVED_PROBE_PORT,
                    f"probe {path} uses port {port!r}, which no container port names",
                )
            )
    # Prometheus: the agent scrapes the app and serves both on the status port.
    saved_scrape = None
    if overrides.prometheus_merge:
        saved_scrape = metadata.prometheus_merge(annotations, overrides.proxy.status_port)

    fixed = ctx.fixed_context(config, overrides.proxy)
    canonical_name, canonical_revision = metadata.canonical_names(labels, workload.name, pod_name)
    pod = ctx.pod_group(
        pod_name=pod_name,
        namespace=namespace,
        service_account=spec.get("serviceAccountName") or "default",
        app_containers=app_containers,
        pod_containers=app_containers + _own_containers(user_overlays, annotations),
        app_probers=probers_json(probers),
        prometheus_annotations=saved_scrape,
        workload_kind=workload.kind,
        workload_api=workload.api_version,
        workload_name=workload.name,
        canonical_name=canonical_name,
        canonical_revision=canonical_revision,
        bootstrap_override=overrides.bootstrap_override,
    )
    rendered = render.render_templates(choice, fixed, ctx.template_context(fixed, pod), overrides, config)
    r_meta = rendered.get("metadata") or {}
    r_spec = rendered.get("spec") or {}
    app_fragment = rendered.get("appContainers")
    if app_fragment:  # e.g. proxyless gRPC: the xDS bootstrap env and mounts in every app container
        app_containers = [overlay_container(c, app_fragment) for c in app_containers]

    # The API server's ServiceAccount plugin mounts the token into every container that lacks
    # it; it re-runs after a webhook changes the pod, and would then change ours, which calls us
    # again (reinvocationPolicy IfNeeded). Mount it as it would, so nothing changes after us.
    if overrides.user_volumes or overrides.user_mounts:
        r_spec = _with_user_volumes(r_spec, overrides)
    finish = render.Finisher(overlays, previous, render.token_mount(app_containers, user_inits))
    r_containers = [finish(c) for c in named(r_spec.get("containers"))]
    r_inits = [finish(c) for c in named(r_spec.get("initContainers"))]
    proxy = next((c for c in r_containers if c.get("name") == ann.PROXY_CONTAINER), None)
    others = [c for c in r_containers if c is not proxy]
    # A template may leave the pod's traffic alone (gateway, proxyless gRPC): no capture init.
    capture = render.capture_init(overrides.proxy.mode, config) if choice.options.capture else None
    capture_inits = [finish(capture)] if capture else []
    native = overrides.native and proxy is not None
    if native:
        proxy = reorder.with_native_restart(proxy)  # type: ignore[arg-type]
    init_list, container_list = reorder.order_containers(
        capture=capture_inits,
        proxy=proxy,
        template_containers=others,
        template_inits=r_inits,
        app_containers=app_containers,
        user_inits=user_inits,
        native=native,
        proxy_first=overrides.proxy.hold_command is not None,
        before_proxy=reorder.before_proxy_names(annotations),
    )

    new_spec = dict(spec)
    new_spec["containers"] = container_list
    if init_list or "initContainers" in spec:
        new_spec["initContainers"] = init_list
    added_volumes, added_secrets = render.lay_out_volumes(
        spec, new_spec, r_spec, previous, config=config, capture=capture
    )
    r_security = r_spec.get("securityContext")
    if isinstance(r_security, dict) and r_security:  # e.g. grpc-agent's fsGroup: the pod's own fields win
        new_spec["securityContext"] = deep_merge(r_security, spec.get("securityContext") or {})
    native_proxy = [proxy] if native and proxy else []
    status = (  # InjectionStatus's fields, in order
        tuple(c["name"] for c in capture_inits + native_proxy + r_inits),
        tuple(c["name"] for c in ([] if native or proxy is None else [proxy]) + others),
        tuple(v["name"] for v in added_volumes),
        tuple(s["name"] for s in added_secrets),
        config.revision,
        tuple(t.name for t in choice.templates),
        config.config_hash,
    )
    new_meta = metadata.injected_metadata(
        meta,
        labels,
        annotations,
        r_meta,
        config=config,
        overrides=overrides,
        # Which container kubectl picks: only worth saying when we added one (not grpc-simple).
        default_container=app_containers[0].get("name", "") if app_containers and r_containers else None,
        status=status,
        user_overlays=_placed(user_overlays, init_list),
    )
    return new_meta, new_spec


def _split(
    spec: Mapping[str, Any], overrides: Overrides, previous: Previous
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(overlays by name, app containers, user init containers): a pod container named like one
    we add is the user's overlay on ours (laid over the earlier injection's, if any)."""
    choice = overrides.choice
    overlays = dict(previous.overlays)
    app_containers = []
    for c in named(spec.get("containers")):
        if c.get("name") in choice.container_names:  # a template without a proxy keeps the pod's
            overlays[c["name"]] = overlay_container(overlays.get(c["name"], {}), c)
        else:
            app_containers.append(c)
    user_inits = []
    for c in named(spec.get("initContainers")):
        if c.get("name") in choice.init_container_names or c.get("name") in _OUR_INIT_NAMES:
            overlays[c["name"]] = overlay_container(overlays.get(c["name"], {}), c)
        else:
            user_inits.append(c)
    return overlays, app_containers, user_inits


_OUR_INIT_NAMES = (ann.PROXY_CONTAINER, ann.VALIDATION_CONTAINER, ann.INIT_CONTAINER)


def _with_user_volumes(r_spec: Mapping[str, Any], overrides: Overrides) -> dict[str, Any]:
    """The rendered spec (read-only) with sidecar.istio.io/userVolume's volumes added to the
    pod's and userVolumeMount's mounts to the proxy's, after the template's, as Istio adds them."""
    out = dict(r_spec)
    if overrides.user_volumes:
        ours = named(r_spec.get("volumes"))
        taken = {v.get("name") for v in ours}.intersection(v["name"] for v in overrides.user_volumes)
        if taken:
            raise Rejected(
                ReasonCode.INVALID_ANNOTATION,
                f"annotation sidecar.istio.io/userVolume: {', '.join(sorted(taken))} is a volume the "
                "injection adds itself; choose another name",
            )
        out["volumes"] = [*ours, *overrides.user_volumes]
    if overrides.user_mounts:
        containers = []
        for c in named(r_spec.get("containers")):
            if c.get("name") == ann.PROXY_CONTAINER:
                c = {**c, "volumeMounts": [*(c.get("volumeMounts") or ()), *overrides.user_mounts]}
            containers.append(c)
        out["containers"] = containers
    return out


def _user_overlays(spec: Mapping[str, Any], overrides: Overrides) -> list[dict[str, Any]]:
    """The pod's own containers named like ones a template adds, as the user wrote them (an
    earlier injection's are gone: uninject took them out), for ``proxy.istio.io/overrides``."""
    names = overrides.choice.container_names | overrides.choice.init_container_names
    found = [c for c in named(spec.get("containers")) if c.get("name") in names]
    found += [c for c in named(spec.get("initContainers")) if c.get("name") in names]
    return [{k: v for k, v in c.items() if not (k == "image" and v == "auto")} for c in found]


def _own_containers(
    user_overlays: list[dict[str, Any]], annotations: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The pod's own containers named like ours, as the user wrote them: on a re-injection
    (uninject took them out) from the proxy.istio.io/overrides record, so the ports they
    declare (a gateway's listeners) stay in ISTIO_META_POD_PORTS."""
    if user_overlays or metadata.OVERRIDES not in annotations:
        return user_overlays
    try:
        recorded = json.loads(annotations[metadata.OVERRIDES])
    except (ValueError, RecursionError):  # a nesting deeper than the parser's recursion
        return []
    if not isinstance(recorded, dict):
        return []
    return [c for key in ("containers", "initContainers") for c in named(recorded.get(key))]


def _placed(
    user_overlays: list[dict[str, Any]], init_list: list[dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """The overlays by the list their container ended up in (a native proxy is an init container)."""
    inits = {c.get("name") for c in init_list}
    out: dict[str, list[dict[str, Any]]] = {}
    for c in user_overlays:
        out.setdefault("initContainers" if c.get("name") in inits else "containers", []).append(c)
    return out


def _check_proxy_uid(
    app_containers: list[dict[str, Any]],
    spec: Mapping[str, Any],
    overrides: Overrides,
    config: InjectorConfig,
) -> None:
    """Refuse an app container running as the proxy's UID: its traffic would bypass the redirect."""
    plan = overrides.plan
    if not plan.redirects or not config.pod_defaults.captures or not overrides.choice.options.capture:
        return  # without a redirect nothing is bypassed
    pod_security = spec.get("securityContext") or {}
    for c in app_containers:
        own = (c.get("securityContext") or {}).get("runAsUser")
        uid = own if own is not None else pod_security.get("runAsUser")
        if uid == plan.proxy_uid:
            raise Rejected(
                ReasonCode.PROXY_UID_CONFLICT,
                f"container {c.get('name')!r} runs as UID {plan.proxy_uid}, the proxy's UID: its "
                "traffic would bypass the sidecar; run it as another user",
            )
