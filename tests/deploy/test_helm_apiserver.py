"""`helm install`, `upgrade`, `uninstall`, revisions and revision tags against the real kube-apiserver.

The control plane is shared by the whole test session and our webhooks fail closed, so every
release here is installed with two stated differences from a user's install:
- `injector.namespaceLabels` restricts its webhooks to namespaces carrying this module's label;
- `injector.url` points the webhooks at a `mesh-injector serve` process on loopback (the test bed
  has no kube-proxy, so the API server cannot reach a Service, and the Deployment is scaled to 0).
  That process runs the configuration the chart rendered: the test copies the release's ConfigMap
  into the server's config directory, as the kubelet's ConfigMap volume would.
Everything else (RBAC, webhook configurations, ConfigMaps, Helm's own ordering) is the chart's.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector import manifests
from tests.conftest import REPO
from tests.deploy.cluster import write_kubeconfig
from tests.deploy.test_helm import helm
from tests.server.helpers import RunningServer, serve_command, start_server
from tests.testbed.controlplane import ControlPlane
from tests.testbed.proc import wait_for

pytestmark = pytest.mark.apiserver

SCOPE = "mesh-injector.test/helm"
UNSCHEDULABLE = {"mesh-injector.test/no-such-node": "true"}  # pods stay Pending even with a node


class Helm:
    """Helm against the test bed, plus one loopback server per installed release."""

    def __init__(self, plane: ControlPlane, workdir: Path) -> None:
        self.plane = plane
        self.workdir = workdir
        self.scope = uuid.uuid4().hex[:10]
        self.namespace = f"helm-{self.scope}"
        self.servers: dict[str, RunningServer] = {}
        self.namespaces: list[str] = []

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [helm(), "--kubeconfig", str(self.plane.kubeconfig), *args],
            capture_output=True, text=True, check=False, timeout=180,
        )
        if check:
            assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done

    def values(self, server: RunningServer) -> list[str]:
        return [
            "--namespace", self.namespace,
            "--set", "injector.replicas=0",
            "--set", f"injector.url={server.url}/inject",
            "--set", f"injector.caBundle={base64.b64encode(server.pki.ca.cert_pem).decode()}",
            "--set-json", f"injector.namespaceLabels={json.dumps({SCOPE: self.scope})}",
        ]

    def server_for(self, release: str) -> RunningServer:
        if release not in self.servers:
            config_dir = self.workdir / release / "config"
            config_dir.mkdir(parents=True)
            (config_dir / "config.yaml").write_text("policy: enabled\n")
            self.servers[release] = start_server(self.workdir / release, config_dir=config_dir)
        return self.servers[release]

    def sync_config(self, release: str, configmap: str) -> None:
        """Put the release's rendered ConfigMap where its server reads it (atomically, as the kubelet)."""
        server = self.servers[release]
        assert server.config_dir is not None
        data = json.loads(
            self.plane.kubectl("get", "configmap", configmap, "-n", self.namespace, "-o", "json").stdout
        )["data"]
        for key, text in data.items():
            tmp = server.config_dir / f".{key}.tmp"
            tmp.write_text(text)
            os.replace(tmp, server.config_dir / key)

    def install(
        self, release: str, *extra: str, command: str = "install"
    ) -> subprocess.CompletedProcess[str]:
        server = self.server_for(release)
        args = [command, release, str(manifests.CHART), *self.values(server),
                "--set", "cni.enabled=false", *extra]
        if command == "install":
            args.append("--create-namespace")
        return self.run(*args)

    def labelled_namespace(self, labels: dict[str, str]) -> str:
        ns = self.plane.create_namespace(labels={SCOPE: self.scope, **labels}, prefix="hlm")
        self.namespaces.append(ns)
        return ns

    def create_pod(self, namespace: str, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        pod = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"nodeSelector": UNSCHEDULABLE,
                     "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "1d"]}]},
        }
        return self.plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod), check=check)

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return json.loads(self.plane.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def injection_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    text = (pod["metadata"].get("annotations") or {}).get("sidecar.istio.io/status")
    return json.loads(text) if text else None


@pytest.fixture(scope="module")
def helm_bed(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    bed = Helm(control_plane, Path(tmp_path_factory.mktemp("helm")))
    try:
        yield bed
    finally:
        for release in list(bed.servers):
            bed.run("uninstall", release, "--namespace", bed.namespace, "--wait", check=False)
        for ns in bed.namespaces:
            control_plane.delete_namespace(ns)
        control_plane.delete_namespace(bed.namespace)
        for server in bed.servers.values():
            server.stop()


class PodCreator(threading.Thread):
    """Creates pods one after another until stopped; counts failures and keeps their messages."""

    def __init__(self, bed: Helm, namespace: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.bed, self.namespace, self.prefix = bed, namespace, prefix
        self.stop_flag = threading.Event()
        self.created: list[str] = []
        self.failures: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop_flag.is_set():
            n += 1
            name = f"{self.prefix}-{n}"
            done = self.bed.create_pod(self.namespace, name, check=False)
            (self.created if done.returncode == 0 else self.failures).append(name if done.returncode == 0
                                                                              else done.stderr.strip())

    def finish(self) -> None:
        self.stop_flag.set()
        self.join(60)


def stop_with_the_deployment(
    bed: Helm, server: RunningServer, name: str = "mesh-injector"
) -> threading.Thread:
    """The loopback server stands in for the Deployment's pods: a started thread that stops it 2 s
    after the Deployment is gone (real pods keep serving through their termination grace period,
    30 s by default)."""

    def follow() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            args = ["get", "deployment", name, "-n", bed.namespace, "--ignore-not-found", "-o", "name"]
            if not bed.plane.kubectl(*args, check=False).stdout.strip():
                time.sleep(2.0)
                server.stop()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def test_install_upgrade_uninstall(helm_bed: Helm) -> None:
    bed = helm_bed
    bed.install("mesh")
    bed.sync_config("mesh", "mesh-injector-config")
    ns = bed.labelled_namespace({"istio-injection": "enabled"})

    # install: pods in a labelled namespace are injected, with the chart's default template.
    bed.create_pod(ns, "first")
    status = injection_status(bed.pod(ns, "first"))
    assert status is not None and "envoy" in json.dumps(status)

    # upgrade to another default template while pods are being created: no create fails.
    creator = PodCreator(bed, ns, "during-upgrade")
    creator.start()
    time.sleep(1.0)
    bed.install("mesh", "--set-json", 'defaultTemplates=["sidecar"]', command="upgrade")
    bed.sync_config("mesh", "mesh-injector-config")
    time.sleep(1.5)
    creator.finish()
    assert creator.failures == [] and len(creator.created) >= 3

    def upgraded() -> bool:
        bed.create_pod(ns, f"after-{uuid.uuid4().hex[:6]}")
        pods = json.loads(bed.plane.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
        newest = max(pods, key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["name"])
        return "sidecar" in json.dumps(injection_status(newest))

    wait_for("pods injected with the upgraded config", upgraded, timeout=30)

    # uninstall while pods are being created. Helm deletes MutatingWebhookConfigurations before
    # Deployments, so no create is sent to a server that is going away: no create may fail.
    server = bed.servers["mesh"]
    creator = PodCreator(bed, ns, "during-uninstall")
    creator.start()
    stopper = stop_with_the_deployment(bed, server)
    time.sleep(0.5)
    bed.run("uninstall", "mesh", "--namespace", bed.namespace, "--wait")
    stopper.join(60)
    assert server.process.poll() is not None, "the Deployment was never deleted"
    time.sleep(1.0)
    creator.finish()
    assert creator.failures == [] and len(creator.created) >= 3
    gone = bed.plane.kubectl("get", "mutatingwebhookconfiguration", "mesh-injector", "--ignore-not-found",
                             "-o", "name", check=False).stdout
    assert not gone.strip()
    bed.servers.pop("mesh").stop()
    bed.create_pod(ns, "after-uninstall")
    assert injection_status(bed.pod(ns, "after-uninstall")) is None


def test_canary_revision_relabel_and_tags(helm_bed: Helm, tmp_path: Path) -> None:
    bed = helm_bed
    bed.install("stable", "--set", "revision=default")
    bed.install("canary", "--set", "revision=canary")
    bed.sync_config("stable", "mesh-injector-config")
    bed.sync_config("canary", "mesh-injector-canary-config")

    # Two revisions side by side; a namespace moves from one to the other by relabelling.
    ns = bed.labelled_namespace({"istio.io/rev": "default"})
    bed.create_pod(ns, "old")
    assert injection_status(bed.pod(ns, "old"))["revision"] == "default"
    bed.plane.kubectl("label", "namespace", ns, "istio.io/rev=canary", "--overwrite")

    def on_canary() -> bool:
        name = f"new-{uuid.uuid4().hex[:6]}"
        bed.create_pod(ns, name)
        return (injection_status(bed.pod(ns, name)) or {}).get("revision") == "canary"

    wait_for("pods of the relabelled namespace injected by canary", on_canary, timeout=30)

    # The audit names the pod still running the old revision.
    kubeconfig = bed.plane.kubeconfig
    audit = subprocess.run(
        [*serve_command(), "audit", "--kubeconfig", str(kubeconfig), "--namespace", ns, "-o", "json"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert audit.returncode in (0, 1), audit.stderr
    rows = {row["pod"]: row for row in json.loads(audit.stdout)["pods"]}
    assert (rows["old"]["revision"], rows["old"]["wantedRevision"], rows["old"]["stale"]) == (
        "default", "canary", True
    )

    # A revision tag: `prod` -> canary, then moved to default in one step.
    tag_cli = [*serve_command(), "tag", "--kubeconfig", str(kubeconfig)]
    done = subprocess.run([*tag_cli, "set", "prod", "--revision", "canary"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    prod = bed.labelled_namespace({"istio.io/rev": "prod"})

    def injected_by(revision: str) -> bool:
        name = f"p-{uuid.uuid4().hex[:6]}"
        bed.create_pod(prod, name)
        return (injection_status(bed.pod(prod, name)) or {}).get("revision") == revision

    wait_for("tag prod serving canary", lambda: injected_by("canary"), timeout=30)
    refused = subprocess.run([*tag_cli, "set", "prod", "--revision", "default"], capture_output=True,
                             text=True, check=False)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    creator = PodCreator(bed, prod, "during-move")
    creator.start()
    moved = subprocess.run([*tag_cli, "set", "prod", "--revision", "default", "--overwrite"],
                           capture_output=True, text=True, check=False)
    time.sleep(1.0)
    creator.finish()
    assert moved.returncode == 0, moved.stderr
    assert creator.failures == []
    for name in creator.created:  # every pod got exactly one revision's proxy
        status = injection_status(bed.pod(prod, name))
        assert status is not None and status["revision"] in ("canary", "default")
    wait_for("tag prod moved to default", lambda: injected_by("default"), timeout=30)
    listed = subprocess.run([*tag_cli, "list"], capture_output=True, text=True, check=True).stdout
    assert any(line.split()[:3] == ["prod", "default", prod] for line in listed.splitlines())
    blocked = subprocess.run([*tag_cli, "remove", "prod"], capture_output=True, text=True, check=False)
    assert blocked.returncode == 1 and prod in blocked.stderr
    subprocess.run([*tag_cli, "remove", "prod", "--force"], capture_output=True, text=True, check=True)
    rendered = bed.run("get", "manifest", "canary", "--namespace", bed.namespace).stdout
    assert "mesh-injector-canary" in yaml.safe_dump(list(yaml.safe_load_all(rendered)))


def _ca_bundles(plane: ControlPlane, name: str) -> set[str]:
    """The caBundle of each webhook of a configuration ("" where none is set)."""
    obj = json.loads(plane.kubectl("get", "mutatingwebhookconfiguration", name, "-o", "json").stdout)
    return {hook["clientConfig"].get("caBundle", "") for hook in obj["webhooks"]}


def test_certs_sets_the_ca_bundle_of_the_revision_tags_too(helm_bed: Helm, tmp_path: Path) -> None:
    """The chart's own certs-init command line, run as the injector's service account with the
    chart's RBAC, puts the CA into the revision's configuration and into each tag's: without
    the tags' caBundle the API server could not call the webhook for tagged namespaces."""
    bed = helm_bed
    revision, tag = f"c{bed.scope[:6]}", f"t{bed.scope[:6]}"
    name, tag_config = f"mesh-injector-{revision}", f"{manifests.TAG_PREFIX}{tag}"
    bed.run("install", "certs", str(manifests.CHART), "--namespace", bed.namespace, "--create-namespace",
            "--set", f"revision={revision}", "--set-json", f"revisionTags={json.dumps([tag])}",
            "--set", "injector.replicas=0", "--set", "injector.url=https://127.0.0.1:1/inject",
            "--set-json", f"injector.namespaceLabels={json.dumps({SCOPE: bed.scope})}",
            "--set", "cni.enabled=false")
    try:
        assert _ca_bundles(bed.plane, name) == {""} and _ca_bundles(bed.plane, tag_config) == {""}
        manifest = list(yaml.safe_load_all(bed.run("get", "manifest", "certs", "-n", bed.namespace).stdout))
        deployment = next(o for o in manifest if o and o["kind"] == "Deployment")
        init = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"]
                    if c["name"] == "certs-init")
        args = list(init["args"])
        args[args.index("--write-dir") + 1] = str(tmp_path / "tls")
        token = bed.plane.service_account_token(bed.namespace, name)
        kubeconfig = write_kubeconfig(tmp_path / "injector.kubeconfig", bed.plane, token)
        done = subprocess.run(
            [*serve_command(), *args, "--kubeconfig", str(kubeconfig)], capture_output=True, text=True,
            check=False, cwd=REPO, env={**os.environ, "POD_NAMESPACE": bed.namespace}, timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        secret = json.loads(bed.plane.kubectl("get", "secret", f"{name}-tls", "-n", bed.namespace,
                                              "-o", "json").stdout)
        bundle = secret["data"]["ca-bundle.crt"]
        assert _ca_bundles(bed.plane, name) == {bundle}
        assert _ca_bundles(bed.plane, tag_config) == {bundle}
    finally:
        bed.run("uninstall", "certs", "--namespace", bed.namespace, "--wait", check=False)
