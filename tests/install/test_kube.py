"""The agent against the real kube-apiserver on loopback, with exactly the RBAC the manifests grant.

Nodes here are API objects without a kubelet (their names are unique per test): the agent only
reads and patches them, and pods bound to them stay as the test sets their status.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni.install.agent import AgentConfig
from cni.kube import KubeApi
from cni.repair.repair import REPAIR_LABEL, repair_pod
from cni.repair.taint import NOT_READY_TAINT_KEY
from tests.conftest import REPO
from tests.install.conftest import running_agent, wait_for, write_shape

RBAC = Path(__file__).with_name("rbac.yaml")
MANIFEST_RBAC = REPO / "manifests" / "base" / "cni-rbac.yaml"
STATUS = json.dumps({"initContainers": ["istio-validation"], "containers": ["istio-proxy"], "volumes": []})


def _cluster_role_rules(path: Path) -> list[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "ClusterRole":
            return doc["rules"]
    raise AssertionError(f"no ClusterRole in {path}")


def test_manifests_grant_exactly_what_the_agent_is_tested_with() -> None:
    def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {
            (group, resource, verb)
            for rule in rules
            for group in rule.get("apiGroups", [])
            for resource in rule.get("resources", [])
            for verb in rule.get("verbs", [])
        }

    assert grants(_cluster_role_rules(MANIFEST_RBAC)) == grants(_cluster_role_rules(RBAC))


class TokenDir:
    """A projected service-account volume as the kubelet writes it: ``token -> ..data/token``,
    rotated by swapping the ``..data`` symlink (so the token file itself is never written)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.token = root / "token"
        self.token.symlink_to("..data/token")
        self._n = 0

    def write(self, token: str) -> None:
        self._n += 1
        version = self.root / f"..{self._n}"
        version.mkdir()
        (version / "token").write_text(token)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.rename(tmp, self.root / "..data")


@dataclass
class Identity:
    """A namespace and a service account bound to the tested ClusterRole rules."""

    plane: Any
    namespace: str
    account: str
    issued: int = 0

    def token(self) -> str:
        """A fresh bound token (TokenRequest), as the kubelet's projected volume gets. Each has
        another lifetime: two requests in the same second would otherwise be byte-identical."""
        self.issued += 1
        spec = {"expirationSeconds": 3600 + self.issued}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        request = urllib.request.Request(
            f"{self.plane.server}/api/v1/namespaces/{self.namespace}/serviceaccounts/{self.account}/token",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.plane.token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(
            request, context=ssl.create_default_context(cafile=str(self.plane.ca_file))
        ) as r:
            return json.loads(r.read())["status"]["token"]

    def apply(self, obj: dict[str, Any]) -> None:
        self.plane.kubectl("create", "-f", "-", input=json.dumps(obj))

    def get(self, path: str) -> dict[str, Any]:
        return self.plane.get_json(path)


@contextlib.contextmanager
def bound_identity(plane: Any) -> Iterator[Identity]:
    """A namespace + service account on ``plane`` with the tested ClusterRole bound."""
    namespace = plane.create_namespace(prefix="mesh-cni-install")
    account = "mesh-cni"
    role = f"mesh-cni-test-{namespace}"
    plane.kubectl("create", "serviceaccount", account, "-n", namespace)
    rules = _cluster_role_rules(RBAC)
    ident = Identity(plane, namespace, account)
    ident.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                 "metadata": {"name": role}, "rules": rules})  # fmt: skip
    ident.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    })  # fmt: skip
    try:
        yield ident
    finally:
        plane.kubectl("delete", "clusterrolebinding,clusterrole", role, "--ignore-not-found", check=False)
        plane.delete_namespace(namespace)


@pytest.fixture(scope="module")
def identity(control_plane: Any) -> Iterator[Identity]:
    with bound_identity(control_plane) as ident:
        yield ident


def _node(ident: Identity, name: str) -> str:
    ident.apply({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"taints": [
            {"key": NOT_READY_TAINT_KEY, "effect": "NoSchedule"},
            {"key": "example.com/keep-me", "value": "yes", "effect": "NoSchedule"},
        ]},
    })  # fmt: skip
    return name


@pytest.fixture
def nodes(identity: Identity) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:6]
    own, other = _node(identity, f"mesh-own-{suffix}"), _node(identity, f"mesh-other-{suffix}")
    try:
        yield own, other
    finally:
        identity.plane.kubectl(
            "delete", "node", own, other, "--ignore-not-found", "--wait=false", check=False
        )


