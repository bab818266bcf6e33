"""The audit against the real kube-apiserver: paging, streaming, revisions, --restart, 410, bounds."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector import audit
from injector.configwatch import builtin_config
from tests.audit.helpers import Api, injected, pending_pod
from tests.server.helpers import serve_command, start_server
from tests.testbed.controlplane import ControlPlane
from tests.testbed.proc import wait_for

pytestmark = pytest.mark.apiserver


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> Iterator[Api]:
    client = Api(control_plane.server, control_plane.token, str(control_plane.ca_file))
    yield client
    client.close()


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[Any]:
    made: list[str] = []

    def make(labels: dict[str, str] | None = None) -> str:
        made.append(control_plane.create_namespace(labels=labels, prefix="audit"))
        return made[-1]

    yield make
    for name in made:
        control_plane.delete_namespace(name)


def cli(plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"KUBECONFIG": str(plane.kubeconfig), "PATH": "/usr/bin:/bin"}
    return subprocess.run([*serve_command(), "audit", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def jsonl(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = [json.loads(line) for line in text.splitlines()]
    return lines[:-1], lines[-1]


def test_the_cli_pages_through_the_api_and_reports_every_pod_once(
    control_plane: ControlPlane, api: Api, namespace: Any
) -> None:
    ns = namespace({"istio-injection": "enabled"})
    meshed = [injected(pending_pod(f"meshed-{i}")) for i in range(13)]
    plain = [pending_pod(f"plain-{i}") for i in range(10)]
    host = pending_pod("host-0")
    host["spec"]["hostNetwork"] = True
    api.create_pods(ns, [*meshed, *plain, host])

    result = cli(control_plane, "-n", ns, "--page-size", "5", "-o", "jsonl")
    assert result.returncode == 0, result.stderr
    rows, last = jsonl(result.stdout)
    assert sorted(r["pod"] for r in rows) == sorted(p["metadata"]["name"] for p in [*meshed, *plain, host])
    by_name = {r["pod"]: r for r in rows}
    assert by_name["host-0"]["reasons"][0]["code"] == "HostNetwork" and not by_name["host-0"]["shouldInject"]
    summary = last["summary"]
    # 23 pods in pages of 5, then the hostNetwork pods' own list (one page)
    assert summary["pages"] == 6 and summary["complete"] and summary["listRestarts"] == 0
    assert summary["missingSidecar"] == 10 and summary["injected"] == 13 and summary["stale"] == 0
    assert summary["revisions"] == {"default": 13}

    as_json = cli(control_plane, "-n", ns, "--page-size", "7", "-o", "json")
    document = json.loads(as_json.stdout)  # one valid document, although written page by page
    assert len(document["pods"]) == 24 and document["summary"]["pages"] == 5

    table = cli(control_plane, "-n", ns, "--page-size", "4")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAMESPACE", "POD", "OWNER"]
    assert sum(line.startswith(ns) for line in lines) == 24
    assert lines[-1].startswith("24 pods: 13 injected, 10 missing the sidecar")


def deployment(name: str, replicas: int) -> dict[str, Any]:
    template = pending_pod(name)
    del template["apiVersion"], template["kind"], template["metadata"]["name"]
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
           "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}, "template": template}}
    return injected(obj)  # as `kube-inject` (or the webhook) of the default revision left it


def test_a_namespace_moved_to_canary_shows_stale_pods_and_restart_rolls_their_workloads(
    control_plane: ControlPlane, api: Api, namespace: Any
) -> None:
    ns = namespace({"istio-injection": "enabled"})
    api.request("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", deployment("web", 3))
    api.create_pods(ns, [injected(pending_pod("bare-0"))])
    pods_path = f"/api/v1/namespaces/{ns}/pods"
    wait_for("the deployment's pods", lambda: len(api.request("GET", pods_path)["items"]) == 4, timeout=60)
    before, last = jsonl(cli(control_plane, "-n", ns, "-o", "jsonl").stdout)
    assert last["summary"]["stale"] == 0 and last["summary"]["needsRestart"] == 0
    assert {r["owner"] for r in before} == {"Deployment/web", None}  # through the ReplicaSet, by name

    control_plane.kubectl("label", "namespace", ns, "istio-injection-", "istio.io/rev=canary")
    rows, last = jsonl(cli(control_plane, "-n", ns, "-o", "jsonl").stdout)
    assert {(r["revision"], r["wantedRevision"], r["stale"], r["needsRestart"]) for r in rows} == {
        ("default", "canary", True, True)}
    assert last["summary"]["stale"] == 4 and last["summary"]["workloadsToRestart"] == 1

    dry = cli(control_plane, "-n", ns, "--restart", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"deployment/web -n {ns}: would restart (3 pod(s) need it)" in dry.stdout
    assert "1 pod(s) need a restart but have no Deployment" in dry.stdout
    template = api.request("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/web")["spec"]["template"]
    assert audit.RESTARTED_AT not in (template["metadata"].get("annotations") or {})

    done = cli(control_plane, "-n", ns, "--restart")
    assert done.returncode == 0, done.stderr
    assert f"deployment/web -n {ns}: restarted" in done.stdout
    rolled = api.request("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/web")
    assert audit.RESTARTED_AT in rolled["spec"]["template"]["metadata"]["annotations"]
    assert rolled["metadata"]["generation"] == 2  # a new rollout, as `kubectl rollout restart`


def expired(token: str) -> Exception:
    """The API's answer to an expired continue token: 410, a Status with reason Expired."""
    from kubernetes.client.exceptions import ApiException

    error = ApiException(status=410, reason="Gone")
    error.body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                             "reason": "Expired", "metadata": {"continue": token},
                             "message": "the continue parameter is too old for a consistent list"})
    return error


