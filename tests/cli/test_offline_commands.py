"""``mesh-injector kube-inject`` and ``check``: the core's answers, as a user sees them offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.cli import main
from tests.core.test_golden import CASES, GOLDEN, SETTINGS, load_input, run

REPO = Path(__file__).resolve().parents[2]
MESH_INJECTOR = [sys.executable, "-m", "injector.cli"]
#: Goldens judged with the built-in config: those are what the CLI's defaults must reproduce.
DEFAULT_CONFIG_CASES = [c for c in CASES if not SETTINGS.get(c, {}).get("config")
                        and "@CONFIG_HASH@" not in (GOLDEN / f"{c}.yaml").read_text()]


def today(objs: list[dict[str, Any]]) -> str:
    """What kube-inject wrote before it streamed through libyaml: one pure-Python dump at the end."""
    return yaml.dump_all(objs, Dumper=yaml.SafeDumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True)


def today_json(objs: list[dict[str, Any]]) -> str:
    body = objs[0] if len(objs) == 1 else {"apiVersion": "v1", "kind": "List", "items": objs}
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def core_output(case: str) -> dict[str, Any]:
    """The core's object for a golden input, as the old kube-inject got it (a List in one call)."""
    return run(case, load_input(case)).mutated


def golden(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, obj = yaml.safe_load_all((GOLDEN / f"{case}.yaml.injected").read_text())
    return head, obj


def label_arg(case: str) -> str:
    labels = SETTINGS.get(case, {}).get("namespaceLabels", {"istio-injection": "enabled"})
    return ",".join(f"{k}={v}" for k, v in labels.items())


def cli_args(case: str, *extra: str) -> list[str]:
    args = ["-f", str(GOLDEN / f"{case}.yaml"), "--namespace-labels", label_arg(case), *extra]
    namespace = SETTINGS.get(case, {}).get("namespace")
    return [*args, "--namespace", namespace] if namespace else args


def test_enough_cases_use_the_builtin_config() -> None:
    assert len(DEFAULT_CONFIG_CASES) >= 30


@pytest.mark.parametrize("case", DEFAULT_CONFIG_CASES)
def test_kube_inject_prints_the_golden_object(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Byte for byte what it printed before; a refused object is not printed at all."""
    head, want = golden(case)
    code = main(["kube-inject", *cli_args(case)])
    out, err = capsys.readouterr()
    refused = head["decision"] == "reject"
    assert yaml.safe_load(out) == (None if refused else want)
    assert out == ("" if refused else today([core_output(case)]))
    assert code == (1 if refused else 0)
    if head["decision"] in ("skip", "reject"):
        assert head["reasons"][0]["code"] in err and head["reasons"][0]["message"] in err
    if refused:
        assert "left out of the output" in err
    for warning in head["warnings"]:
        assert warning["code"] in err


@pytest.mark.parametrize("case", DEFAULT_CONFIG_CASES)
def test_kube_inject_json_is_the_golden_object(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    head, want = golden(case)
    main(["kube-inject", *cli_args(case), "--output-format", "json"])
    out = capsys.readouterr().out
    assert out == ("" if head["decision"] == "reject" else today_json([want]))


def test_every_golden_in_one_stream_comes_out_as_before(tmp_path: Path) -> None:
    """One multi-document file through the streaming writers: the bytes of one dump at the end."""
    cases = [c for c in DEFAULT_CONFIG_CASES if "namespace" not in SETTINGS.get(c, {})
             and label_arg(c) == "istio-injection=enabled"]
    assert len(cases) >= 20
    source = tmp_path / "all.yaml"
    source.write_text(today([load_input(c) for c in cases]))
    kept = [core_output(c) for c in cases if golden(c)[0]["decision"] != "reject"]
    for fmt, want in (("yaml", today(kept)), ("json", today_json(kept))):
        done = run_cli("kube-inject", "-f", str(source), "--namespace-labels", "istio-injection=enabled",
                       "--output-format", fmt)
        assert done.returncode == 1  # some goldens are refused
        assert done.stdout.decode() == want


@pytest.mark.parametrize("case", DEFAULT_CONFIG_CASES)
def test_check_reports_the_golden_decision(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    head, _ = golden(case)
    main(["check", *cli_args(case), "-o", "json"])
    entries = json.loads(capsys.readouterr().out)
    if head["decision"] == "passthrough" or len(entries) != 1:
        assert entries, "check reports every object"
        return
    (entry,) = entries
    assert entry["decision"] == head["decision"]
    assert entry["reasons"] == head["reasons"]
    assert entry["warnings"] == head["warnings"]


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*MESH_INJECTOR, *args], input=stdin, capture_output=True, env=env, timeout=60,
                          check=False)


def test_readme_example_injects_through_the_console_script() -> None:
    """The README's first command: an injected Deployment on stdout, nothing on stderr."""
    done = run_cli("kube-inject", "-f", str(REPO / "examples" / "deployment.yaml"))
    assert done.returncode == 0, done.stderr.decode()
    docs = list(yaml.safe_load_all(done.stdout))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    deployment = docs[0]
    names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    init_names = [c["name"] for c in deployment["spec"]["template"]["spec"].get("initContainers", [])]
    assert "istio-proxy" in names + init_names
    assert "istio-validation" in init_names
    assert "sidecar.istio.io/status" in deployment["spec"]["template"]["metadata"]["annotations"]


def test_json_on_stdin_comes_back_as_json() -> None:
    pod = load_input("basic-pod")
    done = run_cli("kube-inject", "-f", "-", stdin=json.dumps(pod).encode())
    assert done.returncode == 0, done.stderr.decode()
    injected = json.loads(done.stdout)
    assert injected == golden("basic-pod")[1]


def test_multi_document_input_keeps_order_and_passes_other_kinds_through() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"ports": [{"port": 80}]}}
    body = yaml.safe_dump_all([service, load_input("basic-pod"), load_input("host-network")], sort_keys=False)
    done = run_cli("kube-inject", "-f", "-", stdin=body.encode())
    assert done.returncode == 0
    out = list(yaml.safe_load_all(done.stdout))
    assert out == [service, golden("basic-pod")[1], golden("host-network")[1]]
    assert b"HostNetwork" in done.stderr


def test_rejected_pod_exits_1_and_names_the_annotation() -> None:
    done = run_cli("check", "-f", str(GOLDEN / "traffic-invalid-port.yaml"))
    assert done.returncode == 1
    assert b"InvalidTrafficAnnotation" in done.stdout
    assert b"traffic.sidecar.istio.io/" in done.stdout


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["kube-inject", "-f", "/nonexistent/pod.yaml"], None, b"cannot read /nonexistent/pod.yaml"),
        (["kube-inject", "-f", "-"], b"", b"empty"),
        (["kube-inject", "-f", "-"], b"kind: [unclosed", b"stdin: not valid YAML at line 2"),
        (["check", "-f", "-"], b"- just\n- a list\n", b"not a Kubernetes object"),
        (["check", "-f", "-", "--namespace-labels", "novalue"], b"kind: Pod\n", b"not key=value"),
        (["kube-inject", "-f", "-", "--config-dir", "/nonexistent"], b"kind: Pod\n", b"configuration"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    args: list[str], stdin: bytes | None, fragment: bytes
) -> None:
    done = run_cli(*args, stdin=stdin)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert b"Traceback" not in done.stderr
    assert done.stdout == b""
