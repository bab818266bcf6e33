"""The Helm chart as users install it: real Helm (built from its Go module by
scripts/setup.d/70-helm.sh), lint, strict schemas for every Kubernetes we support, revisions and
revision tags, and the kustomize base generated from it.

The tests against the API server are in test_helm_apiserver.py.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from injector import manifests
from injector.config import ConfigModel, compile_config
from injector.selectors import WebhookSelector, evaluate_selection
from tests.conftest import REPO, require
from tests.deploy.manifests import CRD_KINDS
from tests.deploy.test_manifests import SUPPORTED_VERSIONS

CHART = manifests.CHART


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


#: Every Kubernetes minor we support that kubernetes-validate has a schema for (oldest..newest).
EVERY_SUPPORTED_VERSION = tuple(
    sorted(
        {v for v in kubernetes_validate.utils.all_versions()
         if _minor(SUPPORTED_VERSIONS[0]) <= _minor(v) <= _minor(SUPPORTED_VERSIONS[-1])},
        key=_minor,
    )
)

#: Value sets a user would install with: each must lint, render and validate.
VALUE_SETS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "canary": ("--set", "revision=canary", "--set", "cni.enabled=false"),
    "tags": ("--set", "revision=canary", "--set-json", 'revisionTags=["prod","default"]'),
    "cert-manager": ("--set", "certificates.source=cert-manager", "--set-json", 'revisionTags=["prod"]'),
    "istio": (
        "--set-json", 'defaultTemplates=["sidecar"]', "--set", "captureMode=init",
        "--set", "nativeSidecars=false", "--set", "cni.enabled=false",
    ),
    "k3s": (
        "--set", "cni.binDir=/var/lib/rancher/k3s/data/current/bin",
        "--set", "cni.netDir=/var/lib/rancher/k3s/agent/etc/cni/net.d", "--set", "cni.repair=delete",
        "--set", "injector.replicas=3", "--set", "injector.failurePolicy=Ignore",
        "--set", "createNamespace=true",
    ),
}


def helm() -> str:
    try:
        return manifests.helm_binary()
    except SystemExit as exc:
        require(False, str(exc))
        raise


def render(*args: str, release: str = "mesh", namespace: str = "mesh-system") -> list[dict[str, Any]]:
    helm()
    text = manifests.render_chart(*args, release=release, namespace=namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} among {sorted((o['kind'], o['metadata']['name']) for o in objs)}")


def config_of(objs: list[dict[str, Any]], name: str = "mesh-injector") -> Any:
    """The injector config the chart rendered, compiled as the server would."""
    text = find(objs, "ConfigMap", f"{name}-config")["data"]["config.yaml"]
    return compile_config(ConfigModel.model_validate(yaml.safe_load(text)))


def normalized(webhook_config: dict[str, Any]) -> dict[str, Any]:
    """Selector value lists as sets: the chart lists the release namespace first."""
    out = yaml.safe_load(yaml.safe_dump(webhook_config))
    for hook in out["webhooks"]:
        for expr in hook["namespaceSelector"].get("matchExpressions", []):
            if "values" in expr:
                expr["values"] = sorted(expr["values"])
    return out


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_chart_lints_strictly(values: str) -> None:
    done = subprocess.run(
        [helm(), "lint", "--strict", str(CHART), "--namespace", "mesh-system", *VALUE_SETS[values]],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    ("values", "version"),
    # The two installs a user makes (a revision, a canary beside it) on every supported minor;
    # each other value set on the oldest and the newest.
    [(values, v) for values in ("defaults", "canary") for v in EVERY_SUPPORTED_VERSION]
    + [(values, v) for values in sorted(set(VALUE_SETS) - {"defaults", "canary"})
       for v in SUPPORTED_VERSIONS],
)
def test_every_rendered_object_validates_strictly(values: str, version: str) -> None:
    checked = 0
    for obj in render(*VALUE_SETS[values]):
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # cert-manager's CRDs: no schema here (test_cert_manager_source checks them)
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_object_is_labelled_with_its_part_and_name(values: str) -> None:
    """`kubectl get -l app.kubernetes.io/part-of=mesh-injector` finds every object a release made,
    and `-l app.kubernetes.io/name=<injector or mesh-cni>` each half (webhook configurations too)."""
    objs = render(*VALUE_SETS[values])
    injector = next(o["metadata"]["name"] for o in objs if o["kind"] == "Deployment")
    unlabelled = []
    for obj in objs:
        labels = obj["metadata"].get("labels") or {}
        if labels.get("app.kubernetes.io/part-of") != "mesh-injector" or labels.get(
            "app.kubernetes.io/name"
        ) not in (injector, "mesh-cni"):
            unlabelled.append(f"{obj['kind']}/{obj['metadata']['name']}: {labels}")
    assert not unlabelled
    webhooks = [o for o in objs if o["kind"] == "MutatingWebhookConfiguration"]
    assert webhooks and {o["metadata"]["labels"]["app.kubernetes.io/name"] for o in webhooks} == {injector}
    base = yaml.safe_load(manifests.CHECKED_IN.read_text())
    assert base["metadata"]["labels"]["app.kubernetes.io/name"] == "mesh-injector"


def test_every_supported_minor_is_validated() -> None:
    oldest, newest = _minor(SUPPORTED_VERSIONS[0]), _minor(SUPPORTED_VERSIONS[-1])
    assert len(EVERY_SUPPORTED_VERSION) == newest[1] - oldest[1] + 1


def test_kustomize_base_is_generated_from_the_chart() -> None:
    """One source of truth: manifests/base is `helm template` of the chart, checked in."""
    helm()
    # (`python -m injector.manifests --check`, the same check as a command, runs in test_manifests.)
    assert manifests.stale_files() == [], "run: python -m injector.manifests --write"


def test_drift_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit to the base (not the chart) is reported stale."""
    helm()
    base = tmp_path / "base"
    base.mkdir()
    for path in manifests.BASE.glob("*.yaml"):
        (base / path.name).write_text(path.read_text())
    edited = base / "injector.yaml"
    edited.write_text(edited.read_text().replace("replicas: 2", "replicas: 3"))
    monkeypatch.setattr(manifests, "BASE", base)
    monkeypatch.setattr(manifests, "BASE_VALUES", base / "values.yaml")
    stale = manifests.stale_files()
    assert base / "injector.yaml" in stale and len(stale) == 1