def _taint_keys(ident: Identity, node: str) -> list[str]:
    return [t["key"] for t in ident.get(f"/api/v1/nodes/{node}")["spec"].get("taints", [])]


def _agent_config(
    host: AgentConfig, ident: Identity, tokens: TokenDir, node: str | None, **changes: Any
) -> dict:
    return {
        "api_server": ident.plane.server,
        "token_file": tokens.token,
        "ca_file": Path(ident.plane.ca_file),
        "node_name": node,
        "health_port": 0,
        **changes,
    }


def _tokens(tmp_path: Path, ident: Identity) -> TokenDir:
    tokens = TokenDir(tmp_path / "serviceaccount")
    tokens.write(ident.token())
    return tokens


def test_kubeconfig_is_private_usable_and_follows_token_rotation(
    identity: Identity, host: AgentConfig, tmp_path: Path
) -> None:
    def reader() -> KubeApi:
        """The plugin's own client from the kubeconfig (what cni.plugin.api_annotations builds)."""
        return KubeApi.from_kubeconfig(str(host.kubeconfig))

    identity.apply(_pod(identity, "reader-target", node=None, injected=False))
    tokens = _tokens(tmp_path, identity)
    write_shape(host, "bridge-conflist", bystanders=False)
    with running_agent(host, **_agent_config(host, identity, tokens, None, remove_taint=False)):
        wait_for(lambda: host.kubeconfig.exists(), timeout=10)
        assert host.kubeconfig.stat().st_mode & 0o777 == 0o600
        assert not host.kubeconfig.is_relative_to(host.cni_net_dir)
        first = tokens.token.read_text()
        assert reader().token == first
        pod = reader().get_pod(identity.namespace, "reader-target")
        assert pod["metadata"]["name"] == "reader-target"

        second = identity.token()
        assert second != first
        tokens.write(second)  # kubelet-style: ..data symlink swap
        elapsed = wait_for(lambda: reader().token == second, timeout=10)
        assert host.kubeconfig.stat().st_mode & 0o777 == 0o600
        pod = reader().get_pod(identity.namespace, "reader-target")
        assert pod["metadata"]["uid"]
    print(f"kubeconfig followed the rotated token in {elapsed * 1000:.0f} ms")


def test_taint_removed_from_own_node_only_once_install_is_valid(
    identity: Identity, nodes: tuple[str, str], host: AgentConfig, tmp_path: Path
) -> None:
    own, other = nodes
    tokens = _tokens(tmp_path, identity)
    with running_agent(host, **_agent_config(host, identity, tokens, own)) as agent:
        wait_for(lambda: "no valid CNI network config" in agent.status.reason, timeout=10)
        time.sleep(1.5)  # the taint loop is awake (1 s tick): it must not act while not valid
        assert NOT_READY_TAINT_KEY in _taint_keys(identity, own)
        write_shape(host, "calico-conflist")
        wait_for(lambda: NOT_READY_TAINT_KEY not in _taint_keys(identity, own), timeout=15)
        wait_for(lambda: agent.status.counters["mesh_cni_taint_removed_total"] == 1, timeout=5)
    assert "example.com/keep-me" in _taint_keys(identity, own), "other taints of the node stay"
    assert NOT_READY_TAINT_KEY in _taint_keys(identity, other), "another node's taint is not ours to remove"


