"""Where the capture init container and the proxy go among the user's init containers, and so
what the user's init containers' traffic meets (Istio's ``reorderPod`` order)."""

from __future__ import annotations

from typing import Any

import pytest

from cni import annotations as ann
from injector.config import compile_config
from injector.core import inject
from injector.result import Decision

USER_INITS = ["fetch", "migrate"]


def _init_names(capture: str, native: str, annotations: dict[str, str] | None = None) -> list[str]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": annotations or {}},
        "spec": {
            "containers": [{"name": "app", "image": "x"}],
            "initContainers": [{"name": n, "image": "x"} for n in USER_INITS],
        },
    }
    config = compile_config({"values": {"proxy": {"capture": capture, "nativeSidecars": native}}})
    result = inject(pod, config=config, namespace_labels={"istio-injection": "enabled"})
    assert result.decision is Decision.INJECT, result.reasons
    return [c["name"] for c in result.mutated["spec"]["initContainers"]]


def test_without_native_sidecars_istio_init_runs_after_the_user_init_containers() -> None:
    """No proxy runs during init: redirecting earlier would black-hole their traffic, so they
    reach the network directly and the redirect is programmed last (as Istio does)."""
    assert _init_names("init", "false") == [*USER_INITS, ann.INIT_CONTAINER]


def test_without_native_sidecars_validation_runs_before_the_user_init_containers() -> None:
    assert _init_names("cni", "false") == [ann.VALIDATION_CONTAINER, *USER_INITS]


@pytest.mark.parametrize(
    ("capture", "first"), [("init", ann.INIT_CONTAINER), ("cni", ann.VALIDATION_CONTAINER)]
)
def test_with_native_sidecars_user_init_traffic_is_captured_and_served(capture: str, first: str) -> None:
    """Capture first, the proxy next: every user init container starts with the redirect in
    place and a running proxy behind it."""
    assert _init_names(capture, "true") == [first, ann.PROXY_CONTAINER, *USER_INITS]


def test_init_containers_before_proxy_annotation_runs_them_before_the_native_proxy() -> None:
    names = _init_names("init", "true", {"sidecar.istio.io/init-containers-before-proxy": "migrate,absent"})
    assert names == [ann.INIT_CONTAINER, "migrate", ann.PROXY_CONTAINER, "fetch"]
