"""Container order, as Istio's injector leaves it (its ``reorderPod`` and native-sidecar rules).

- Init containers with native sidecars: the capture init container (``istio-validation`` or
  ``istio-init``) first, then the proxy (``restartPolicy: Always``), then the templates' init
  containers and the user's: every later init container runs with its traffic captured and a
  proxy already serving it.
- Init containers without native sidecars: ``istio-validation`` first (no user init container
  runs before the plugin's redirect is proven), but ``istio-init`` LAST, after the templates'
  and the user's init containers: no proxy runs yet, so traffic redirected before it would be
  black-holed. Their traffic therefore goes out directly, not through the mesh (Istio's order;
  use native sidecars for init containers that need the mesh).
- Containers: the app containers first and the proxy last; with
  ``holdApplicationUntilProxyStarts`` (and no native sidecar) the proxy first, so its
  ``postStart`` wait holds the app containers back until it is ready.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cni import annotations as ann

Containers = list[dict[str, Any]]

#: Istio's annotation: comma-separated init containers to run before the native proxy.
INIT_BEFORE_PROXY = "sidecar.istio.io/init-containers-before-proxy"


def before_proxy_names(annotations: Mapping[str, str]) -> tuple[str, ...]:
    """The names in ``sidecar.istio.io/init-containers-before-proxy`` (blanks dropped)."""
    raw = annotations.get(INIT_BEFORE_PROXY) or ""
    return tuple(n.strip() for n in raw.split(",") if n.strip())


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
    before_proxy: tuple[str, ...] = (),
) -> tuple[Containers, Containers]:
    """(init containers, containers) in Istio's order; ``proxy`` already native when ``native``.

    ``before_proxy``: init containers named in ``sidecar.istio.io/init-containers-before-proxy``,
    which with native sidecars run after the capture init container but before the proxy starts.
    """
    if native and proxy is not None:
        rest = template_inits + user_inits
        by_name = {c.get("name"): c for c in rest}
        early = [by_name[n] for n in dict.fromkeys(before_proxy) if n in by_name]
        moved = {id(c) for c in early}
        rest = [c for c in rest if id(c) not in moved]
        return [*capture, *early, proxy, *rest], app_containers + template_containers
    if any(c.get("name") == ann.INIT_CONTAINER for c in capture):
        inits = template_inits + user_inits + capture  # redirect last: nothing before it is black-holed
    else:
        inits = capture + template_inits + user_inits  # validation first: nothing runs unproven
    if proxy is None:
        return inits, app_containers + template_containers
    if proxy_first:
        return inits, [proxy, *app_containers, *template_containers]
    return inits, [*app_containers, *template_containers, proxy]