@pytest.mark.parametrize("revision", ["default", "canary"])
def test_chart_webhook_is_the_selector_definition(revision: str) -> None:
    """The webhook configuration Helm renders equals the one built directly from injector.selectors."""
    name = manifests.NAME if revision == "default" else f"{manifests.NAME}-{revision}"
    objs = render("--set", f"revision={revision}", release=f"r-{revision}", namespace="mesh-x")
    rendered = find(objs, "MutatingWebhookConfiguration", name)
    direct = manifests.webhook_configuration(
        name=name, namespace="mesh-x", service=name, revision=revision
    )
    assert normalized(rendered) == normalized(direct)


def test_tags_select_their_namespaces_and_reach_the_revision() -> None:
    objs = render("--set", "revision=canary", "--set-json", 'revisionTags=["prod"]')
    tag = find(objs, "MutatingWebhookConfiguration", "mesh-injector-revision-tag-prod")
    assert tag["metadata"]["labels"]["istio.io/tag"] == "prod"
    assert tag["metadata"]["labels"]["istio.io/rev"] == "canary"
    assert {h["clientConfig"]["service"]["name"] for h in tag["webhooks"]} == {"mesh-injector-canary"}
    assert normalized(tag) == normalized(
        manifests.webhook_configuration(revision="canary", tag="prod", service="mesh-injector-canary")
    )
    selectors = [
        WebhookSelector(h["name"], h["namespaceSelector"], h["objectSelector"]) for h in tag["webhooks"]
    ]

    def sent(ns_labels: dict[str, str], name: str = "shop") -> bool:
        found = evaluate_selection(selectors, namespace=name, namespace_labels=ns_labels, pod_labels={})
        return found.selected

    assert sent({"istio.io/rev": "prod"})
    assert not sent({"istio.io/rev": "canary"})  # the revision's own configuration sends those
    assert not sent({"istio-injection": "enabled"})  # only a tag named default takes these
    assert not sent({"istio.io/rev": "prod"}, name="kube-system")
    # The certificate sidecar keeps the tag's caBundle current, and may patch exactly that object.
    pod = find(objs, "Deployment", "mesh-injector-canary")["spec"]["template"]["spec"]
    certs = next(c for c in pod["containers"] if c["name"] == "certs")
    assert certs["args"][-2:] == ["--tag-webhook-config", "mesh-injector-revision-tag-prod"]
    role = find(objs, "ClusterRole", "mesh-injector-canary-webhook-ca")
    assert role["rules"][0]["resourceNames"] == ["mesh-injector-canary", "mesh-injector-revision-tag-prod"]


