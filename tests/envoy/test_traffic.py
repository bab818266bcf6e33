"""Real traffic through the redirect and a real Envoy: both directions, both IP families, L7 telemetry."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cni.cnitest import UNPRIVILEGED_PYTHON, CniBed, Pod
from tests.envoy.meshbed import HERE, REPO, Meshed, _preexec, get, meshed_pod, requests, spawn, stop


@pytest.fixture(scope="module")
def peer_app(peer: Pod) -> Iterator[Pod]:
    app = spawn(peer, [sys.executable, str(HERE / "app.py"), "8080"])
    assert app.stdout is not None and app.stdout.readline().strip() == "ready"
    yield peer
    stop(app)


@pytest.fixture(scope="module")
def mesh(bed: CniBed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshed]:
    with meshed_pod(bed, Path(tmp_path_factory.mktemp("mesh"))) as mesh:
        yield mesh


def _host(ip: str) -> str:
    return ip


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_outbound_http_goes_through_envoy(mesh: Meshed, peer_app: Pod, family: str) -> None:
    target = getattr(peer_app, family)
    before = mesh.stats()
    reply = get(mesh.pod, target, 8080, "/peer")
    assert reply.get("status") == 200, reply
    assert reply["body"] == getattr(mesh.pod, family)  # Envoy connects from the pod's own address
    after = mesh.stats()
    assert after["http.outbound.downstream_rq_2xx"] == before.get("http.outbound.downstream_rq_2xx", 0) + 1
    assert after["cluster.PassthroughCluster.upstream_cx_total"] > before.get(
        "cluster.PassthroughCluster.upstream_cx_total", 0
    )


@pytest.mark.parametrize("family, passthrough", [("ipv4", "127.0.0.6"), ("ipv6", "::6")])
def test_inbound_http_reaches_the_app_from_the_passthrough_address(
    mesh: Meshed, peer: Pod, family: str, passthrough: str
) -> None:
    before = mesh.stats()
    reply = get(peer, getattr(mesh.pod, family), 8080, "/peer", headers=True)
    assert (reply["status"], reply["body"]) == (200, passthrough)
    # Transparent: the app's own Server header, nothing of Envoy's added.
    assert reply["headers"]["server"].startswith("BaseHTTP")
    assert not [h for h in reply["headers"] if h.startswith("x-envoy")]
    after = mesh.stats()
    assert after["http.inbound.downstream_rq_2xx"] == before.get("http.inbound.downstream_rq_2xx", 0) + 1


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_non_http_tcp_is_proxied_both_ways(mesh: Meshed, peer: Pod, family: str) -> None:
    before = mesh.stats()
    reply = requests(peer, [{"tcp": [getattr(mesh.pod, family), 9000], "send": "\x00\x01binary hello"}])[0]
    assert reply == {"echo": "\x00\x01binary hello"}
    after = mesh.stats()
    assert after["tcp.inbound.downstream_cx_total"] == before.get("tcp.inbound.downstream_cx_total", 0) + 1


def test_http_metrics_count_by_code_class_in_prometheus_format(mesh: Meshed, peer: Pod) -> None:
    requests(peer, [{"http": [mesh.pod.ipv4, 8080], "target": t} for t in ("/status/404", "/status/503")])
    scrape = get(peer, mesh.pod.ipv4, 15090, "/stats/prometheus")
    assert scrape["status"] == 200
    text = scrape["body"]
    for klass in ("4", "5"):
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("envoy_http_downstream_rq_xx{")
            and f'envoy_response_code_class="{klass}"' in x
            and 'envoy_http_conn_manager_prefix="inbound"' in x
        )
        assert int(line.rsplit(" ", 1)[1]) >= 1
    assert any(
        x.startswith("envoy_http_downstream_rq_time_bucket{") and '"inbound"' in x for x in text.splitlines()
    )
    # The same through the agent's merged endpoint on the status port.
    merged = get(peer, mesh.pod.ipv4, 15020, "/stats/prometheus")
    assert merged["status"] == 200 and "envoy_http_downstream_rq_xx{" in merged["body"]


def test_access_log_has_one_json_line_per_request(mesh: Meshed, peer: Pod) -> None:
    marker = f"/status/418?t={time.monotonic_ns()}"
    assert get(peer, mesh.pod.ipv4, 8080, marker)["status"] == 418
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [x for x in mesh.access_log() if x.get("path") == marker]
        if found:
            break
        time.sleep(0.2)
    assert len(found) == 1, mesh.log.read_text()[-2000:]
    line = found[0]
    assert line["direction"] == "inbound" and line["response_code"] == 418 and line["method"] == "GET"
    assert line["protocol"] == "HTTP/1.1"
    assert line["peer"].rsplit(":", 1)[0] == peer.ipv4
    assert line["original_destination"] == f"{mesh.pod.ipv4}:8080"
    assert line["upstream_host"] == f"{mesh.pod.ipv4}:8080"
    for key in ("time", "response_flags", "bytes_received", "bytes_sent", "duration_ms"):
        assert key in line


GRPC_CLIENT = (
    "import sys; sys.path.insert(0, sys.argv[1]); from proxyagent.probes import grpc_health; "
    "print(grpc_health(sys.argv[2], 50051, 'app.Serving', 5))"
)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_h2c_grpc_goes_through_the_http_layer(bed: CniBed, peer: Pod, tmp_path: Path, family: str) -> None:
    with meshed_pod(bed, tmp_path, grpc=True) as mesh:
        before = mesh.stats()
        done = subprocess.run(
            [UNPRIVILEGED_PYTHON, "-S", "-c", GRPC_CLIENT, str(REPO), getattr(mesh.pod, family)],
            preexec_fn=_preexec(peer.netns, None),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout.strip() == "SERVING", done.stderr
        after = mesh.stats()
        assert (
            after["http.inbound.downstream_cx_http2_total"]
            == before.get("http.inbound.downstream_cx_http2_total", 0) + 1
        )
        deadline = time.monotonic() + 10
        while not (found := [x for x in mesh.access_log() if x.get("protocol") == "HTTP/2"]):
            assert time.monotonic() < deadline, mesh.log.read_text()[-2000:]
            time.sleep(0.2)
        assert found[0]["path"] == "/grpc.health.v1.Health/Check" and found[0]["response_code"] == 200