def _pod(ident: Identity, name: str, *, node: str | None, injected: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "initContainers": [{"name": "istio-validation", "image": "mesh-injector/mesh-cni:0.1.0",
                            "command": ["mesh-cni", "validate"]}],
        "containers": [{"name": "app", "image": "busybox"}],
    }  # fmt: skip
    if node:
        spec["nodeName"] = node
    meta: dict[str, Any] = {"name": name, "namespace": ident.namespace}
    if injected:
        meta["annotations"] = {"sidecar.istio.io/status": STATUS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _set_validation_exit(ident: Identity, name: str, code: int) -> None:
    """What the kubelet reports after the validation init container ran (admin writes status)."""
    from kubernetes import client

    terminated = {"exitCode": code, "reason": "Error" if code else "Completed"}
    failed = code != 0
    container = {
        "name": "istio-validation",
        "ready": not failed,
        "restartCount": 1,
        "image": "x",
        "imageID": "",
        "state": {"waiting": {"reason": "CrashLoopBackOff"}} if failed else {"terminated": terminated},
        "lastState": {"terminated": terminated} if failed else {},
    }
    status = {"status": {"initContainerStatuses": [container]}}
    client.CoreV1Api(ident.plane.api_client()).patch_namespaced_pod_status(name, ident.namespace, status)


def _labels(ident: Identity, name: str) -> dict[str, str]:
    return ident.get(f"/api/v1/namespaces/{ident.namespace}/pods/{name}")["metadata"].get("labels") or {}


def _events_for(ident: Identity, uid: str) -> list[dict[str, Any]]:
    events = ident.get(f"/api/v1/namespaces/{ident.namespace}/events")["items"]
    return [
        e
        for e in events
        if e["involvedObject"].get("uid") == uid and (e.get("source") or {}).get("component") == "mesh-cni"
    ]


def test_repair_labels_only_broken_injected_pods_of_its_node(
    identity: Identity, nodes: tuple[str, str], host: AgentConfig, tmp_path: Path
) -> None:
    own, other = nodes
    tag = uuid.uuid4().hex[:5]
    cases = {
        f"broken-{tag}": (own, True, 126),
        f"healthy-{tag}": (own, True, 0),
        f"uninjected-{tag}": (own, False, 126),
        f"elsewhere-{tag}": (other, True, 126),
    }
    for name, (node, injected, code) in cases.items():
        identity.apply(_pod(identity, name, node=node, injected=injected))
        _set_validation_exit(identity, name, code)
    tokens = _tokens(tmp_path, identity)
    broken = f"broken-{tag}"
    write_shape(host, "bridge-conflist")  # repair acts only while the install is valid
    with running_agent(host, **_agent_config(host, identity, tokens, own, repair_mode="label")) as agent:
        wait_for(lambda: _labels(identity, broken).get(REPAIR_LABEL) == "true", timeout=20)
        uid = identity.get(f"/api/v1/namespaces/{identity.namespace}/pods/{broken}")["metadata"]["uid"]
        events = _events_for(identity, uid)
        assert [e["reason"] for e in events] == ["UnmeshedPodRepaired"]
        assert "istio-validation exited 126" in events[0]["message"] and events[0]["type"] == "Warning"
        # A pod that breaks later is caught by the watch, not only by the first list.
        late = f"late-{tag}"
        identity.apply(_pod(identity, late, node=own))
        _set_validation_exit(identity, late, 126)
        wait_for(lambda: _labels(identity, late).get(REPAIR_LABEL) == "true", timeout=20)
        # (counted after the Event is posted, a moment after the label shows)
        wait_for(lambda: agent.status.counters["mesh_cni_repair_pods_total|label"] == 2, timeout=10)
    for name in cases:
        if name != broken:
            assert REPAIR_LABEL not in _labels(identity, name), f"{name} must be left alone"


def test_repair_preconditions_protect_a_pod_that_changed(
    identity: Identity, nodes: tuple[str, str], tmp_path: Path
) -> None:
    own, _ = nodes
    name = f"stale-{uuid.uuid4().hex[:5]}"
    identity.apply(_pod(identity, name, node=own))
    _set_validation_exit(identity, name, 126)
    tokens = _tokens(tmp_path, identity)
    api = KubeApi(identity.plane.server, str(tokens.token), str(identity.plane.ca_file))
    path = f"/api/v1/namespaces/{identity.namespace}/pods/{name}"
    stale = identity.get(path)
    identity.plane.kubectl("label", "pod", name, "-n", identity.namespace, "touched=yes")

    assert repair_pod(api, stale, mode="delete", node=own) is None
    assert repair_pod(api, stale, mode="label", node=own) is None
    after = identity.get(path)
    assert not after["metadata"].get("deletionTimestamp") and REPAIR_LABEL not in after["metadata"]["labels"]
    assert _events_for(identity, after["metadata"]["uid"]) == []

    assert repair_pod(api, after, mode="delete", node=own) == "delete"
    try:
        gone = identity.get(path)["metadata"].get("deletionTimestamp") is not None
    except urllib.error.HTTPError as err:
        gone = err.code == 404
    assert gone
    assert ["deleted it" in e["message"] for e in _events_for(identity, after["metadata"]["uid"])] == [True]


@pytest.mark.node
def test_real_node_unmeshed_pod_is_replaced_by_a_meshed_one(
    identity: Identity, node: Any, tmp_path: Path
) -> None:
    """End to end on kubelet + containerd: a Deployment's pod starts before the plugin is
    installed, its validation init container fails; the agent installs, then deletes that pod
    (repair=delete) and the replacement starts through our chain and passes validation."""
    from cni.install.agent import AgentConfig
    from cni.install.conflist import EntryOptions
    from tests.install.conftest import snapshot
    from tests.testbed import images

    node.import_image(images.mesh_cni_image())
    before = snapshot(node.cni_conf_dir, node.cni_bin_dir)
    ns, app = identity.namespace, f"meshed-{uuid.uuid4().hex[:5]}"
    template = _pod(identity, app, node=None)
    template["spec"]["initContainers"][0].update(
        image=images.MESH_CNI_IMAGE,
        imagePullPolicy="Never",
        command=["/usr/local/bin/mesh-cni", "validate", "--timeout", "2"],
        securityContext={"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True},
    )
    template["spec"]["containers"][0].update(
        image=images.BUSYBOX_IMAGE, imagePullPolicy="Never", command=["sleep", "3600"]
    )
    template["spec"]["terminationGracePeriodSeconds"] = 1
    template = {
        "metadata": {"labels": {"app": app}, "annotations": template["metadata"]["annotations"]},
        "spec": template["spec"],
    }
    identity.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app, "namespace": ns},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}}, "template": template},
    })  # fmt: skip

    def pods() -> list[dict[str, Any]]:
        return identity.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{app}")["items"]

    def validation(pod: dict[str, Any]) -> dict[str, Any]:
        for status in pod.get("status", {}).get("initContainerStatuses") or []:
            if status["name"] == "istio-validation":
                return status
        return {}

    def failed(pod: dict[str, Any]) -> bool:
        status = validation(pod)
        return any(
            (status.get(k) or {}).get("terminated", {}).get("exitCode", 0) != 0
            for k in ("state", "lastState")
        )

    tokens = _tokens(tmp_path, identity)
    state = tmp_path / "state"
    config = AgentConfig(
        cni_bin_dir=node.cni_bin_dir, cni_net_dir=node.cni_conf_dir, runtime_dir=tmp_path / "opt-mesh-cni",
        state_dir=state, kubeconfig=state / "kubeconfig",
        entry=EntryOptions(kubeconfig=str(state / "kubeconfig"), log_file=str(tmp_path / "plugin.log"),
                           log_level="debug"),
        api_server=identity.plane.server, token_file=tokens.token, ca_file=Path(identity.plane.ca_file),
        node_name=node.name, repair_mode="delete", health_port=0,
    )  # fmt: skip
    agent = None
    try:
        wait_for(lambda: any(failed(p) for p in pods()), timeout=90, interval=0.5)
        unmeshed = next(p for p in pods() if failed(p))["metadata"]["uid"]
        with running_agent(config) as agent:

            def meshed() -> bool:
                return any(
                    p["metadata"]["uid"] != unmeshed
                    and p["status"].get("phase") == "Running"
                    and validation(p).get("state", {}).get("terminated", {}).get("exitCode") == 0
                    for p in pods()
                )

            wait_for(meshed, timeout=120, interval=0.5)
            assert [e["reason"] for e in _events_for(identity, unmeshed)] == ["UnmeshedPodRepaired"]
            assert "redirect programmed" in (tmp_path / "plugin.log").read_text()
    finally:
        identity.plane.kubectl("delete", "deployment", app, "-n", ns, "--wait=false", check=False)
        for pod in pods():
            identity.plane.kubectl(
                "delete", "pod", pod["metadata"]["name"], "-n", ns, "--grace-period=0", "--force", check=False
            )
        if agent is not None:
            agent.uninstall()
        assert snapshot(node.cni_conf_dir, node.cni_bin_dir) == before