def test_default_tag_takes_the_legacy_selectors() -> None:
    objs = render("--set", "revision=canary", "--set-json", 'revisionTags=["default"]')
    tag = find(objs, "MutatingWebhookConfiguration", "mesh-injector-revision-tag-default")
    selectors = [
        WebhookSelector(h["name"], h["namespaceSelector"], h["objectSelector"]) for h in tag["webhooks"]
    ]
    assert evaluate_selection(
        selectors, namespace="shop", namespace_labels={"istio-injection": "enabled"}, pod_labels={}
    ).selected


def test_two_revisions_install_side_by_side_without_clashing() -> None:
    default = render(release="mesh")
    canary = render("--set", "revision=canary", "--set", "cni.enabled=false", release="mesh-canary")

    def names(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in objs}

    assert not names(default) & names(canary)
    kinds = {o["kind"] for o in canary}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "MutatingWebhookConfiguration"}
    assert "DaemonSet" not in {o["kind"] for o in canary}  # the node agent is installed once
    assert config_of(canary, "mesh-injector-canary").revision == "canary"
    selector = find(canary, "Deployment", "mesh-injector-canary")["spec"]["selector"]["matchLabels"]
    assert find(canary, "Service", "mesh-injector-canary")["spec"]["selector"] == selector
    assert selector != find(default, "Deployment", "mesh-injector")["spec"]["selector"]["matchLabels"]


def test_values_reach_the_injector_config() -> None:
    objs = render(
        "--set-json", 'defaultTemplates=["sidecar"]', "--set", "captureMode=init",
        "--set", "nativeSidecars=false",
        "--set-json", 'config={"values":{"proxy":{"holdApplicationUntilProxyStarts":true}}}',
    )
    config = config_of(objs)
    proxy = config.model.values.proxy
    assert config.model.default_templates == ["sidecar"]
    assert (proxy.capture, proxy.native_sidecars, proxy.hold_application_until_proxy_starts) == (
        "init", "false", True
    )
    assert proxy.cni_image == "ghcr.io/mesh-injector/mesh-cni:0.1.0"


def test_cni_directories_and_repair_reach_the_daemonset() -> None:
    objs = render(*VALUE_SETS["k3s"])
    pod = find(objs, "DaemonSet", "mesh-cni-node")["spec"]["template"]["spec"]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert paths["cni-bin-dir"] == "/var/lib/rancher/k3s/data/current/bin"
    assert paths["cni-net-dir"] == "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MESH_CNI_REPAIR"] == "delete"
    hooks = find(objs, "MutatingWebhookConfiguration", "mesh-injector")["webhooks"]
    assert {h["failurePolicy"] for h in hooks} == {"Ignore"}
    assert find(objs, "Deployment", "mesh-injector")["spec"]["replicas"] == 3


