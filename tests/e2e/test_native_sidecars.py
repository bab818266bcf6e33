"""Native sidecars on a kubelet that honours them (issues 13 and 15), with the real Envoy.

With `nativeSidecars: auto` and a 1.29+ cluster the `envoy` template's proxy is injected as an
init container with `restartPolicy: Always`. What the kubelet then does, shown on the real node:
- it starts the proxy before the app and starts the app only once the proxy's postStart hook
  (`mesh-proxy-agent wait`: Envoy's own readiness on 15021) returned: the app's first look at
  15021 finds Envoy ready;
- a Job's pod reaches Succeeded: the kubelet stops the proxy after the app exits (the agent
  drains and exits 0); with native sidecars forced off the proxy is an ordinary container that
  never exits, so the pod stays Running and the Job never completes (the long-standing Istio
  problem with Jobs);
- a CronJob's Job completes the same way;
- on pod deletion the app is stopped first and the proxy only after the app exited: a request
  the app has in flight when it is told to stop still completes through Envoy. Without native
  sidecars both get SIGTERM at once and the same request survives because the agent drains:
  outbound traffic keeps flowing for terminationDrainDuration.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
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
    force_delete_pods,
    get_pod,
    list_pods,
    wait_for,
    wait_ready,
)
from tests.testbed import images

pytestmark = [pytest.mark.node, pytest.mark.root]

NATIVE_OFF = {"sidecar.istio.io/nativeSidecar": "false"}
#: Grace for pods whose proxy must drain (the agent's default terminationDrainDuration is 5 s):
#: the kubelet's SIGKILL would otherwise cut the drain short.
DRAIN_GRACE_S = 15
#: Keeps a deleted pod's object (and its final container statuses) until the test removes it.
HOLD = "mesh-injector.test/hold"


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.fixture
def meshed_ns(control_plane: Any, installer: Installer, webhook: Webhook) -> Iterator[str]:
    require_root()
    installer.start()
    ns = webhook.namespace(meshed=True, prefix="native")
    try:
        yield ns
    finally:
        control_plane.kubectl("delete", "jobs,cronjobs", "--all", "-n", ns, "--wait=false", check=False)
        force_delete_pods(control_plane, ns)
        control_plane.delete_namespace(ns)


def test_proxy_starts_first_and_the_app_waits_for_envoy_ready(
    control_plane: Any, meshed_ns: str
) -> None:
    """The app starts only after Envoy is ready.

    Envoy needs its own time to turn ready (the agent's interpreter, then Envoy's init: hundreds
    of ms here, more on a loaded node); the app's very first act asks 15021 and finds it ready,
    which it would not if the kubelet started both at once.
    """
    pod = app_pod("ordered")
    app = pod["spec"]["containers"][0]
    app["command"] = [
        "sh",
        "-c",
        "echo proxy-at-app-start: "
        "$(timeout 2 wget -q -O- http://127.0.0.1:15021/healthz/ready || echo not-ready); "
        + app["command"][2],
    ]
    create(control_plane, meshed_ns, pod)
    ready = wait_ready(control_plane, meshed_ns, "ordered", timeout=120)

    spec = ready["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["istio-validation", "istio-proxy"]
    proxy_spec = spec["initContainers"][1]
    assert proxy_spec["restartPolicy"] == "Always" and proxy_spec["image"] == images.ENVOY_PROXY_IMAGE
    # Held by postStart, not by a startupProbe (whose next period would come after Envoy is ready).
    assert proxy_spec["lifecycle"]["postStart"]["exec"]["command"] == ["mesh-proxy-agent", "wait"]
    assert "startupProbe" not in proxy_spec
    assert [c["name"] for c in spec["containers"]] == ["app"]

    validation = container_status(ready, "istio-validation")["state"]["terminated"]
    proxy = container_status(ready, "istio-proxy")
    started = container_status(ready, "app")["state"]["running"]["startedAt"]
    proxy_started = proxy["state"]["running"]["startedAt"]
    print(
        f"validation finished {validation['finishedAt']}, proxy started {proxy_started}, "
        f"app started {started}"
    )
    assert _time(validation["finishedAt"]) <= _time(proxy_started) <= _time(started)
    assert proxy["started"] and proxy["restartCount"] == 0

    logs = control_plane.kubectl("logs", "-n", meshed_ns, "ordered", "-c", "app").stdout
    assert "proxy-at-app-start: LIVE" in logs, logs


def _job(name: str, *, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Job whose one container works for a second and exits 0."""
    template = app_pod(name)
    del template["apiVersion"], template["kind"], template["metadata"]["name"]
    template["metadata"]["annotations"] = annotations or {}
    template["spec"]["restartPolicy"] = "Never"
    template["spec"]["terminationGracePeriodSeconds"] = DRAIN_GRACE_S
    container = template["spec"]["containers"][0]
    container.update(command=["sh", "-c", "echo working; sleep 1; echo done"])
    for key in ("readinessProbe", "ports"):
        container.pop(key)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": template},
    }


