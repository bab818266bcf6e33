"""/healthz, /readyz and /metrics as an operator (and Prometheus) sees them."""

from __future__ import annotations

import json
import re

from injector import pki
from tests.server.helpers import RunningServer, review, typical_pod


def scrape(webhook: RunningServer) -> str:
    with webhook.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" ([0-9.e+-]+|\+Inf)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def send(webhook: RunningServer, pod: dict) -> None:
    with webhook.client() as client:
        assert client.post("/inject", json=review(pod)).status_code == 200


def test_healthz_and_readyz(webhook: RunningServer) -> None:
    with webhook.client() as client:
        assert client.get("/healthz").text.strip() == "ok"
        ready = client.get("/readyz")
    assert ready.status_code == 200
    detail = ready.json()
    assert detail["ready"] is True
    assert detail["config"]["loaded"] and detail["config"]["hash"]
    assert detail["certificate"]["loaded"] and detail["certificate"]["notAfter"]


def test_decisions_are_counted_by_reason(webhook: RunningServer) -> None:
    before = scrape(webhook)
    opted_out = typical_pod(annotations={"sidecar.istio.io/inject": "false"})
    bad = typical_pod(annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "99999"})
    send(webhook, typical_pod())
    send(webhook, typical_pod())
    send(webhook, opted_out)
    send(webhook, bad)
    after = scrape(webhook)
    assert sample(after, "mesh_injector_injections_total", 'reason="Injected"') == \
        sample(before, "mesh_injector_injections_total", 'reason="Injected"') + 2
    assert sample(after, "mesh_injector_skips_total", 'reason="PodOptedOut"') == \
        sample(before, "mesh_injector_skips_total", 'reason="PodOptedOut"') + 1
    assert sample(after, "mesh_injector_rejections_total", 'reason="InvalidTrafficAnnotation"') == \
        sample(before, "mesh_injector_rejections_total", 'reason="InvalidTrafficAnnotation"') + 1
    assert sample(after, "mesh_injector_requests_total", 'endpoint="inject",code="200"') >= 4


def test_latency_histogram_resolves_milliseconds(webhook: RunningServer) -> None:
    send(webhook, typical_pod())
    text = scrape(webhook)
    bucket = "mesh_injector_admission_duration_seconds_bucket"
    bounds = [float(b) for b in re.findall(re.escape(bucket) + r'\{le="([0-9.e-]+)"\}', text)]
    assert {0.0005, 0.001, 0.002, 0.005, 0.01} <= set(bounds)
    count = sample(text, "mesh_injector_admission_duration_seconds_count")
    assert count >= 1
    assert sample(text, "mesh_injector_admission_duration_seconds_bucket", 'le="+Inf"') == count
    cumulative = [sample(text, bucket, f'le="{b:g}"') for b in bounds]
    assert cumulative == sorted(cumulative)


def test_certificate_expiry_and_config_are_exported(webhook: RunningServer) -> None:
    text = scrape(webhook)
    expiry = sample(text, "mesh_injector_tls_certificate_expiry_timestamp_seconds")
    served = pki.cert_not_after(webhook.secret.cert_file.read_bytes()).timestamp()
    assert abs(expiry - served) < 1
    with webhook.client() as client:
        config_hash = client.get("/readyz").json()["config"]["hash"]
    assert sample(text, "mesh_injector_config_info", f'config_hash="{config_hash}"') == 1
    assert sample(text, "mesh_injector_config_last_reload_success") == 1


def test_metrics_text_is_parseable(webhook: RunningServer) -> None:
    for line in scrape(webhook).splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) mesh_injector_\w+ ", line), line
        else:
            assert re.match(r'^mesh_injector_\w+(\{(\w+="[^"]*",?)*\})? ([0-9.e+-]+|\+Inf)$', line), line


def test_unknown_paths_are_4xx(webhook: RunningServer) -> None:
    with webhook.client() as client:
        assert client.get("/nope").status_code == 404
        assert client.get("/inject").status_code == 405
        assert client.put("/metrics").status_code == 405
        assert json.loads(client.get("/readyz").text)["ready"]
