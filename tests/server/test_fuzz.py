"""Random and malformed bodies at /inject and /dry-run: never a 5xx, and the server stays healthy."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.fake_apiserver import DEV_TOKEN
from tests.server.helpers import RunningServer, review, typical_pod

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)

# Near-misses of a real review: the right envelope with random values in the places that matter.
pod_like = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.one_of(json_values, st.fixed_dictionaries({}, optional={
            "annotations": st.dictionaries(st.sampled_from([
                "sidecar.istio.io/inject", "traffic.sidecar.istio.io/includeInboundPorts",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges", "sidecar.istio.io/interceptionMode",
                "sidecar.istio.io/status", "proxy.istio.io/config", "inject.istio.io/templates",
                "status.sidecar.istio.io/port", "sidecar.istio.io/proxyCPU",
            ]), st.text(max_size=30), max_size=4),
            "labels": json_values, "name": json_values, "generateName": json_values,
            "ownerReferences": json_values,
        })),
        "spec": st.one_of(json_values, st.fixed_dictionaries({}, optional={
            "containers": st.one_of(json_values, st.lists(st.fixed_dictionaries({}, optional={
                "name": json_values, "image": json_values, "ports": json_values,
                "readinessProbe": json_values, "securityContext": json_values, "env": json_values,
            }), max_size=3)),
            "initContainers": json_values, "hostNetwork": json_values, "securityContext": json_values,
            "volumes": json_values,
        })),
    },
)

reviews = st.builds(
    lambda obj, op, version, kind, ns, extra: {
        **review(obj, operation=op, api_version=version, namespace=ns, kind=kind), **extra
    },
    pod_like,
    st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT", "", "create"]),
    st.sampled_from(["admission.k8s.io/v1", "admission.k8s.io/v1beta1"]),
    st.one_of(st.just({"group": "", "version": "v1", "kind": "Pod"}), json_values),
    st.one_of(st.text(max_size=12), st.just("default")),
    st.dictionaries(st.sampled_from(["apiVersion", "kind", "request"]), json_values, max_size=1),
)

bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    reviews.map(lambda r: json.dumps(r).encode()),
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def client(webhook: RunningServer) -> Iterator[httpx.Client]:
    with webhook.client() as c:
        yield c


@FUZZ
@given(body=bodies)
def test_inject_never_5xx(client: httpx.Client, body: bytes) -> None:
    response = client.post("/inject", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        answer = response.json()
        assert answer["kind"] == "AdmissionReview"
        assert isinstance(answer["response"]["allowed"], bool)


@FUZZ
@given(body=bodies, content_type=st.sampled_from(["application/json", "application/yaml", "text/plain"]))
def test_dry_run_never_5xx(client: httpx.Client, body: bytes, content_type: str) -> None:
    response = client.post("/dry-run", content=body,
                           headers={"content-type": content_type, "authorization": f"Bearer {DEV_TOKEN}"})
    assert response.status_code in (200, 400, 415), response.text


def test_server_is_healthy_after_fuzzing(webhook: RunningServer, client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    answer = client.post("/inject", json=review(typical_pod())).json()
    assert answer["response"]["allowed"] is True and answer["response"]["patch"]
    assert webhook.process.poll() is None
    assert 'code="5' not in client.get("/metrics").text
