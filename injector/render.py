"""Render the selected templates and lay the result into the pod: containers finished (the
user's overlay, kept pod-derived env, the token mount), volumes and image pull secrets added.

Rendering uses the config memo: one specialised renderer per (template, ProxySettings), so the
fixed groups are constants and only the pod group is evaluated per call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cni import annotations as ann
from injector.context import FixedContext
from injector.merge import deep_merge, merge_keyed, named, overlay_user_container
from injector.result import ReasonCode, Rejected
from injector.template import TemplateError
from injector.uninject import Previous

if TYPE_CHECKING:
    from injector.config import InjectorConfig
    from injector.overrides import Overrides, TemplateChoice

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


def render_templates(
    choice: TemplateChoice, fixed: FixedContext, context: Mapping[str, Any], overrides: Overrides,
    config: InjectorConfig,
) -> dict[str, Any]:
    """The selected templates rendered and merged in order (read-only: shares constant parts)."""
    rendered: dict[str, Any] = {}
    try:
        for template in choice.templates:
            render = config.memo.get(
                "render", (template.name, overrides.proxy), lambda t=template: t.specialise(fixed.consts)
            )
            part = render(context)
            rendered = deep_merge(rendered, part) if rendered else part
    except TemplateError as err:
        raise Rejected(ReasonCode.UNKNOWN_TEMPLATE, f"template rendering failed: {err}") from None
    return rendered


class Finisher:
    """Completes each container we add: the user's same-named container laid over it, an
    unchanged pod-derived env item kept as it was stored, the service-account token mount."""

    def __init__(
        self, overlays: Mapping[str, dict[str, Any]], previous: Previous, token_mount: dict[str, Any] | None
    ) -> None:
        self.overlays = overlays
        self.derived_env = previous.derived_env
        self.token_mount = token_mount

    def __call__(self, container: dict[str, Any]) -> dict[str, Any]:
        name = container.get("name")
        over = self.overlays.get(name)  # type: ignore[arg-type]
        out = overlay_user_container(container, over) if over else container
        derived = self.derived_env.get(name) if self.derived_env else None  # type: ignore[arg-type]
        if derived:
            out = _keep_derived_env(out, derived)
        if self.token_mount is not None:
            out = _with_mount(out, self.token_mount)
        return out


def lay_out_volumes(
    spec: dict[str, Any],
    new_spec: dict[str, Any],
    rendered_spec: Mapping[str, Any],
    previous: Previous,
    *,
    config: InjectorConfig,
    capture: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Add the rendered volumes and image pull secrets to ``new_spec``; return (volumes, secrets) added."""
    r_volumes = named(rendered_spec.get("volumes"))
    if capture is not None and capture["name"] == ann.INIT_CONTAINER:
        r_volumes = merge_keyed([PODINFO_VOLUME], r_volumes, "name")
    existing_volumes = {v.get("name") for v in named(spec.get("volumes"))}
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
    secrets = named(rendered_spec.get("imagePullSecrets")) + [
        {"name": n} for n in config.mesh.image_pull_secrets
    ]
    existing_secrets = {s.get("name") for s in named(spec.get("imagePullSecrets"))}
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
    return added_volumes, added_secrets


def capture_init(mode: str, config: InjectorConfig) -> dict[str, Any] | None:
    """The capture init container for the interception mode (None: no capture), memoised."""
    found: dict[str, Any] | None = config.memo.get("capture", mode, lambda: _capture_init(mode, config))
    return found


def _capture_init(mode: str, config: InjectorConfig) -> dict[str, Any] | None:
    container = _capture_container(mode, config)
    if container is not None and config.proxy.image_pull_policy:  # unset: the API server's default
        container = {**container, "imagePullPolicy": config.proxy.image_pull_policy}
    return container


def _capture_container(mode: str, config: InjectorConfig) -> dict[str, Any] | None:
    proxy = config.proxy
    if mode == ann.MODE_NONE or proxy.capture == "none":
        return None
    small = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "2000m", "memory": "64Mi"}}
    if proxy.capture == "init":
        # Same redirect code as the CNI plugin, from the same resolved annotations.
        return {
            "name": ann.INIT_CONTAINER,
            "image": proxy.cni_image,
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
        "name": ann.VALIDATION_CONTAINER,
        "image": proxy.cni_image,
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


SERVICE_ACCOUNT_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def token_mount(*groups: list[dict[str, Any]]) -> dict[str, Any] | None:
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
