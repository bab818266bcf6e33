"""kube-inject takes istioctl's flags and Istio's files (issue 16); ``version`` on both binaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.cli.test_offline_commands import REPO, run_cli

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
POD_YAML = yaml.safe_dump(POD).encode()
GO_SIDECAR = ("{{- $containers := list }}\nspec:\n  containers:\n  - name: istio-proxy\n"
              "    image: \"{{ .ProxyImage }}\"\n")


def proxy(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == "istio-proxy")


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(obj["metadata"]["annotations"]["sidecar.istio.io/status"])


def test_dash_o_is_the_output_file_as_in_istioctl(tmp_path: Path) -> None:
    target = tmp_path / "out.yaml"
    done = run_cli("kube-inject", "-f", "-", "-o", str(target), stdin=POD_YAML)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b""
    assert proxy(yaml.safe_load(target.read_text()))["image"]


def test_dash_o_with_a_format_name_still_writes_that_file_and_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "injector.cli", "kube-inject", "-f", "-", "-o", "json"],
                          input=POD_YAML, capture_output=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO)},
                          timeout=60, check=False)
    assert done.returncode == 0
    assert b"-o names the output file, as in istioctl; the format is --output-format" in done.stderr
    assert yaml.safe_load((tmp_path / "json").read_text())["kind"] == "Pod"


def test_output_format_json_on_yaml_input() -> None:
    done = run_cli("kube-inject", "-f", "-", "--output-format", "json", stdin=POD_YAML)
    assert done.returncode == 0
    assert proxy(json.loads(done.stdout))["name"] == "istio-proxy"


def test_short_revision_flag_is_the_revision() -> None:
    done = run_cli("kube-inject", "-f", "-", "-r", "canary", stdin=POD_YAML)
    assert done.returncode == 0, done.stderr.decode()
    assert status(yaml.safe_load(done.stdout))["revision"] == "canary"


def test_values_and_mesh_config_files_map_onto_our_config(tmp_path: Path) -> None:
    values = tmp_path / "values.json"
    values.write_text(json.dumps({
        "global": {"hub": "gcr.io/istio-release", "tag": "1.24.0", "proxy": {"image": "proxyv2",
                   "logLevel": "debug", "privileged": False}},
        "revision": "blue", "pilot": {"cni": {"enabled": False}},
    }))
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("trustDomain: example.org\naccessLogFile: /dev/stdout\n")
    done = run_cli("kube-inject", "-f", "-", "--valuesFile", str(values), "--meshConfigFile", str(mesh),
                   stdin=POD_YAML)
    assert done.returncode == 0, done.stderr.decode()
    out = yaml.safe_load(done.stdout)
    assert proxy(out)["image"] == "gcr.io/istio-release/proxyv2:1.24.0"
    assert "--proxyLogLevel=debug" in proxy(out)["args"]
    assert {"name": "TRUST_DOMAIN", "value": "example.org"} in proxy(out)["env"]
    assert status(out)["revision"] == "blue"
    assert "istio-init" in [c["name"] for c in out["spec"]["initContainers"]]  # CNI off: init capture
    assert f"not used from {values}: global.proxy.privileged".encode() in done.stderr
    assert f"not used from {mesh}: accessLogFile".encode() in done.stderr


def test_inject_config_file_policy_and_our_templates(tmp_path: Path) -> None:
    inject = tmp_path / "inject.yaml"
    inject.write_text(yaml.safe_dump({"policy": "disabled", "injectedAnnotations": {"team": "mesh"},
                                      "templates": {"sidecar": GO_SIDECAR}}))
    opted_in = {**POD, "metadata": {**POD["metadata"], "annotations": {"sidecar.istio.io/inject": "true"}}}
    done = run_cli("kube-inject", "-f", "-", "--injectConfigFile", str(inject),
                   stdin=yaml.safe_dump_all([POD, opted_in]).encode())
    assert done.returncode == 0, done.stderr.decode()
    plain, injected = yaml.safe_load_all(done.stdout)
    assert plain == POD  # policy disabled: only opted-in pods
    assert injected["metadata"]["annotations"]["team"] == "mesh"
    assert b"template 'sidecar' in" in done.stderr
    assert b"using mesh-injector's built-in 'sidecar' in its place" in done.stderr


def test_a_go_template_we_cannot_render_is_refused_by_name(tmp_path: Path) -> None:
    inject = tmp_path / "inject.yaml"
    inject.write_text(yaml.safe_dump({"defaultTemplates": ["sidecar", "custom"],
                                      "templates": {"custom": GO_SIDECAR}}))
    done = run_cli("kube-inject", "-f", "-", "--injectConfigFile", str(inject), stdin=POD_YAML)
    assert done.returncode == 2
    assert (f"--injectConfigFile {inject}: template 'custom' is a Go template, which mesh-injector "
            "cannot render").encode() in done.stderr
    assert done.stdout == b""


def test_an_unused_go_template_is_dropped_and_pods_asking_for_it_refused(tmp_path: Path) -> None:
    inject = tmp_path / "inject.yaml"
    inject.write_text(yaml.safe_dump({"templates": {"my-gateway": "{{ .Values.x }}\nmetadata: {}\n"}}))
    annotations = {"inject.istio.io/templates": "my-gateway"}
    asking = {**POD, "metadata": {**POD["metadata"], "annotations": annotations}}
    done = run_cli("kube-inject", "-f", "-", "--injectConfigFile", str(inject),
                   stdin=yaml.safe_dump(asking).encode())
    assert done.returncode == 1
    assert b"template 'my-gateway' in" in done.stderr and b"pods asking for it are refused" in done.stderr
    assert b"rejected (UnknownTemplate)" in done.stderr


def test_istio_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text("global: [\n")
    done = run_cli("kube-inject", "-f", "-", "--valuesFile", str(bad), stdin=POD_YAML)
    assert done.returncode == 2
    assert f"--valuesFile {bad}: not valid YAML at line".encode() in done.stderr
    missing = run_cli("kube-inject", "-f", "-", "--meshConfigFile", "/nonexistent/mesh", stdin=POD_YAML)
    assert missing.returncode == 2 and b"cannot read --meshConfigFile /nonexistent/mesh" in missing.stderr


def test_version_on_both_binaries() -> None:
    for module, name in (("injector.cli", "mesh-injector"), ("cni.cli", "mesh-cni")):
        done = subprocess.run([sys.executable, "-m", module, "version"], capture_output=True, timeout=60,
                              env={"PYTHONPATH": str(REPO)}, check=False)
        assert done.returncode == 0, done.stderr.decode()
        first = done.stdout.decode().split()
        assert first[0] == name and first[1][0].isdigit()
        short = subprocess.run([sys.executable, "-m", module, "version", "--short"], capture_output=True,
                               timeout=60, env={"PYTHONPATH": str(REPO)}, check=False)
        assert short.stdout.decode().strip() == first[1]