def test_cert_manager_source() -> None:
    objs = render(*VALUE_SETS["cert-manager"])
    serving = find(objs, "Certificate", "mesh-injector-serving")
    assert serving["spec"]["secretName"] == "mesh-injector-tls"
    assert "mesh-injector.mesh-system.svc" in serving["spec"]["dnsNames"]
    issuer = find(objs, "Issuer", serving["spec"]["issuerRef"]["name"])
    ca_cert = find(objs, "Certificate", "mesh-injector-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    for name in ("mesh-injector", "mesh-injector-revision-tag-prod"):
        hook = find(objs, "MutatingWebhookConfiguration", name)
        inject_from = hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert inject_from == "mesh-system/mesh-injector-serving"
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("Secret", "mesh-injector-tls") not in kinds  # cert-manager owns it
    assert ("Role", "mesh-injector-certs") not in kinds
    pod = find(objs, "Deployment", "mesh-injector")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["injector"] and not pod.get("initContainers")
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "mesh-injector-tls"


def test_url_and_ca_bundle_for_an_out_of_cluster_server() -> None:
    bundle = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    objs = render(
        "--set", "injector.url=https://127.0.0.1:9443/inject", "--set", f"injector.caBundle={bundle}",
        "--set-json", 'injector.namespaceLabels={"team":"a"}',
    )
    for hook in find(objs, "MutatingWebhookConfiguration", "mesh-injector")["webhooks"]:
        assert hook["clientConfig"] == {"url": "https://127.0.0.1:9443/inject", "caBundle": bundle}
        assert hook["namespaceSelector"]["matchLabels"] == {"team": "a"}


def _workers_on_a_big_node(
    objs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> int:
    """How many workers the rendered injector starts on a 64-core node: its --workers, else the
    server's own rule applied to the cgroup quota the kubelet derives from the CPU limit."""
    from injector.commands.serve import cpu_limit

    container = find(objs, "Deployment", "mesh-injector")["spec"]["template"]["spec"]["containers"][0]
    flags = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--workers=")]
    if flags:
        return int(flags[0])
    limit = str((container["resources"].get("limits") or {}).get("cpu", "max"))
    period = 100_000
    quota = "max" if limit == "max" else str(
        int(limit[:-1]) * period // 1000 if limit.endswith("m") else int(float(limit) * period)
    )
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "cpu.max").write_text(f"{quota} {period}\n")
    (tmp_path / "cgroup").write_text("0::/pod\n")
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)))
    return cpu_limit(tmp_path, tmp_path / "cgroup")


@pytest.mark.parametrize(
    ("args", "workers"),
    [
        ((), 2),  # the default: two workers per replica, whatever the node's size
        (("--set", "injector.resources.limits.cpu=1500m"), 2),
        (("--set", "injector.resources.limits.cpu=null", "--set", "injector.workers=4"), 4),  # as istiod
    ],
)
def test_worker_count_follows_the_cpu_limit(
    args: tuple[str, ...], workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server sizes its workers from the container's CPU limit (issue #17): the chart's
    default must give more than one worker and never one per core of a big node."""
    assert _workers_on_a_big_node(render(*args), tmp_path, monkeypatch) == workers


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--set", "captureMod=cni"), "captureMod"),
        (("--set", "captureMode=tproxy"), "captureMode"),
        (("--set", "cni.repair=sometimes"), "repair"),
        (("--set", "revision=Canary_1"), "revision"),
        (("--set-json", 'injector.resources={"requests":{"cpu":"1"},"limts":{"cpu":"2"}}'), "limts"),
        (("--set", "injector.resources.limits.cpu=null"), "injector.workers"),
    ],
)
def test_bad_values_are_refused_naming_the_value(args: tuple[str, ...], named: str) -> None:
    """values.schema.json: a typo or a wrong choice fails the install, not the pods later."""
    with pytest.raises(RuntimeError) as failed:
        render(*args)
    assert named in str(failed.value)


def test_tag_generate_prints_what_the_chart_makes() -> None:
    """`mesh-injector tag generate` (no cluster) and the chart's revisionTags make the same object."""
    done = subprocess.run(
        [sys.executable, "-m", "injector.cli", "tag", "generate", "prod", "--revision", "canary"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    generated = yaml.safe_load(done.stdout)
    chart = find(render("--set", "revision=canary", "--set-json", 'revisionTags=["prod"]'),
                 "MutatingWebhookConfiguration", "mesh-injector-revision-tag-prod")
    assert normalized(generated) == normalized(chart)
