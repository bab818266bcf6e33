"""The real istiod (``pilot-discovery discovery``) outside a cluster, serving sidecar injection.

istiod runs as a plain process on loopback against a test-bed API server: the two ConfigMaps
an installation puts in ``istio-system`` (``istio``: mesh config, ``istio-sidecar-injector``:
injection config and values) are created from what ``istioctl manifest generate`` gives
(``tests.istio.oracle.istio_files``), and istiod reads them from the API server as it does in a
cluster. Every listener gets a free loopback port; its webhook port (15017 in a cluster) serves
``/inject`` with the serving certificate istiod issues itself from its self-signed CA (kept in
the Secret ``istio-ca-secret``). Nothing here writes outside its work directory.

Facts this needs (from running it, not from a cluster): ``--kubeconfig`` replaces in-cluster
config; POD_NAMESPACE / REVISION pick the ConfigMaps; the in-cluster paths
(``./var/lib/istio/inject``, ``./etc/istio/config/mesh``, ``./var/run/secrets/...``) are
relative to the working directory, so a fresh work directory holds none of them and istiod
falls back to the API server; the webhook-config patchers are turned off (their objects do not
exist here and the API server must not call a webhook that points at a Service).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.istio import oracle
from tests.testbed.controlplane import ControlPlane
from tests.testbed.proc import Daemon, free_port, start_daemon, wait_until

NAMESPACE = "istio-system"


def pilot_discovery() -> Path | None:
    path = oracle.bin_dir() / "pilot-discovery"
    return path if os.access(path, os.X_OK) else None


def install_config(plane: ControlPlane, capture: str = "cni") -> None:
    """``istio-system`` with the mesh and injector ConfigMaps of a default-profile install."""
    files = oracle.istio_files(capture)
    plane.kubectl("create", "namespace", NAMESPACE, check=False)
    maps = {
        "istio": {"mesh": (files / "mesh.yaml").read_text(), "meshNetworks": "networks: {}"},
        "istio-sidecar-injector": {"config": (files / "inject-config.yaml").read_text(),
                                   "values": (files / "values.json").read_text()},
    }
    for name, data in maps.items():
        doc = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": NAMESPACE,
                            "labels": {"istio.io/rev": "default"}}, "data": data}
        plane.kubectl("apply", "-f", "-", input=json.dumps(doc))


@dataclass
class Istiod:
    """A running istiod; ``url`` is its injection (webhook) listener."""

    daemon: Daemon
    workdir: Path
    url: str
    ready_url: str

    @property
    def pid(self) -> int:
        return self.daemon.pid

    @classmethod
    def start(cls, plane: ControlPlane, *, capture: str = "cni", workdir: Path | None = None,
              timeout: float = 90.0) -> Istiod:
        binary = pilot_discovery()
        if binary is None:
            raise FileNotFoundError(f"pilot-discovery missing under {oracle.bin_dir()}: "
                                    "run scripts/setup.d/60-istio.sh")
        install_config(plane, capture)
        workdir = workdir or Path(tempfile.mkdtemp(prefix="istiod-"))
        ports = {name: free_port() for name in ("https", "http", "grpc", "sgrpc", "monitoring", "ctrlz")}
        argv = [str(binary), "discovery", f"--kubeconfig={plane.kubeconfig}",
                f"--httpsAddr=127.0.0.1:{ports['https']}", f"--httpAddr=127.0.0.1:{ports['http']}",
                f"--grpcAddr=127.0.0.1:{ports['grpc']}", f"--secureGRPCAddr=127.0.0.1:{ports['sgrpc']}",
                f"--monitoringAddr=127.0.0.1:{ports['monitoring']}",
                "--ctrlz_address=127.0.0.1", f"--ctrlz_port={ports['ctrlz']}",
                "--domain=cluster.local", "--log_output_level=default:info", "--shutdownDuration=1s"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
            "POD_NAMESPACE": NAMESPACE, "POD_NAME": "istiod-bench", "SERVICE_ACCOUNT": "istiod",
            "REVISION": "default", "CLUSTER_ID": "Kubernetes", "PILOT_CERT_PROVIDER": "istiod",
            "PILOT_ENABLE_ANALYSIS": "false",
            # No webhook configurations exist here to patch with istiod's CA.
            "INJECTION_WEBHOOK_CONFIG_NAME": "", "VALIDATION_WEBHOOK_CONFIG_NAME": "",
        }
        daemon = start_daemon("istiod", argv, workdir / "logs", env=env, cwd=workdir)
        istiod = cls(daemon, workdir, f"https://127.0.0.1:{ports['https']}",
                     f"http://127.0.0.1:{ports['http']}/ready")
        try:
            wait_until("istiod ready and serving /inject", istiod.serving, timeout, daemons=[daemon])
        except BaseException:
            istiod.stop()
            raise
        return istiod

    def serving(self) -> bool:
        urllib.request.urlopen(self.ready_url, timeout=2)
        return self.review(_probe_review()) is not None

    def review(self, review: dict[str, Any]) -> dict[str, Any]:
        return post_review(self.url, review)

    def stop(self) -> None:
        self.daemon.stop()


def post_review(url: str, review: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """POST one AdmissionReview to ``url``/inject; the certificate is not verified (istiod's is
    issued by its own CA, for its in-cluster name)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(f"{url}/inject", data=json.dumps(review).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, context=ctx, timeout=timeout) as answer:
        return json.load(answer)


def patch_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch of an AdmissionReview answer (empty when it has none)."""
    encoded = (answer.get("response") or {}).get("patch")
    return json.loads(base64.b64decode(encoded)) if encoded else []


def added_containers(patch: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(name, pod field) of every container a patch adds, e.g. ("istio-proxy", "initContainers")."""
    out = []
    for op in patch:
        field = op["path"].split("/")[2] if op["path"].startswith("/spec/") else ""
        if op.get("op") != "add" or field not in ("containers", "initContainers"):
            continue
        for value in op["value"] if isinstance(op["value"], list) else [op["value"]]:
            if isinstance(value, dict) and "name" in value:
                out.append((value["name"], field))
    return out


def pod_review(pod: dict[str, Any], uid: str = "probe") -> dict[str, Any]:
    """A CREATE AdmissionReview for a pod, as the API server sends it."""
    namespace = pod["metadata"].get("namespace", "default")
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": namespace, "operation": "CREATE", "object": pod}}


def _probe_review() -> dict[str, Any]:
    return pod_review({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "probe", "namespace": "default"},
                       "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