def _job_condition(control_plane: Any, ns: str, name: str, kind: str) -> dict[str, Any] | None:
    job = control_plane.get_json(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    return next(
        (
            c
            for c in job.get("status", {}).get("conditions") or []
            if c["type"] == kind and c["status"] == "True"
        ),
        None,
    )


def _succeeded_with_proxy_stopped(control_plane: Any, ns: str, pod_name: str) -> None:
    pod = wait_for(
        f"pod {pod_name} Succeeded",
        lambda: (
            p if (p := get_pod(control_plane, ns, pod_name))["status"].get("phase") == "Succeeded" else None
        ),
        timeout=90,
    )
    app = container_status(pod, "app")["state"]["terminated"]
    proxy = container_status(pod, "istio-proxy")["state"]["terminated"]
    assert app["exitCode"] == 0
    # The kubelet stopped the proxy after the app had exited (SIGTERM: the agent drains, stops
    # Envoy and exits 0; a proxy killed at the end of the grace period would show 137).
    assert proxy["exitCode"] == 0 and _time(proxy["finishedAt"]) >= _time(app["finishedAt"]), (app, proxy)


def test_job_completes_with_the_native_sidecar(control_plane: Any, meshed_ns: str) -> None:
    create(control_plane, meshed_ns, _job("batch"))
    (pod,) = wait_for("the Job's pod", lambda: list_pods(control_plane, meshed_ns, "job-name=batch"), 60)
    proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-proxy")
    assert proxy["restartPolicy"] == "Always"
    _succeeded_with_proxy_stopped(control_plane, meshed_ns, pod["metadata"]["name"])
    wait_for("Job batch Complete", lambda: _job_condition(control_plane, meshed_ns, "batch", "Complete"), 60)


def test_job_without_native_sidecars_never_completes(control_plane: Any, meshed_ns: str) -> None:
    """The proxy as an ordinary container outlives the app: the pod stays Running, the Job active."""
    create(control_plane, meshed_ns, _job("stuck", annotations=NATIVE_OFF))
    (pod,) = wait_for("the Job's pod", lambda: list_pods(control_plane, meshed_ns, "job-name=stuck"), 60)
    name = pod["metadata"]["name"]
    assert "istio-proxy" in [c["name"] for c in pod["spec"]["containers"]]

    def app_exited() -> dict[str, Any] | None:
        current = get_pod(control_plane, meshed_ns, name)
        terminated = container_status(current, "app").get("state", {}).get("terminated")
        return current if terminated else None

    exited = wait_for("the app container to exit", app_exited, timeout=90)
    assert container_status(exited, "app")["state"]["terminated"]["exitCode"] == 0
    time.sleep(10)  # long past the app's exit: nothing will stop the proxy
    pod = get_pod(control_plane, meshed_ns, name)
    assert pod["status"]["phase"] == "Running"
    assert "running" in container_status(pod, "istio-proxy")["state"]
    job = control_plane.get_json(f"/apis/batch/v1/namespaces/{meshed_ns}/jobs/stuck")
    assert job["status"].get("active") == 1 and not job["status"].get("succeeded")
    assert _job_condition(control_plane, meshed_ns, "stuck", "Complete") is None


def test_cronjob_run_completes(control_plane: Any, meshed_ns: str) -> None:
    job = _job("tick")
    cron = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "tick"},
        "spec": {
            "schedule": "* * * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": job["spec"]},
        },
    }
    create(control_plane, meshed_ns, cron)

    def first_job() -> str | None:
        jobs = control_plane.get_json(f"/apis/batch/v1/namespaces/{meshed_ns}/jobs")["items"]
        owned = [j for j in jobs if (j["metadata"].get("ownerReferences") or [{}])[0].get("name") == "tick"]
        return owned[0]["metadata"]["name"] if owned else None

    job_name = wait_for("the CronJob's first Job (next minute)", first_job, timeout=90)
    (pod,) = wait_for(
        "its pod", lambda: list_pods(control_plane, meshed_ns, f"job-name={job_name}"), timeout=60
    )
    _succeeded_with_proxy_stopped(control_plane, meshed_ns, pod["metadata"]["name"])
    wait_for(
        f"Job {job_name} Complete", lambda: _job_condition(control_plane, meshed_ns, job_name, "Complete"), 60
    )


