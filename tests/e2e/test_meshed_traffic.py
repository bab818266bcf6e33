"""A Deployment in a namespace labelled istio-injection=enabled, on the real node.

Its pods are injected by our webhook (loopback HTTPS, registered through the API server), start,
pass `istio-validation`, become Ready, and their traffic in both directions goes through the
proxy. The proxy is the test proxy (tests/testbed/testproxy.py), standing in for Envoy, which
cannot be had here: it logs one JSON line per connection with the original destination it read
from the redirected socket and forwards the bytes there as uid 1337.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import require_root
from tests.e2e.mesh import (
    APP_PORT,
    Installer,
    Webhook,
    app_pod,
    container_status,
    create,
    deployment,
    force_delete_pods,
    is_ready,
    list_pods,
    netns_tables,
    proxy_events,
    wait_for,
    wait_ready,
)
from tests.testbed import images

pytestmark = [pytest.mark.node, pytest.mark.root]


@dataclass
class Scene:
    mesh_ns: str
    plain_ns: str
    web: list[dict[str, Any]]  # the Deployment's pods, Ready
    backend_ip: str  # an unmeshed web server the app calls
    client_ip: str  # an unmeshed pod that calls the app


@pytest.fixture(scope="module")
def scene(control_plane: Any, node: Any, installer: Installer, webhook: Webhook) -> Iterator[Scene]:
    require_root()
    installer.start()
    mesh_ns, plain_ns = webhook.namespace(meshed=True), webhook.namespace(meshed=False)
    try:
        create(control_plane, plain_ns, app_pod("backend"))
        client = app_pod("client")
        client["spec"]["containers"][0].update(command=["sleep", "3600"], readinessProbe=None, ports=None)
        create(control_plane, plain_ns, client)
        create(control_plane, mesh_ns, deployment("web", replicas=2))
        backend = wait_ready(control_plane, plain_ns, "backend")
        client_pod = wait_ready(control_plane, plain_ns, "client")

        def two_ready() -> list[dict[str, Any]] | None:
            pods = [p for p in list_pods(control_plane, mesh_ns, "app=web") if is_ready(p)]
            return pods if len(pods) == 2 else None

        web = wait_for("2 Ready pods of Deployment web", two_ready, timeout=120)
        yield Scene(mesh_ns, plain_ns, web, backend["status"]["podIP"], client_pod["status"]["podIP"])
    finally:
        for ns in (mesh_ns, plain_ns):
            control_plane.kubectl("delete", "deployment", "--all", "-n", ns, "--wait=false", check=False)
            force_delete_pods(control_plane, ns)
            control_plane.delete_namespace(ns)


def test_pods_are_injected_pass_validation_and_become_ready(control_plane: Any, scene: Scene) -> None:
    for pod in scene.web:
        spec = pod["spec"]
        # Native sidecars (nativeSidecars: auto on a 1.29+ cluster): the proxy is an init
        # container with restartPolicy Always, after the validation check.
        assert [c["name"] for c in spec["initContainers"]] == ["istio-validation", "istio-proxy"]
        assert [c["name"] for c in spec["containers"]] == ["app"]
        proxy = spec["initContainers"][1]
        assert proxy["image"] == images.TEST_PROXY_IMAGE and proxy["restartPolicy"] == "Always"
        assert "sidecar.istio.io/status" in pod["metadata"]["annotations"]
        validation = container_status(pod, "istio-validation")
        assert validation["state"]["terminated"]["exitCode"] == 0, validation
        assert validation["restartCount"] == 0, "passed on its first run"
        out = control_plane.kubectl(
            "logs", "-n", scene.mesh_ns, pod["metadata"]["name"], "-c", "istio-validation"
        ).stdout
        assert "redirect in place: 127.0.0.2:15999 -> 127.0.0.1:15006" in out
        # The app's readiness probe was rewritten to the proxy's status port and answers there.
        app = spec["containers"][0]
        assert app["readinessProbe"]["httpGet"]["path"] == "/app-health/app/readyz"
        assert all(c["ready"] for c in pod["status"]["containerStatuses"])
        assert (
            container_status(pod, "istio-proxy")["ready"] and container_status(pod, "istio-proxy")["started"]
        )


def test_meshed_pod_netns_has_our_table(node: Any, scene: Scene) -> None:
    for pod in scene.web:
        tables = netns_tables(node.pod_netns(scene.mesh_ns, pod["metadata"]["name"]))
        assert "table inet mesh_cni" in tables


def _connections(events: list[dict[str, Any]], listener: str, dst: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("event") == "connection" and e["listener"] == listener and e["original_dst"] == dst
    ]


def test_outbound_traffic_goes_through_the_proxy_once(control_plane: Any, scene: Scene) -> None:
    pod = scene.web[0]
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    target = f"{scene.backend_ip}:{APP_PORT}"
    reply = control_plane.kubectl(
        "exec",
        "-n",
        scene.mesh_ns,
        name,
        "-c",
        "app",
        "--",
        "timeout",
        "10",
        "wget",
        "-qO-",
        f"http://{target}/",
    ).stdout
    assert reply.strip() == "hello-from-backend", "the proxy forwarded to the original destination"

    def seen() -> list[dict[str, Any]]:
        return _connections(proxy_events(control_plane, scene.mesh_ns, name), "outbound", target)

    (event,) = wait_for(f"the proxy's outbound line for {target}", seen, timeout=10)
    assert event["src"].startswith(f"{ip}:") and event["uid"] == 1337
    # The proxy's own connection to the backend (uid 1337) was not captured again.
    events = proxy_events(control_plane, scene.mesh_ns, name)
    assert not [e for e in events if e.get("event") == "loop"], events
    assert len(_connections(events, "outbound", target)) == 1


def test_inbound_traffic_goes_through_the_proxy_once(control_plane: Any, scene: Scene) -> None:
    pod = scene.web[1]
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    target = f"{ip}:{APP_PORT}"
    reply = control_plane.kubectl(
        "exec", "-n", scene.plain_ns, "client", "--", "timeout", "10", "wget", "-qO-", f"http://{target}/"
    ).stdout
    assert reply.strip() == f"hello-from-{name}"

    def seen() -> list[dict[str, Any]]:
        return _connections(proxy_events(control_plane, scene.mesh_ns, name), "inbound", target)

    (event,) = wait_for(f"the proxy's inbound line for {target}", seen, timeout=10)
    assert event["src"].startswith(f"{scene.client_ip}:")
    events = proxy_events(control_plane, scene.mesh_ns, name)
    assert not [e for e in events if e.get("event") == "loop"], events
    assert len(_connections(events, "inbound", target)) == 1, "the proxy's forward was not re-captured"


def test_exec_into_the_app_sees_the_redirect(control_plane: Any, scene: Scene) -> None:
    """A port nobody listens on: refused for an unmeshed pod, accepted (by the proxy) from the app."""
    nowhere = f"{scene.backend_ip} 9"  # discard port: closed on the backend
    probe = ["sh", "-c", f"nc {nowhere} </dev/null; echo exit=$?"]
    plain = control_plane.kubectl("exec", "-n", scene.plain_ns, "client", "--", *probe)
    assert "exit=1" in plain.stdout and "refused" in plain.stderr.lower(), plain
    pod = scene.web[0]["metadata"]["name"]
    meshed = control_plane.kubectl("exec", "-n", scene.mesh_ns, pod, "-c", "app", "--", *probe)
    assert "exit=0" in meshed.stdout, f"the app's connect was accepted by the proxy: {meshed}"
    events = proxy_events(control_plane, scene.mesh_ns, pod)
    dst = f"{scene.backend_ip}:9"
    assert _connections(events, "outbound", dst), "the proxy took the connection"
    assert [e["event"] for e in events if e.get("original_dst") == dst] == ["connection", "upstream_error"]
    print(json.dumps([e for e in events if e.get("original_dst") == dst]))