# --- fault: the API server restarting under the agent's loops (issue 11) -------------------------


@pytest.fixture
def own_plane(tmp_path: Path) -> Iterator[Any]:
    """A control plane of this test's own: restarting the session's would disturb other tests."""
    from tests.conftest import require
    from tests.testbed.controlplane import ControlPlane, missing_binaries

    missing = missing_binaries()
    require(not missing, "needs the Kubernetes binaries: " + ", ".join(missing))
    plane = ControlPlane.start(tmp_path / "control-plane")
    try:
        yield plane
    finally:
        plane.stop()


def _max_attempts(seconds: float, first_s: float) -> int:
    """Most calls one loop may make in ``seconds`` of outage with the agent's backoff (waits
    >= 0.8 * first_s * 2**k): one in flight when the outage starts, then one per wait."""
    return 2 + int(math.log2(seconds / (0.8 * first_s) + 1))


def test_loops_recover_by_themselves_after_the_api_server_restarts(
    own_plane: Any, host: AgentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cni.repair import WorkerConfig

    calls: list[tuple[str, float]] = []  # (agent thread, when): every request and watch it makes
    request, watch = KubeApi.request, KubeApi.watch

    def counted_request(self: KubeApi, *args: Any, **kwargs: Any) -> Any:
        calls.append((threading.current_thread().name, time.monotonic()))
        return request(self, *args, **kwargs)

    def counted_watch(self: KubeApi, *args: Any, **kwargs: Any) -> Any:
        calls.append((threading.current_thread().name, time.monotonic()))
        return watch(self, *args, **kwargs)

    monkeypatch.setattr(KubeApi, "request", counted_request)
    monkeypatch.setattr(KubeApi, "watch", counted_watch)
    first_s = WorkerConfig(node="x").retry_s
    down_s = 8.0
    with bound_identity(own_plane) as ident:
        own = _node(ident, f"mesh-restart-{uuid.uuid4().hex[:6]}")
        before, after = "broken-before", "broken-after"
        ident.apply(_pod(ident, before, node=own))
        _set_validation_exit(ident, before, 126)
        tokens = _tokens(tmp_path, ident)
        rotated = ident.token()  # issued now: TokenRequest needs the API server
        write_shape(host, "bridge-conflist")
        config = _agent_config(host, ident, tokens, own, repair_mode="label", taint_recheck_s=2.0)
        with running_agent(host, **config) as agent:
            wait_for(lambda: NOT_READY_TAINT_KEY not in _taint_keys(ident, own), timeout=30, interval=0.2)
            wait_for(lambda: _labels(ident, before).get(REPAIR_LABEL) == "true", timeout=30, interval=0.2)

            down_at, cpu_at, seen = time.monotonic(), time.process_time(), len(calls)
            # SIGTERM: it refuses new connections at once, holds open watches until it exits
            # (this build hangs in shutdown until the test bed's SIGKILL, APISERVER_STOP_S later).
            own_plane.stop_apiserver()
            gone_at = time.monotonic()
            tokens.write(rotated)  # the kubelet rotates the token while the API server is away
            wait_for(lambda: KubeApi.from_kubeconfig(str(host.kubeconfig)).token == rotated, timeout=10)
            time.sleep(max(0.0, down_s - (time.monotonic() - gone_at)))  # down: the watch is gone too
            outage, cpu = time.monotonic() - down_at, time.process_time() - cpu_at
            during = [name for name, _ in calls[seen:]]
            own_plane.restart_apiserver()

            # After the restart: the node is tainted again (re-registered) and another pod breaks.
            own_plane.kubectl("taint", "node", own, f"{NOT_READY_TAINT_KEY}:NoSchedule")
            ident.apply(_pod(ident, after, node=own))
            _set_validation_exit(ident, after, 126)
            # Up to one capped backoff (max_retry_s, +20%) after the restart, plus the calls.
            recovered = wait_for(lambda: NOT_READY_TAINT_KEY not in _taint_keys(ident, own),
                                 timeout=90, interval=0.2)
            wait_for(lambda: _labels(ident, after).get(REPAIR_LABEL) == "true", timeout=90, interval=0.2)
            wait_for(lambda: agent.status.counters["mesh_cni_repair_pods_total|label"] == 2, timeout=10)
            assert agent.status.counters["mesh_cni_taint_removed_total"] == 2
            # The plugin's client, from the kubeconfig the agent rewrote during the outage.
            plugin_view = KubeApi.from_kubeconfig(str(host.kubeconfig)).get_pod(ident.namespace, after)
            assert plugin_view["metadata"]["name"] == after
        assert "example.com/keep-me" in _taint_keys(ident, own)
    print(f"outage {outage:.1f} s: {during.count('taint')} taint + {during.count('repair')} repair calls, "
          f"{cpu * 1000:.0f} ms CPU; taint gone {recovered:.1f} s after the restart")
    bound = _max_attempts(outage, first_s)
    assert during.count("taint") <= bound and during.count("repair") <= bound, (
        f"{during} in {outage:.1f} s: more than the backoff allows ({bound} per loop)")
    assert during.count("taint") >= 1 and during.count("repair") >= 1, "the loops kept trying"