def _slow_backend(control_plane: Any, ns: str) -> str:
    """An unmeshed busybox web server whose /cgi-bin/slow answers after 4 s; its pod IP."""
    backend = app_pod("slow")
    backend["spec"]["containers"][0]["command"] = [
        "sh",
        "-c",
        "mkdir -p /tmp/www/cgi-bin && printf '#!/bin/sh\\nsleep 4\\necho Content-Type: text/plain\\n"
        "echo\\necho slow-ok\\n' > /tmp/www/cgi-bin/slow && chmod +x /tmp/www/cgi-bin/slow && "
        f"exec httpd -f -p {APP_PORT} -h /tmp/www",
    ]
    create(control_plane, ns, backend)
    return wait_ready(control_plane, ns, "slow")["status"]["podIP"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "classic"])
def test_deletion_keeps_the_apps_in_flight_request(
    control_plane: Any, meshed_ns: str, webhook: Webhook, native: bool
) -> None:
    """Native: the kubelet stops the app first and Envoy only after the app exited. Classic (the
    proxy an ordinary container): both get SIGTERM at once, and the request still completes
    because the agent drains (outbound keeps flowing for terminationDrainDuration, 5 s)."""
    plain = webhook.namespace(meshed=False, prefix="native-plain")
    try:
        backend = _slow_backend(control_plane, plain)
        pod = app_pod("leaving")
        pod["metadata"]["finalizers"] = [HOLD]
        pod["metadata"]["annotations"] = {} if native else dict(NATIVE_OFF)
        pod["spec"]["terminationGracePeriodSeconds"] = 30
        # On `touch /tmp/go` the app starts a 4 s request through the proxy; on SIGTERM it waits
        # for that request and exits 0 only if the answer arrived.
        pod["spec"]["containers"][0]["command"] = [
            "sh",
            "-c",
            "trap 'wait $req && grep -q slow-ok /tmp/reply && exit 0; exit 3' TERM; "
            f"httpd -p {APP_PORT} -h /; "
            "while [ ! -e /tmp/go ]; do sleep 0.2; done; "
            f"wget -q -O /tmp/reply http://{backend}:{APP_PORT}/cgi-bin/slow & req=$!; "
            "while true; do sleep 0.2; done",
        ]
        create(control_plane, meshed_ns, pod)
        started = wait_ready(control_plane, meshed_ns, "leaving", timeout=120)
        where = "initContainers" if native else "containers"
        assert "istio-proxy" in [c["name"] for c in started["spec"][where]]
        control_plane.kubectl("exec", "-n", meshed_ns, "leaving", "-c", "app", "--", "touch", "/tmp/go")
        time.sleep(1)  # the request is on its way (the backend answers 3 s from now)
        control_plane.kubectl("delete", "pod", "leaving", "-n", meshed_ns, "--wait=false")
        deleted_at = time.time()

        # The answer comes through Envoy, which logs it with its code; read while Envoy still runs
        # (the kubelet removes a deleted pod's containers, and their logs, once all have exited).
        (line,) = wait_for(
            "Envoy's access log line for the in-flight request",
            lambda: [
                e for e in access_log(control_plane, meshed_ns, "leaving") if e.get("path") == "/cgi-bin/slow"
            ],
            timeout=30,
        )
        assert line["direction"] == "outbound" and str(line["response_code"]) == "200", line

        def all_stopped() -> dict[str, Any] | None:
            current = get_pod(control_plane, meshed_ns, "leaving")
            names = ("app", "istio-proxy")
            states = [container_status(current, n).get("state", {}) for n in names]
            return current if all("terminated" in s for s in states) else None

        final = wait_for("app and proxy terminated", all_stopped, timeout=60)
        app = container_status(final, "app")["state"]["terminated"]
        proxy = container_status(final, "istio-proxy")["state"]["terminated"]
        print(f"deleted at {datetime.fromtimestamp(deleted_at).isoformat()}: app {app}, proxy {proxy}")
        assert app["exitCode"] == 0, f"the app's in-flight request did not complete: {app}"
        assert _time(app["finishedAt"]) <= _time(proxy["finishedAt"])
        assert proxy["exitCode"] == 0, f"the agent drained and exited by itself: {proxy}"
    finally:
        control_plane.kubectl(
            "patch", "pod", "leaving", "-n", meshed_ns, "--type=json",
            "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]), check=False,
        )  # fmt: skip
        force_delete_pods(control_plane, plain)
        control_plane.delete_namespace(plain)
