"""What a new user hit on the command line (issue 14) and the input limits' flags (issue 11)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.cli.test_offline_commands import GOLDEN, REPO, run_cli

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}


POD_YAML = yaml.safe_dump(POD).encode()


def pods(n: int) -> bytes:
    return yaml.safe_dump_all([{**POD, "metadata": {"name": f"p{i}"}} for i in range(n)]).encode()


def test_certs_without_a_kubeconfig_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    done = run_cli_env(["certs"], {**env, "HOME": str(tmp_path)})
    assert done.returncode == 2
    assert b"mesh-injector certs: cannot use the kubeconfig" in done.stderr
    assert b"--kubeconfig" in done.stderr and b"Traceback" not in done.stderr


def unreachable_kubeconfig(path: Path) -> Path:
    """A kubeconfig for an API server nothing listens on."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    return path


def test_certs_with_an_unreachable_api_server_says_so(tmp_path: Path) -> None:
    kubeconfig = unreachable_kubeconfig(tmp_path / "kubeconfig")
    done = run_cli("certs", "--kubeconfig", str(kubeconfig))
    assert done.returncode == 1
    assert b"mesh-injector certs: cannot reach the API server" in done.stderr
    assert b"Traceback" not in done.stderr


def run_cli_env(args: list[str], env: dict[str, str]):  # -> subprocess.CompletedProcess[bytes]
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "injector.cli", *args], capture_output=True, timeout=60,
                          env={**env, "PYTHONPATH": str(REPO)}, check=False)


def test_a_config_dir_without_a_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("not a config")
    done = run_cli("kube-inject", "-f", "-", "--config-dir", str(tmp_path), stdin=POD_YAML)
    assert done.returncode == 2
    assert f"configuration: {tmp_path} holds no injector config".encode() in done.stderr
    assert done.stdout == b""


def test_a_config_dir_with_only_values_is_used(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump({"proxy": {"logLevel": "debug"}}))
    done = run_cli("kube-inject", "-f", "-", "--config-dir", str(tmp_path), stdin=POD_YAML)
    assert done.returncode == 0, done.stderr.decode()
    assert b"debug" in done.stdout


def test_an_unknown_kind_with_a_pod_template_is_reported_as_having_one() -> None:
    rollout = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "metadata": {"name": "r"},
               "spec": {"template": {"spec": POD["spec"]}}}
    done = run_cli("check", "-f", "-", stdin=yaml.safe_dump(rollout).encode())
    assert done.returncode == 0
    assert b"Rollout has a pod template at spec.template, but is not a kind the injector" in done.stdout
    assert b"no pod template" not in done.stdout


def test_a_refused_pod_is_not_printed_and_every_reason_is_shown() -> None:
    """stdout keeps only what may be applied; stderr names each reason the core gives."""
    body = (GOLDEN / "traffic-invalid-port.yaml").read_bytes() + b"---\n" + yaml.safe_dump(POD).encode()
    done = run_cli("kube-inject", "-f", "-", stdin=body)
    assert done.returncode == 1
    out = list(yaml.safe_load_all(done.stdout))
    assert [d["metadata"]["name"] for d in out] == ["web"]
    assert b"rejected (InvalidTrafficAnnotation)" in done.stderr
    assert b"traffic.sidecar.istio.io/excludeInboundPorts" in done.stderr
    assert b"left out of the output" in done.stderr


def test_a_refused_list_item_is_left_out_of_its_list() -> None:
    bad = yaml.safe_load((GOLDEN / "traffic-invalid-port.yaml").read_text())
    body = yaml.safe_dump({"apiVersion": "v1", "kind": "PodList", "items": [bad, POD]}).encode()
    done = run_cli("kube-inject", "-f", "-", stdin=body)
    assert done.returncode == 1
    (out,) = yaml.safe_load_all(done.stdout)
    assert out["kind"] == "PodList" and [i["metadata"]["name"] for i in out["items"]] == ["web"]
    assert "istio-proxy" in str(out["items"][0])


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "app.yaml"
    bad.write_text("kind: Pod\nmetadata: {name: [x\n")
    for command in ("kube-inject", "check"):
        done = run_cli(command, "-f", str(bad))
        assert done.returncode == 2
        assert f"{bad}: not valid YAML at line".encode() in done.stderr
        assert b"<unicode string>" not in done.stderr and b"the body" not in done.stderr


def test_documents_before_a_broken_one_are_already_written(tmp_path: Path) -> None:
    """kube-inject streams: what was injected is out when a later document turns out broken."""
    source = tmp_path / "two.yaml"
    source.write_bytes(yaml.safe_dump(POD).encode() + b"---\nkind: [\n")
    done = run_cli("kube-inject", "-f", str(source))
    assert done.returncode == 2
    assert yaml.safe_load(done.stdout)["metadata"]["name"] == "web"
    assert f"{source}: not valid YAML".encode() in done.stderr


