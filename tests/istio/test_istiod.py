"""The istiod harness of bench/bench_istio_webhook.py still starts and really injects.

A cheap guard (istiod is up in a few seconds on the session's control plane): if a new Istio
pin changes how istiod runs outside a cluster, this fails here instead of the benchmark
comparing us with an istiod that answers "allowed" without injecting. It is also the oracle
where istioctl's offline answer cannot be: a pod of a DeploymentConfig, resolved by the webhook.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jsonpatch
import pytest

from tests.conftest import require
from tests.istio import compare, inputs, oracle
from tests.istio import istiod as harness
from tests.testbed.controlplane import ControlPlane


@pytest.fixture(scope="module")
def istiod(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory,
           istioctl: str) -> Iterator[harness.Istiod]:
    require(harness.pilot_discovery() is not None,
            "needs pilot-discovery from scripts/setup.d/60-istio.sh")
    workdir: Path = tmp_path_factory.mktemp("istiod")
    started = harness.Istiod.start(control_plane, workdir=workdir)
    yield started
    started.stop()


def pod(annotations: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations or {}},
            "spec": {"containers": [{"name": "web", "image": "web:1",
                                     "ports": [{"containerPort": 8080}],
                                     "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}}


def test_istiod_injects_a_native_sidecar_and_the_validation_init(istiod: harness.Istiod) -> None:
    answer = istiod.review(harness.pod_review(pod()))
    assert answer["response"]["allowed"]
    patch = harness.patch_of(answer)
    added = harness.added_containers(patch)
    # CNI on (istio-validation, not istio-init); Kubernetes 1.37: istio-proxy is a native sidecar.
    assert ("istio-validation", "initContainers") in added
    assert ("istio-proxy", "initContainers") in added
    assert any(op["path"].startswith("/metadata/annotations") and "sidecar.istio.io/status" in str(op)
               for op in patch)


def test_istiod_honours_the_opt_out_annotation(istiod: harness.Istiod) -> None:
    answer = istiod.review(harness.pod_review(pod({"sidecar.istio.io/inject": "false"})))
    assert answer["response"]["allowed"]
    assert harness.added_containers(harness.patch_of(answer)) == []


def test_istiod_names_the_deploymentconfig_of_a_pod_its_replication_controller_made(
        istiod: harness.Istiod) -> None:
    """istiod's webhook is the oracle for a pod of an OpenShift DeploymentConfig (the webhook
    only ever sees the pods, made through a ReplicationController): it names the
    DeploymentConfig as workload, owner and canonical name, and so do we; otherwise our pod
    equals istiod's as it equals istioctl's (differences.yaml)."""
    pod = dict(inputs.golden_inputs())["pod-of-deploymentconfig"]
    answer = istiod.review(harness.pod_review(pod))
    assert answer["response"]["allowed"]
    theirs = oracle.Outcome(oracle.INJECTED, jsonpatch.apply_patch(pod, harness.patch_of(answer)))
    mode = oracle.Mode("cni", native=True)  # the harness: Istio CNI on, a cluster with native sidecars
    ours = oracle.our_inject([pod], mode)[0]
    got, want = compare.aspects(ours), compare.aspects(theirs)
    workload = {"proxy.env.ISTIO_META_WORKLOAD_NAME": "frontend",
                "proxy.env.ISTIO_META_OWNER": "kubernetes://apis/v1/namespaces/shop/deploymentconfigs/frontend",
                "labels.service.istio.io/canonical-name": "frontend"}
    assert {k: want.get(k) for k in workload} == workload  # what istiod answers
    assert {k: got.get(k) for k in workload} == workload
    diffs = compare.unexplained(compare.differences(ours, theirs), mode, compare.load_entries(),
                                "pod-of-deploymentconfig")
    assert not diffs, diffs
