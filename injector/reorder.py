"""Container order, as Istio's injector leaves it (its ``reorderPod`` and native-sidecar rules).

- Init containers: the capture init container (``istio-validation`` or ``istio-init``) first,
  so no other init container runs before the redirect is in place (or proven); with native
  sidecars the proxy next (``restartPolicy: Always``, so later init containers already have a
  running proxy), then the templates' init containers, then the user's.
- Containers: the app containers first and the proxy last; with
  ``holdApplicationUntilProxyStarts`` (and no native sidecar) the proxy first, so its
  ``postStart`` wait holds the app containers back until it is ready.
"""

from __future__ import annotations

from typing import Any

Containers = list[dict[str, Any]]


def with_native_restart(proxy: dict[str, Any]) -> dict[str, Any]:
    """The proxy as a native sidecar: an init container that keeps running."""
    out = dict(proxy)
    out["restartPolicy"] = "Always"
    return out


def order_containers(
    *,
    capture: Containers,
    proxy: dict[str, Any] | None,
    template_containers: Containers,
    template_inits: Containers,
    app_containers: Containers,
    user_inits: Containers,
    native: bool,
    proxy_first: bool,
) -> tuple[Containers, Containers]:
    """(init containers, containers) in Istio's order; ``proxy`` already native when ``native``."""
    if native and proxy is not None:
        return [*capture, proxy, *template_inits, *user_inits], app_containers + template_containers
    inits = capture + template_inits + user_inits
    if proxy is None:
        return inits, app_containers + template_containers
    if proxy_first:
        return inits, [proxy, *app_containers, *template_containers]
    return inits, [*app_containers, *template_containers, proxy]
