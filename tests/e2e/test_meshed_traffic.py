"""A Deployment in a namespace labelled istio-injection=enabled, on the real node, with Envoy.

Its pods are injected by our webhook (loopback HTTPS, registered through the API server) with
the `envoy` template (the Helm chart's default), start, pass `istio-validation`, become Ready,
and their traffic in both directions goes through the real Envoy of the test bed's proxy image.
What a user sees of that is what the tests assert: Envoy's JSON access log (`kubectl logs -c
istio-proxy`) and its HTTP metrics in the pod's merged Prometheus endpoint (15020). Scenarios of
issue 13 on the node: two meshed pods talk HTTP and both proxies count and log it; an unmeshed
pod reaches a meshed one and the server's proxy counts it.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import require_root
from tests.e2e.mesh import (
    APP_PORT,
    Installer,
    Webhook,
    access_log,
    app_pod,
    container_status,
    create,
    deployment,
    force_delete_pods,
    http_requests,
    is_ready,
    list_pods,
    netns_tables,
    proxy_metrics,
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
        assert proxy["image"] == images.ENVOY_PROXY_IMAGE and proxy["restartPolicy"] == "Always"
        assert proxy["command"] == ["mesh-proxy-agent"]
        assert '"templates":["envoy"]' in pod["metadata"]["annotations"]["sidecar.istio.io/status"]
        validation = container_status(pod, "istio-validation")
        assert validation["state"]["terminated"]["exitCode"] == 0, validation
        assert validation["restartCount"] == 0, "passed on its first run"
        out = control_plane.kubectl(
            "logs", "-n", scene.mesh_ns, pod["metadata"]["name"], "-c", "istio-validation"
        ).stdout
        assert "redirect in place: 127.0.0.2:15999 -> 127.0.0.1:15006" in out
        # The app's readiness probe was rewritten to the agent's status port, which runs the
        # original tcpSocket probe from inside the pod: the app is Ready through it.
        app = spec["containers"][0]
        assert app["readinessProbe"]["httpGet"] == {
            "path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP"
        }  # fmt: skip
        assert all(c["ready"] for c in pod["status"]["containerStatuses"])
        status = container_status(pod, "istio-proxy")
        assert status["ready"] and status["started"] and status["restartCount"] == 0, status


def test_meshed_pod_netns_has_our_table(node: Any, scene: Scene) -> None:
    for pod in scene.web:
        tables = netns_tables(node.pod_netns(scene.mesh_ns, pod["metadata"]["name"]))
        assert "table inet mesh_cni" in tables


def _get(plane: Any, ns: str, pod: str, url: str) -> subprocess.CompletedProcess[str]:
    """busybox wget from the pod's app container (exit 1 on an HTTP error status)."""
    return plane.kubectl(
        "exec", "-n", ns, pod, "-c", "app", "--", "timeout", "10", "wget", "-qO-", url, check=False
    )


def _lines(entries: list[dict[str, Any]], direction: str, path: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["direction"] == direction and e.get("path") == path]


def _logged(plane: Any, ns: str, pod: str, direction: str, path: str) -> dict[str, Any]:
    """The one access log line of ``pod``'s Envoy for ``path`` in ``direction`` (waited for:
    Envoy writes its access log asynchronously)."""
    (line,) = wait_for(
        f"{pod}'s {direction} access log line for {path}",
        lambda: _lines(access_log(plane, ns, pod), direction, path),
        timeout=15,
    )
    return line


def _counted(plane: Any, ns: str, pod: str, direction: str, code_class: str, before: float) -> None:
    """``pod``'s Envoy counts one more ``direction`` request of ``code_class`` than ``before``."""
    wait_for(
        f"{pod}'s {direction} {code_class}xx counter at {before + 1:g}",
        lambda: http_requests(proxy_metrics(plane, ns, pod), direction, code_class) == before + 1,
        timeout=15,
    )


def test_outbound_traffic_goes_through_envoy_once(control_plane: Any, scene: Scene) -> None:
    name = scene.web[0]["metadata"]["name"]
    ip = scene.web[0]["status"]["podIP"]
    target = f"{scene.backend_ip}:{APP_PORT}"
    path = f"/?req={uuid.uuid4().hex[:8]}"
    before = http_requests(proxy_metrics(control_plane, scene.mesh_ns, name), "outbound", "2")
    reply = _get(control_plane, scene.mesh_ns, name, f"http://{target}{path}")
    assert reply.stdout.strip() == "hello-from-backend", "Envoy forwarded to the original destination"

    line = _logged(control_plane, scene.mesh_ns, name, "outbound", path)
    assert (line["method"], str(line["response_code"]), line["protocol"]) == ("GET", "200", "HTTP/1.1")
    assert line["original_destination"] == target and line["upstream_host"] == target, line
    assert line["peer"].startswith(f"{ip}:"), line
    _counted(control_plane, scene.mesh_ns, name, "outbound", "2", before)
    # Envoy's own connection to the backend (uid 1337) was not captured again.
    entries = access_log(control_plane, scene.mesh_ns, name)
    assert len(_lines(entries, "outbound", path)) == 1 and not _lines(entries, "inbound", path), entries


