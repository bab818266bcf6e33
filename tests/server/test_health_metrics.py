"""/healthz, /readyz and /metrics as an operator (and Prometheus) sees them."""

from __future__ import annotations

import json
import re

from cryptography import x509
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.server.helpers import RunningServer, review, typical_pod


def scrape(webhook: RunningServer, accept: str | None = None) -> str:
    with webhook.client() as client:
        response = client.get("/metrics", headers={"accept": accept} if accept else {})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


def families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of the series ``name{labels}`` (labels as ``k="v",...``, in any order), else 0."""
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == wanted:
                return float(s.value)
    return 0.0


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
    histogram = families(text)["mesh_injector_admission_duration_seconds"]
    buckets = {float(s.labels["le"]): s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert {0.0005, 0.001, 0.002, 0.005, 0.01} <= set(buckets)
    count = sample(text, "mesh_injector_admission_duration_seconds_count")
    assert count >= 1
    assert buckets[float("inf")] == count
    cumulative = [buckets[bound] for bound in sorted(buckets)]
    assert cumulative == sorted(cumulative)


def test_certificate_expiry_and_config_are_exported(webhook: RunningServer) -> None:
    text = scrape(webhook)
    expiry = sample(text, "mesh_injector_tls_certificate_expiry_timestamp_seconds")
    served_pem = webhook.secret.cert_file.read_bytes()
    served = x509.load_pem_x509_certificate(served_pem).not_valid_after_utc.timestamp()
    assert abs(expiry - served) < 1
    with webhook.client() as client:
        config_hash = client.get("/readyz").json()["config"]["hash"]
    assert sample(text, "mesh_injector_config_info", f'config_hash="{config_hash}"') == 1
    assert sample(text, "mesh_injector_config_last_reload_success") == 1


def test_metrics_parse_and_name_ours_istios_and_the_process(webhook: RunningServer) -> None:
    found = families(scrape(webhook))
    for name in ("mesh_injector_requests", "mesh_injector_admission_duration_seconds",
                 "sidecar_injection_requests", "sidecar_injection_success", "sidecar_injection_skip",
                 "sidecar_injection_failure", "process_cpu_seconds", "process_resident_memory_bytes",
                 "process_open_fds"):
        assert name in found, sorted(found)
    assert found["sidecar_injection_requests"].type == "counter"
    assert found["process_resident_memory_bytes"].samples[0].value > 10 * 1024 * 1024


def test_openmetrics_when_the_scraper_asks_for_it(webhook: RunningServer) -> None:
    with webhook.client() as client:
        response = client.get("/metrics", headers={
            "accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    names = {f.name for f in openmetrics_families(response.text)}
    assert {"mesh_injector_requests", "sidecar_injection_requests"} <= names


def test_istio_counters_follow_the_decisions(webhook: RunningServer) -> None:
    before = scrape(webhook)
    send(webhook, typical_pod())
    send(webhook, typical_pod(annotations={"sidecar.istio.io/inject": "false"}))
    send(webhook, typical_pod(annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "99999"}))
    with webhook.client() as client:
        assert client.post("/inject", content=b"{broken", headers={"content-type": "application/json"}
                           ).status_code == 400
    after = scrape(webhook)

    def delta(name: str) -> float:
        return sample(after, name) - sample(before, name)

    assert delta("sidecar_injection_requests_total") == 4
    assert delta("sidecar_injection_success_total") == 1
    assert delta("sidecar_injection_skip_total") == 1
    assert delta("sidecar_injection_failure_total") == 2  # the refused pod and the broken body


def test_unknown_paths_are_4xx(webhook: RunningServer) -> None:
    with webhook.client() as client:
        assert client.get("/nope").status_code == 404
        assert client.get("/inject").status_code == 405
        assert client.put("/metrics").status_code == 405
        assert json.loads(client.get("/readyz").text)["ready"]