def test_an_expired_continue_token_restarts_the_list_cleanly(
    control_plane: ControlPlane, api: Api, namespace: Any
) -> None:
    """The one fake here is the 410 itself. kube-apiserver 1.37 serves continue tokens from its
    watch-cache snapshots: compacting etcd past a token, or a token naming a compacted revision,
    still gets 200 (both tried), and the cache drops snapshots only after minutes. So the second
    request answers 410 Expired as the API shapes it; every other page is the real server's."""
    ns = namespace({"istio-injection": "enabled"})
    api.create_pods(ns, [pending_pod(f"pod-{i:02d}") for i in range(12)])
    reader = audit.ClusterReader(control_plane.api_client(), ns, page_size=5)
    real_fetch = reader._fetch_pods
    calls: list[str | None] = []

    def fetch(limit: int, token: str | None, host_network: bool = False) -> dict[str, Any]:
        calls.append(token)
        if len(calls) == 2:
            assert token  # the real server gave a continue token after the first page
            api.create_pods(ns, [pending_pod("pod-99")])  # changed meanwhile: the restart sees it
            raise expired(token)
        return real_fetch(limit, token, host_network)

    reader._fetch_pods = fetch  # type: ignore[method-assign]
    report = audit.Report(reader, builtin_config())
    names = [row.pod for rows in report.pages() for row in rows]
    assert calls[2] is None  # restarted without continue (and so without a resourceVersion)
    assert names == [f"pod-{i:02d}" for i in range(12)] + ["pod-99"]  # each once, the new one too
    assert report.summary.restarts == 1 and report.summary.complete
    assert report.summary.as_dict()["listRestarts"] == 1


def test_get_audit_streams_json_lines_and_a_json_document(
    control_plane: ControlPlane, api: Api, namespace: Any, tmp_path: Path
) -> None:
    ns = namespace({"istio-injection": "enabled"})
    api.create_pods(ns, [injected(pending_pod(f"meshed-{i}")) for i in range(9)])
    server = start_server(tmp_path, extra_args=["--kubeconfig", str(control_plane.kubeconfig)])
    headers = {"authorization": f"Bearer {control_plane.token}"}
    try:
        with server.client() as client:
            params = {"namespace": ns, "format": "jsonl", "pageSize": "4"}
            with client.stream("GET", "/audit", params=params, headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("application/x-ndjson")
                assert "content-length" not in response.headers  # streamed, not built first
                lines = [json.loads(line) for line in response.iter_lines() if line]
            document = client.get("/audit", params={"namespace": ns, "pageSize": "2"}, headers=headers).json()
            bad = client.get("/audit", params={"namespace": ns, "pageSize": "0"}, headers=headers)
            missing = client.get("/audit", params={"namespace": "no-such-ns"}, headers=headers)
    finally:
        server.stop()
    assert len(lines) == 10 and lines[-1]["summary"]["pages"] == 4  # 3 + the hostNetwork list
    assert lines[-1]["requestedBy"] and lines[-1]["summary"]["complete"]
    assert len(document["pods"]) == 9 and document["summary"]["pages"] == 6
    assert bad.status_code == 400 and "page-size limit" in bad.json()["error"]
    assert missing.status_code == 404


class _Request:
    def __init__(self, token: str, **query: str) -> None:
        self.headers = {"authorization": f"Bearer {token}"}
        self.query_params = query


class _State:
    def __init__(self, api: Any) -> None:
        self.api = api
        self.config = type("Current", (), {"current": builtin_config()})()


def test_get_audit_is_bounded_in_concurrency_and_time(control_plane: ControlPlane, namespace: Any) -> None:
    import asyncio

    ns = namespace()
    state = _State(control_plane.api_client())
    busy = audit.AuditGate(max_concurrent=1)
    assert busy.try_enter()
    refused = asyncio.run(audit.handle(_Request(control_plane.token), state, ns, gate=busy))  # type: ignore[arg-type]
    assert refused.status_code == 429 and b"concurrency limit" in refused.body
    assert refused.headers["retry-after"]

    late = audit.AuditGate(deadline_s=0.0)
    timed_out = asyncio.run(audit.handle(_Request(control_plane.token), state, ns, gate=late))  # type: ignore[arg-type]
    assert timed_out.status_code == 504 and b"deadline" in timed_out.body
    assert late.running == 0  # the slot is given back