def test_unmeshed_client_reaches_a_meshed_pod_through_its_envoy(control_plane: Any, scene: Scene) -> None:
    name, ip = scene.web[1]["metadata"]["name"], scene.web[1]["status"]["podIP"]
    target = f"{ip}:{APP_PORT}"
    path = f"/?req={uuid.uuid4().hex[:8]}"
    before = http_requests(proxy_metrics(control_plane, scene.mesh_ns, name), "inbound", "2")
    reply = _get(control_plane, scene.plain_ns, "client", f"http://{target}{path}")
    assert reply.stdout.strip() == f"hello-from-{name}", reply

    line = _logged(control_plane, scene.mesh_ns, name, "inbound", path)
    assert str(line["response_code"]) == "200" and line["original_destination"] == target, line
    assert line["peer"].startswith(f"{scene.client_ip}:"), line
    _counted(control_plane, scene.mesh_ns, name, "inbound", "2", before)
    entries = access_log(control_plane, scene.mesh_ns, name)
    assert len(_lines(entries, "inbound", path)) == 1, "Envoy's forward to the app was not re-captured"


@pytest.mark.parametrize(("path", "code"), [("/?req={id}", "200"), ("/missing-{id}", "404")])
def test_two_meshed_pods_both_proxies_count_and_log(
    control_plane: Any, scene: Scene, path: str, code: str
) -> None:
    """web-0 calls web-1: the caller's Envoy logs and counts it outbound, the callee's inbound,
    each with the response code the app gave (2xx for a page, 4xx for a missing one)."""
    client, server = (p["metadata"]["name"] for p in scene.web)
    client_ip, server_ip = (p["status"]["podIP"] for p in scene.web)
    path = path.format(id=uuid.uuid4().hex[:8])
    code_class = code[0]
    out_before = http_requests(proxy_metrics(control_plane, scene.mesh_ns, client), "outbound", code_class)
    in_before = http_requests(proxy_metrics(control_plane, scene.mesh_ns, server), "inbound", code_class)
    reply = _get(control_plane, scene.mesh_ns, client, f"http://{server_ip}:{APP_PORT}{path}")
    if code == "200":
        assert reply.returncode == 0 and reply.stdout.strip() == f"hello-from-{server}", reply
    else:
        assert reply.returncode != 0 and code in reply.stderr, reply

    outbound = _logged(control_plane, scene.mesh_ns, client, "outbound", path)
    inbound = _logged(control_plane, scene.mesh_ns, server, "inbound", path)
    for line in (outbound, inbound):
        assert str(line["response_code"]) == code and line["method"] == "GET", line
        assert line["original_destination"] == f"{server_ip}:{APP_PORT}", line
    assert outbound["peer"].startswith(f"{client_ip}:"), outbound
    assert inbound["peer"].startswith(f"{client_ip}:"), "the server sees the caller's pod address"
    _counted(control_plane, scene.mesh_ns, client, "outbound", code_class, out_before)
    _counted(control_plane, scene.mesh_ns, server, "inbound", code_class, in_before)


def test_exec_into_the_app_sees_the_redirect(control_plane: Any, scene: Scene) -> None:
    """A port nobody listens on: refused for an unmeshed pod, accepted (by Envoy) from the app."""
    nowhere = f"{scene.backend_ip} 9"  # discard port: closed on the backend
    # The client keeps its side open (as real clients do, until the answer) so Envoy's protocol
    # sniffing gives up after its 1 s and the TCP proxy takes the connection.
    probe = ["sh", "-c", f"sleep 3 | nc {nowhere}; echo exit=$?"]
    plain = control_plane.kubectl("exec", "-n", scene.plain_ns, "client", "--", *probe)
    assert "exit=1" in plain.stdout and "refused" in plain.stderr.lower(), plain
    pod = scene.web[0]["metadata"]["name"]
    meshed = control_plane.kubectl("exec", "-n", scene.mesh_ns, pod, "-c", "app", "--", *probe)
    assert "exit=0" in meshed.stdout, f"the app's connect was accepted by Envoy: {meshed}"
    dst = f"{scene.backend_ip}:9"

    def tcp_line() -> list[dict[str, Any]]:
        entries = access_log(control_plane, scene.mesh_ns, pod)
        return [e for e in entries if e["direction"] == "outbound" and e["original_destination"] == dst]

    try:
        (line,) = wait_for(f"Envoy's TCP access log line for {dst}", tcp_line, timeout=15)
    except AssertionError as err:
        raise AssertionError(f"{err}: {access_log(control_plane, scene.mesh_ns, pod)}") from None
    # Envoy took the connection and could not reach the closed port: upstream connection failure.
    assert line["protocol"] == "TCP" and "UF" in line["response_flags"], line
