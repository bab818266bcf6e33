"""Pod-create latency through a real kube-apiserver, with and without our webhook, in one run.

Brings up the loopback control plane (``tests/testbed``; binaries from scripts/setup.d/30-kube.sh,
or attach to a running one with MESH_CONTROL_PLANE=DIR) and ``mesh-injector serve``, then times
``POST /api/v1/namespaces/<ns>/pods`` (keep-alive HTTPS, admin token) for a typical pod:

- *without*: no webhook configuration registered;
- *with*: the webhook registered (selectors from ``injector.selectors``), namespace labelled
  ``istio-injection=enabled`` - the API server calls us on every create;
- *registered, not selected*: same configuration, unlabelled namespace (selector says no),
  interleaved with *with* so both see the same machine state.

Prints the medians and the added latency against the target (<= 5 ms).

    .venv/bin/python bench/bench_apiserver.py [--pods 200]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.bench_server import free_port, serve_command, wait_ready  # noqa: E402
from injector import pki  # noqa: E402
from injector.manifests import webhook_configuration  # noqa: E402
from tests.testbed.controlplane import ControlPlane  # noqa: E402

TARGET_ADDED_MS = 5.0
SCOPE_LABEL = "mesh-injector.bench/scope"


def bench_pod(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"bench-{i}", "labels": {"app": "bench", "version": "v1"}},
        "spec": {
            "nodeSelector": {"mesh-injector.test/no-such-node": "true"},
            "containers": [
                {
                    "name": "web",
                    "image": "busybox",
                    "command": ["sleep", "3600"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                    "livenessProbe": {"tcpSocket": {"port": 8080}},
                },
                {"name": "worker", "image": "busybox", "command": ["sleep", "3600"]},
                {
                    "name": "exporter",
                    "image": "busybox",
                    "command": ["sleep", "3600"],
                    "ports": [{"containerPort": 9100}],
                },
            ],
        },
    }


def create_times(client: httpx.Client, namespace: str, start: int, count: int) -> list[float]:
    out = []
    for i in range(start, start + count):
        body = json.dumps(bench_pod(i))
        t0 = time.perf_counter()
        response = client.post(
            f"/api/v1/namespaces/{namespace}/pods", content=body, headers={"content-type": "application/json"}
        )
        out.append((time.perf_counter() - t0) * 1000)
        if response.status_code != 201:
            raise SystemExit(f"pod create failed: {response.status_code} {response.text[:300]}")
    return out


def webhook_seconds(client: httpx.Client) -> tuple[float, float]:
    """(sum, count) of the API server's own timing of calls to our webhooks (all label sets)."""
    total, count = 0.0, 0.0
    for line in client.get("/metrics").text.splitlines():
        if (
            not line.startswith("apiserver_admission_webhook_admission_duration_seconds_")
            or "sidecar-injector.mesh-injector.io" not in line
        ):
            continue
        name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
        if name.endswith("_sum"):
            total += value
        elif name.endswith("_count"):
            count += value
    return total, count


def configmap_times(client: httpx.Client, namespace: str, start: int, count: int) -> list[float]:
    out = []
    for i in range(start, start + count):
        t0 = time.perf_counter()
        response = client.post(
            f"/api/v1/namespaces/{namespace}/configmaps",
            json={"metadata": {"name": f"bench-{i}"}, "data": {"k": "v"}},
        )
        out.append((time.perf_counter() - t0) * 1000)
        if response.status_code != 201:
            raise SystemExit(f"configmap create failed: {response.status_code} {response.text[:300]}")
    return out