@pytest.mark.parametrize(
    ("flags", "body", "limit"),
    [
        (["--max-documents", "2"], pods(3), "max_documents=2"),
        (["--max-objects", "2"], yaml.safe_dump({"kind": "List", "items": [POD, POD, POD]}).encode(),
         "max_objects=2"),
        (["--max-bytes", "100"], pods(3), "max_bytes=100"),
        (["--max-nodes", "10"], pods(1), "max_nodes=10"),
        (["--max-depth", "3"], pods(1), "max_depth=3"),
        (["--no-aliases"], b"kind: Pod\nmetadata: &m {name: a}\nspec: {containers: [{name: a, image: b}]}\n"
         b"x: *m\n", "aliases=False"),
    ],
)
def test_each_input_limit_flag_refuses_naming_the_limit(flags: list[str], body: bytes, limit: str) -> None:
    for command in ("kube-inject", "check"):
        done = run_cli(command, "-f", "-", *flags, stdin=body)
        assert done.returncode == 2, done.stderr.decode()
        assert f"(limit {limit})".encode() in done.stderr
        assert b"Traceback" not in done.stderr


def test_aliases_are_expanded_by_default_on_the_command_line() -> None:
    body = (b"kind: Pod\nmetadata: {name: a, labels: &l {app: a}}\n"
            b"spec: {containers: [{name: a, image: b}]}\nx: *l\n")
    done = run_cli("kube-inject", "-f", "-", stdin=body)
    assert done.returncode == 0, done.stderr.decode()
    assert yaml.safe_load(done.stdout)["x"] == {"app": "a"}


def test_every_list_kind_is_injected_item_by_item() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                  "spec": {"selector": {"matchLabels": {"app": "d"}},
                           "template": {"metadata": {"labels": {"app": "d"}}, "spec": POD["spec"]}}}
    body = yaml.safe_dump({"apiVersion": "apps/v1", "kind": "DeploymentList", "items": [deployment]}).encode()
    done = run_cli("kube-inject", "-f", "-", stdin=body)
    assert done.returncode == 0
    (out,) = yaml.safe_load_all(done.stdout)
    assert out["kind"] == "DeploymentList"
    assert "istio-proxy" in str(out["items"][0]["spec"]["template"])


BAD_ANNOTATIONS = {
    "traffic.sidecar.istio.io/excludeInboundPorts": "8080,70000",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "x",
    "sidecar.istio.io/interceptionMode": "bogus",
    "status.sidecar.istio.io/port": "abc",
}


def test_every_bad_annotation_of_a_pod_is_reported_at_once() -> None:
    pod = {**POD, "metadata": {"name": "bad", "annotations": BAD_ANNOTATIONS}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bad"},
                  "spec": {"template": {"metadata": {"annotations": BAD_ANNOTATIONS}, "spec": POD["spec"]}}}
    for obj in (pod, deployment):
        body = yaml.safe_dump(obj).encode()
        for command, stream in (("kube-inject", "stderr"), ("check", "stdout")):
            done = run_cli(command, "-f", "-", stdin=body)
            assert done.returncode == 1
            text = getattr(done, stream).decode()
            for key, value in BAD_ANNOTATIONS.items():
                assert f"annotation {key}={value!r}" in text, (command, obj["kind"], text)


@pytest.mark.parametrize("command", ["serve", "audit"])
def test_the_server_and_audit_refuse_a_config_dir_without_a_config_too(tmp_path: Path, command: str) -> None:
    """Not only the offline commands: a server started on an empty mount must not serve defaults."""
    (tmp_path / "README").write_text("not a config")
    tls = ["--tls-cert-file", "/nonexistent", "--tls-key-file", "/nonexistent"]
    extra = tls if command == "serve" else []
    done = run_cli(command, "--config-dir", str(tmp_path), "--kubeconfig", "/nonexistent", *extra)
    assert done.returncode != 0
    assert f"{tmp_path} holds no injector config".encode() in done.stderr + done.stdout


@pytest.mark.parametrize("name", ["config.yaml", "values.yaml", "web.template.yaml", "templates/web.yaml"])
def test_a_broken_config_file_is_named_with_its_line(tmp_path: Path, name: str) -> None:
    """The config dir's YAML errors name the file and line, not PyYAML's "<unicode string>"."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "config.yaml").write_text("policy: enabled\n")
    (tmp_path / name).write_text("spec: {}\nvalues: [\n")
    for command in ("kube-inject", "check"):
        done = run_cli(command, "-f", "-", "--config-dir", str(tmp_path), stdin=POD_YAML)
        assert done.returncode == 2
        assert f"{tmp_path / name}: not valid YAML at line 3".encode() in done.stderr
        assert b"<unicode string>" not in done.stderr


def test_a_bad_namespace_label_is_named_as_the_user_wrote_it() -> None:
    """The message names the label the user gave, not an internal parameter (namespaceLabels)."""
    for command in ("kube-inject", "check"):
        done = run_cli(command, "-f", "-", "--namespace-labels", "team=a,bogus", stdin=POD_YAML)
        assert done.returncode == 2
        wanted = f"mesh-injector {command}: namespace label 'bogus' is not key=value"
        assert done.stderr.decode().strip() == wanted
        assert done.stdout == b""


def test_tag_without_a_kubeconfig_or_a_reachable_api_is_one_line(tmp_path: Path) -> None:
    """`tag` (new with the chart) meets the cluster like `certs`: a reason, never a traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    done = run_cli_env(["tag", "list"], {**env, "HOME": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.startswith(b"mesh-injector tag: cannot use the kubeconfig")
    assert b"Traceback" not in done.stderr
    kubeconfig = unreachable_kubeconfig(tmp_path / "kubeconfig")
    done = run_cli("tag", "--kubeconfig", str(kubeconfig), "set", "prod", "--revision", "canary")
    assert done.returncode == 1
    assert done.stderr.startswith(b"mesh-injector tag: cannot reach the API server")
    assert b"Traceback" not in done.stderr
