"""The two init-container modes: `mesh-cni validate` (unprivileged proof) and `mesh-cni redirect`."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cni import nftables
from cni.annotations import TrafficDefaults, plan_from_annotations
from cni.redirect import parse_downward_api
from tests.cni.cnitest import (
    INJECTED,
    REPO,
    UNPRIVILEGED_PYTHON,
    CniBed,
    Listeners,
    connect,
    nft_ruleset,
    run_in_netns,
)

PROXY = 1337


@functools.cache
def readable_package_root() -> str:
    """A world-readable copy of the ``cni`` package: the checkout may sit under a private home
    directory that the proxy uid cannot traverse (an image would ship the package readable)."""
    root = tempfile.mkdtemp(prefix="mesh-cni-pkg-")
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(REPO / "cni", Path(root) / "cni", ignore=shutil.ignore_patterns("__pycache__"))
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return root


def mesh_cni(pod, *args: str, uid: int | None = None):  # type: ignore[no-untyped-def]
    """Run the mesh-cni CLI inside the pod's netns (as uid) the way its init container would."""
    python = UNPRIVILEGED_PYTHON if uid is not None else sys.executable
    root = readable_package_root() if uid is not None else str(REPO)
    code = f"import sys; sys.path.insert(0, {root!r}); from cni.cli import main; sys.exit(main())"
    return run_in_netns(pod.netns, [python, "-I", "-S", "-c", code, *args], uid=uid, gid=uid,
                        env={"PATH": "/usr/bin:/bin"})


def downward_api_file(annotations: dict[str, str]) -> str:
    """Kubernetes' format: key="value" with Go quoting (json.dumps is the same for these values)."""
    return "\n".join(f"{key}={json.dumps(value)}" for key, value in sorted(annotations.items())) + "\n"


def test_validate_passes_in_a_redirected_pod(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", INJECTED)
    done = mesh_cni(pod, "validate", uid=PROXY)
    assert done.returncode == 0, done.stderr
    assert "redirect in place" in done.stdout


def test_validate_fails_clearly_in_an_unredirected_pod(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", {})
    done = mesh_cni(pod, "validate", "--timeout", "1", uid=PROXY)
    assert done.returncode == 1
    assert "NOT redirected" in done.stderr


def test_validate_reports_a_busy_capture_port(bed: CniBed) -> None:
    pod = bed.add_pod("meshnet", INJECTED)
    with Listeners(pod, (15006,)):
        done = mesh_cni(pod, "validate", uid=PROXY)
    assert done.returncode == 2 and "15006" in done.stderr


def test_downward_api_format_is_parsed() -> None:
    text = 'a="1"\nsidecar.istio.io/status="{\\"containers\\":[\\"istio-proxy\\"]}"\nx="tab\\there \\x41"\n'
    assert parse_downward_api(text) == {"a": "1", "sidecar.istio.io/status": '{"containers":["istio-proxy"]}',
                                        "x": "tab\there A"}


def test_redirect_programs_the_same_rules_as_the_plugin(bed: CniBed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    annotations = {**INJECTED, "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
                   "traffic.sidecar.istio.io/includeInboundPorts": "8080,9090"}
    path = tmp_path / "annotations"
    path.write_text(downward_api_file(annotations))
    pod = bed.add_pod("meshnet", {})  # the CNI did nothing; the init container does it
    done = mesh_cni(pod, "redirect", "--annotations-file", str(path))
    assert done.returncode == 0, done.stderr
    assert nftables.check(pod.netns, plan_from_annotations(annotations)) == []
    with Listeners(pod, (15001,)) as local:
        assert connect(pod, "192.0.2.9", 80) == "connected"
        assert local.next() is not None
    assert mesh_cni(pod, "validate", uid=PROXY).returncode == 0
    again = mesh_cni(pod, "redirect", "--annotations-file", str(path))  # a restarted init container
    assert again.returncode == 0 and nft_ruleset(pod.netns).count("redirect to :15001") == 1


def test_redirect_capture_dns_flag_and_skips(bed: CniBed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pod = bed.new_pod()
    path = tmp_path / "annotations"
    path.write_text(downward_api_file(INJECTED))
    assert mesh_cni(pod, "redirect", "--annotations-file", str(path), "--capture-dns").returncode == 0
    plan = plan_from_annotations(INJECTED, TrafficDefaults(capture_dns=True))
    assert nftables.check(pod.netns, plan) == []
    path.write_text(downward_api_file({"app": "x"}))
    other = bed.new_pod()
    done = mesh_cni(other, "redirect", "--annotations-file", str(path))
    assert done.returncode == 0 and "not redirecting" in done.stdout
    assert "mesh_cni" not in nft_ruleset(other.netns)
    path.write_text(downward_api_file({**INJECTED, "traffic.sidecar.istio.io/excludeInboundPorts": "x"}))
    done = mesh_cni(other, "redirect", "--annotations-file", str(path))
    assert done.returncode == 1 and "excludeInboundPorts" in done.stderr
    assert "mesh_cni" not in nft_ruleset(other.netns)