def injected(client: httpx.Client, namespace: str, name: str) -> bool:
    pod = client.get(f"/api/v1/namespaces/{namespace}/pods/{name}").json()
    spec = pod["spec"]
    return any(c["name"] == "istio-proxy" for c in spec.get("initContainers", []) + spec["containers"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200, help="pods per measured series")
    args = parser.parse_args(argv)

    attach = os.environ.get("MESH_CONTROL_PLANE")
    plane = ControlPlane.attach(Path(attach)) if attach else ControlPlane.start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-apiserver-"))
    server: subprocess.Popen[bytes] | None = None
    scope = uuid.uuid4().hex[:8]
    config_name = f"mesh-injector-bench-{scope}"
    namespaces: list[str] = []
    try:
        ca = pki.make_ca("bench CA")
        serving = pki.issue_serving_cert(ca, ["127.0.0.1"])
        (tmp / "ca.crt").write_bytes(ca.cert_pem)
        (tmp / "tls.crt").write_bytes(serving.cert_pem)
        (tmp / "tls.key").write_bytes(serving.key_pem)
        port = free_port()
        log = (tmp / "server.log").open("wb")
        server = subprocess.Popen(
            [
                *serve_command(),
                "serve",
                "--address",
                "127.0.0.1",
                "--port",
                str(port),
                "--tls-cert-file",
                str(tmp / "tls.crt"),
                "--tls-key-file",
                str(tmp / "tls.key"),
                "--no-events",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        if not wait_ready(f"https://127.0.0.1:{port}", ctx, server, tmp / "server.log"):
            return 1

        mesh_ns = plane.create_namespace(
            labels={SCOPE_LABEL: scope, "istio-injection": "enabled"}, prefix="bench-mesh"
        )
        plain_ns = plane.create_namespace(labels={SCOPE_LABEL: scope}, prefix="bench-plain")
        namespaces += [mesh_ns, plain_ns]
        config = webhook_configuration(
            name=config_name,
            url=f"https://127.0.0.1:{port}/inject",
            ca_bundle=base64.b64encode(ca.cert_pem).decode(),
        )
        for webhook in config["webhooks"]:
            webhook["namespaceSelector"].setdefault("matchLabels", {})[SCOPE_LABEL] = scope

        with httpx.Client(
            base_url=plane.server,
            verify=str(plane.ca_file),
            headers={"authorization": f"Bearer {plane.token}"},
            timeout=30,
        ) as api:
            create_times(api, mesh_ns, 0, 20)  # warm-up: connections, caches

            def wait_until(want_injected: bool, probe: int) -> int:
                """Create probe pods until the API server (its webhook config informer) calls us or not."""
                deadline = time.monotonic() + 30
                while True:
                    create_times(api, mesh_ns, probe, 1)
                    if injected(api, mesh_ns, f"bench-{probe}") == want_injected:
                        return probe + 1
                    probe += 1
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the webhook was {'never' if want_injected else 'still'} called")

            # Alternate blocks without and with the configuration, so drift (the store grows, the
            # controller-manager's caches fill) hits both series alike; within "with" blocks, pods
            # in a namespace the selector does not match are interleaved.
            blocks = 4
            per_block = max(1, args.pods // blocks)
            without: list[float] = []
            with_webhook: list[float] = []
            not_selected: list[float] = []
            seen_ms_total, seen_calls = 0.0, 0.0
            probe = 200_000
            for block in range(blocks):
                base = 1_000_000 * (block + 1)
                without += create_times(api, mesh_ns, base, per_block)
                assert not injected(api, mesh_ns, f"bench-{base}")
                plane.kubectl("create", "-f", "-", input=json.dumps(config))
                probe = wait_until(True, probe)
                create_times(api, mesh_ns, base + 100_000, 10)  # warm-up of the webhook path
                seen_before = webhook_seconds(api)
                for i in range(per_block):
                    with_webhook += create_times(api, mesh_ns, base + 400_000 + i, 1)
                    not_selected += create_times(api, plain_ns, base + 500_000 + i, 1)
                assert injected(api, mesh_ns, f"bench-{base + 400_000}")
                assert not injected(api, plain_ns, f"bench-{base + 500_000}")
                seen_after = webhook_seconds(api)
                seen_calls += seen_after[1] - seen_before[1]
                seen_ms_total += (seen_after[0] - seen_before[0]) * 1000
                plane.kubectl("delete", "mutatingwebhookconfiguration", config_name)
                probe = wait_until(False, probe)
            seen_ms = seen_ms_total / max(seen_calls, 1)
            plane.kubectl("create", "-f", "-", input=json.dumps(config))
            probe = wait_until(True, probe)

            # Same webhooks with reinvocationPolicy Never: one call per pod instead of two.
            for webhook in config["webhooks"]:
                webhook["reinvocationPolicy"] = "Never"
            plane.kubectl("delete", "mutatingwebhookconfiguration", config_name)
            plane.kubectl("create", "-f", "-", input=json.dumps(config))
            time.sleep(3)  # let the API server's webhook config informer catch up
            create_times(api, mesh_ns, 600_000, 20)
            once: list[float] = []
            for i in range(args.pods):
                once += create_times(api, mesh_ns, 700_000 + i, 1)
                create_times(api, plain_ns, 800_000 + i, 1)
            assert injected(api, mesh_ns, "bench-700000")

            # The API server's fixed cost of calling a webhook: ConfigMap creates, with and without a
            # webhook on our server that answers allowed/no patch (NotPod) in microseconds.
            plane.kubectl("delete", "mutatingwebhookconfiguration", config_name)
            configmap_times(api, plain_ns, 0, 20)
            cm_without = configmap_times(api, plain_ns, 1000, args.pods)
            passthrough = {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": config_name},
                "webhooks": [
                    {
                        "name": "configmaps.bench.mesh-injector.io",
                        "admissionReviewVersions": ["v1"],
                        "sideEffects": "None",
                        "failurePolicy": "Fail",
                        "clientConfig": {
                            "url": f"https://127.0.0.1:{port}/inject",
                            "caBundle": base64.b64encode(ca.cert_pem).decode(),
                        },
                        "rules": [
                            {
                                "apiGroups": [""],
                                "apiVersions": ["v1"],
                                "operations": ["CREATE"],
                                "resources": ["configmaps"],
                            }
                        ],
                        "namespaceSelector": {"matchLabels": {SCOPE_LABEL: scope}},
                    }
                ],
            }
            plane.kubectl("create", "-f", "-", input=json.dumps(passthrough))
            time.sleep(3)
            configmap_times(api, plain_ns, 2000, 20)
            cm_with = configmap_times(api, plain_ns, 3000, args.pods)

        med_without = statistics.median(without)
        med_with = statistics.median(with_webhook)
        med_plain = statistics.median(not_selected)
        added = med_with - med_without
        print(
            f"pod create through kube-apiserver 1.20 on loopback, {len(without)} pods per series "
            f"({blocks} alternating blocks without/with the webhook configuration), "
            f"load average {os.getloadavg()[0]:.2f}:"
        )
        print(f"  without webhook configuration        median {med_without:7.2f} ms")
        print(f"  registered, namespace not selected   median {med_plain:7.2f} ms")
        print(
            f"  with webhook (called, injected)      median {med_with:7.2f} ms  "
            f"p90 {statistics.quantiles(with_webhook, n=10)[-1]:.2f} ms"
        )
        print(
            f"  added by the webhook                 {added:+7.2f} ms (target <= {TARGET_ADDED_MS:.0f} ms: "
            f"ratio {added / TARGET_ADDED_MS:.2f}); vs. not-selected {med_with - med_plain:+.2f} ms"
        )
        med_once = statistics.median(once)
        print(
            f"  with webhook, reinvocationPolicy Never median {med_once:7.2f} ms: added "
            f"{med_once - med_without:+.2f} ms (ratio {(med_once - med_without) / TARGET_ADDED_MS:.2f})"
        )
        cm_added = statistics.median(cm_with) - statistics.median(cm_without)
        print(
            f"  the API server's fixed cost of one webhook call (ConfigMap create, our server answers "
            f"allowed without patch): {cm_added:+.2f} ms"
        )
        calls: dict[str, list[dict[str, Any]]] = {}
        for line in (tmp / "server.log").read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("msg") == "admission" and str(entry.get("pod", ""))[7:8] == "4":
                calls.setdefault(entry["pod"], []).append(entry)
        if calls:
            per_pod = statistics.mean(len(v) for v in calls.values())
            inside = statistics.median(float(e["latency_ms"]) for v in calls.values() for e in v)
            repatched = sum(1 for v in calls.values() for e in v[1:] if e.get("patched"))
            print(
                f"  IfNeeded: webhook calls per pod {per_pod:.2f} (in-tree plugins re-ran after us); "
                f"later calls that patched again: {repatched}; "
                f"median time inside the server per call {inside:.2f} ms"
            )
        print(
            f"  the API server's own timing of our webhook calls: mean {seen_ms:.2f} ms per call over "
            f"{seen_calls:.0f} calls (apiserver_admission_webhook_admission_duration_seconds)"
        )
    finally:
        plane.kubectl(
            "delete", "mutatingwebhookconfiguration", config_name, "--ignore-not-found", check=False
        )
        for ns in namespaces:
            plane.delete_namespace(ns)
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        if not attach:
            plane.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
