"""The CNI protocol as the spec states it, by executing the plugin binary directly."""

from __future__ import annotations

import json
import os

import pytest

from tests.cni.cnitest import INJECTED, CniBed, exec_plugin, nft_ruleset, plugin_config

PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"address": "10.9.0.5/24", "interface": 0}], "dns": {}}


@pytest.fixture()
def pod(bed: CniBed):  # type: ignore[no-untyped-def]
    return bed.new_pod(INJECTED)


def test_version_lists_every_supported_version(bed: CniBed) -> None:
    code, out, _ = exec_plugin(bed, "VERSION", {"cniVersion": "0.4.0"})
    assert code == 0
    assert out == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    code, out, _ = exec_plugin(bed, "VERSION", b"")
    assert code == 0 and out["cniVersion"] == "1.1.0"  # type: ignore[index]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_prints_prev_result_unchanged_in_the_input_version(bed: CniBed, pod, version: str) -> None:  # type: ignore[no-untyped-def]
    prev = {**PREV, "cniVersion": version}
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, version=version, annotations=INJECTED,
                                                         prev_result=prev), pod=pod)
    assert code == 0
    assert out == prev
    assert "table inet mesh_cni" in nft_ruleset(pod.netns)


def test_standalone_add_prints_an_empty_result(bed: CniBed, pod) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, version="1.1.0", annotations={}), pod=pod)
    assert code == 0
    assert out == {"cniVersion": "1.1.0", "interfaces": [], "ips": [], "dns": {}}


@pytest.mark.parametrize(("command", "missing"), [
    ("ADD", "CNI_NETNS"), ("ADD", "CNI_CONTAINERID"), ("ADD", "CNI_IFNAME"), ("ADD", "CNI_PATH"),
    ("CHECK", "CNI_NETNS"), ("DEL", "CNI_CONTAINERID"), ("GC", "CNI_PATH"),
])
def test_missing_environment_is_error_4(bed: CniBed, pod, command: str, missing: str) -> None:  # type: ignore[no-untyped-def]
    code, out, stderr = exec_plugin(bed, command, plugin_config(bed, version="1.1.0", annotations=INJECTED),
                                    pod=pod, drop=(missing,))
    assert code != 0
    assert out["code"] == 4 and missing in out["msg"]  # type: ignore[index]
    assert out["cniVersion"] == "1.1.0"  # type: ignore[index]
    assert missing in stderr  # logged too, never on stdout beyond the error JSON


def test_unknown_command_and_bad_container_id_are_error_4(bed: CniBed, pod) -> None:  # type: ignore[no-untyped-def]
    config = plugin_config(bed, annotations=INJECTED)
    code, out, _ = exec_plugin(bed, "FROB", config, pod=pod)
    assert code != 0 and out["code"] == 4  # type: ignore[index]
    code, out, _ = exec_plugin(bed, "ADD", config, pod=pod, env={"CNI_CONTAINERID": "../etc"})
    assert code != 0 and out["code"] == 4  # type: ignore[index]
    assert "table inet mesh_cni" not in nft_ruleset(pod.netns)


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe", b"[1, 2]", b""])
def test_undecodable_stdin_is_error_6(bed: CniBed, pod, garbage: bytes) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = exec_plugin(bed, "ADD", garbage, pod=pod)
    assert code != 0 and out["code"] == 6  # type: ignore[index]
    assert set(out) >= {"cniVersion", "code", "msg"}  # type: ignore[arg-type]


def test_unknown_cni_version_is_error_1(bed: CniBed, pod) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, version="9.9.9", annotations=INJECTED), pod=pod)
    assert code != 0 and out["code"] == 1 and "9.9.9" in out["msg"]  # type: ignore[index]
    assert "table inet mesh_cni" not in nft_ruleset(pod.netns)


def test_invalid_config_is_error_7(bed: CniBed, pod) -> None:  # type: ignore[no-untyped-def]
    bads = ({"excludeNamespaces": "kube-system"}, {"captureDNS": "yes"}, {"name": ""}, {"logLevel": "loud"})
    for bad in bads:
        code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, annotations=INJECTED, **bad), pod=pod)
        assert code != 0 and out["code"] == 7, bad  # type: ignore[index]
    # No annotations from the runtime and no kubeconfig: a misconfiguration, said clearly.
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed), pod=pod)
    assert code != 0 and out["code"] == 7 and "kubeconfig" in out["msg"]  # type: ignore[index]


@pytest.mark.parametrize(("key", "value"), [
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "http"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/33"),
    ("sidecar.istio.io/interceptionMode", "TPROXY"),
    ("traffic.sidecar.istio.io/excludeInterfaces", "a/b"),
])
def test_invalid_annotation_fails_add_and_applies_nothing(bed: CniBed, pod, key: str, value: str) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, annotations={**INJECTED, key: value}), pod=pod)
    assert code != 0 and out["code"] == 101  # type: ignore[index]
    assert key in out["msg"] and repr(value) in out["msg"]  # type: ignore[index]
    assert "table inet mesh_cni" not in nft_ruleset(pod.netns)


def test_gc_and_status_need_1_1_0_and_succeed(bed: CniBed) -> None:
    config = plugin_config(bed, version="1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "abc", "ifname": "eth0"}]})
    assert exec_plugin(bed, "GC", config)[:2] == (0, None)
    assert exec_plugin(bed, "STATUS", plugin_config(bed, version="1.1.0"))[:2] == (0, None)
    code, out, _ = exec_plugin(bed, "STATUS", plugin_config(bed, version="1.0.0"))
    assert code != 0 and out["code"] == 1  # type: ignore[index]
    code, out, _ = exec_plugin(bed, "STATUS", plugin_config(bed, version="1.1.0", kubeconfig="/nonexistent"))
    assert code != 0 and out["code"] == 50  # type: ignore[index]


def test_add_with_a_missing_netns_fails_and_del_succeeds(bed: CniBed, pod) -> None:  # type: ignore[no-untyped-def]
    bed.delete_netns(pod)
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, annotations=INJECTED), pod=pod)
    assert code != 0 and out["code"] == 4  # type: ignore[index]
    assert exec_plugin(bed, "DEL", plugin_config(bed), pod=pod)[:2] == (0, None)
    assert exec_plugin(bed, "DEL", plugin_config(bed), pod=pod, env={"CNI_NETNS": ""})[:2] == (0, None)


def test_logs_go_to_a_size_bounded_file_never_stdout(bed: CniBed, pod, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "plugin.log"
    config = plugin_config(bed, annotations=INJECTED, logFile=str(log), logMaxBytes=600, logLevel="debug")
    for _ in range(6):
        code, out, _ = exec_plugin(bed, "ADD", config, pod=pod)
        assert code == 0 and out is not None
    assert "redirect programmed" in log.read_text()
    assert os.path.getsize(log) <= 600
    assert (tmp_path / "plugin.log.1").exists()
    json.dumps(out)


def test_add_works_in_a_pod_without_ipv6(bed: CniBed, pod) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    from pathlib import Path

    name = Path(pod.netns).name
    for key in ("all", "default", "lo"):
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"],
                       check=True)
    code, out, _ = exec_plugin(bed, "ADD", plugin_config(bed, annotations=INJECTED), pod=pod)
    assert code == 0, out
    assert "table inet mesh_cni" in nft_ruleset(pod.netns)
    addresses = subprocess.run(["ip", "-n", name, "addr", "show", "dev", "lo"], capture_output=True,
                               text=True)
    assert "::6" not in addresses.stdout
