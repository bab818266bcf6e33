"""The installed plugin runs where no host Python (and no /bin/sh) is reachable.

A chroot holding only the installed runtime dir and the CNI bin dir is the strictest host we can
make: no /usr, no /lib, no /proc. If the launcher works there, it needs nothing from the host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cni.install.agent import Agent, AgentConfig
from tests.conftest import require_root
from tests.install.conftest import write_shape


def _chroot_with_only(config: AgentConfig, root: Path) -> None:
    """Hard-link the installed dirs into an otherwise empty root, at the same absolute paths."""
    for directory in (config.runtime_dir, config.cni_bin_dir):
        inside = root / directory.relative_to("/")
        inside.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(directory), str(inside)], check=True)


def _run_in_chroot(
    root: Path, argv: list[str], env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    return subprocess.run([chroot, str(root), *argv], input=stdin, env=env, capture_output=True, timeout=30)


def test_launcher_runs_the_plugin_with_no_host_python_or_shell(host: AgentConfig, tmp_path: Path) -> None:
    require_root()
    write_shape(host, "bridge-conflist", bystanders=False)
    assert Agent(host).reconcile()[0]
    launcher = host.cni_bin_dir / "mesh-cni"
    first_line = launcher.read_bytes().split(b"\n", 1)[0]
    assert first_line.startswith(f"#!{host.runtime_dir}/".encode()), "interpreter must be the bundled one"

    root = tmp_path / "bare-host"
    root.mkdir()
    _chroot_with_only(host, root)
    for absent in ("usr/bin/python3", "bin/sh", "lib64", "usr/lib", "proc/self"):
        assert not (root / absent).exists()

    env = {"CNI_COMMAND": "VERSION", "CNI_PATH": str(host.cni_bin_dir)}
    config = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "mesh-cni"}).encode()
    done = _run_in_chroot(root, [str(launcher)], env, config)
    assert done.returncode == 0, done.stderr.decode()
    versions = json.loads(done.stdout)
    assert "1.0.0" in versions["supportedVersions"]


def test_bundled_interpreter_does_netlink_in_the_bare_root(host: AgentConfig, tmp_path: Path) -> None:
    """The copied libraries are complete: pyroute2 (with its sqlite3 import) talks netlink."""
    require_root()
    write_shape(host, "single-conf", bystanders=False)
    assert Agent(host).reconcile()[0]
    root = tmp_path / "bare-host"
    root.mkdir()
    _chroot_with_only(host, root)
    python = host.runtime_dir / "current" / "bin" / "python3"
    site = host.runtime_dir / "current" / "site"
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "from pyroute2 import IPRoute\n"
        "import cni.annotations, ssl, json\n"
        "with IPRoute() as ipr: names = [l.get_attr('IFLA_IFNAME') for l in ipr.get_links()]\n"
        "print(json.dumps({'links': names, 'prefix': sys.prefix}))\n"
    )
    done = _run_in_chroot(root, [str(python), "-IBS", "-c", code], {})
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout)
    assert "lo" in out["links"]
    assert out["prefix"].startswith(str(host.runtime_dir))


def test_rebuild_switches_current_atomically_and_keeps_one_previous(host_own_runtime: AgentConfig) -> None:
    host = host_own_runtime
    from cni.install.runtime import RuntimeSource, build

    runtime = build(RuntimeSource.current(), host.runtime_dir)
    first = (host.runtime_dir / "current").resolve()
    # A different fingerprint (as after an image upgrade) builds beside and flips the link.
    source = RuntimeSource.current()
    fake = type(source)(source.executable, source.stdlib, source.dynload, source.packages)
    object.__setattr__(fake, "fingerprint", lambda: "upgrade-0000000")
    build(fake, host.runtime_dir)
    second = (host.runtime_dir / "current").resolve()
    assert second != first and second.name == "upgrade-0000000"
    assert first.exists(), "the previous version stays for plugin processes still starting from it"
    assert runtime.python.exists()


def test_without_patchelf_the_launcher_falls_back_to_sh_and_the_bundled_loader(
    host_own_runtime: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images without patchelf still work on hosts that have /bin/sh: the launcher starts the
    bundled dynamic loader explicitly with the bundled libraries."""
    host = host_own_runtime
    monkeypatch.setenv("PATH", "/nonexistent")  # no patchelf (ldd is found by absolute path below)
    monkeypatch.setattr("cni.install.runtime.LDD", shutil.which("ldd", path="/usr/bin:/bin") or "ldd")
    write_shape(host, "bridge-conflist", bystanders=False)
    assert Agent(host).reconcile()[0]
    launcher = host.cni_bin_dir / "mesh-cni"
    assert launcher.read_bytes().startswith(b"#!/bin/sh\n")
    config = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "mesh-cni"}).encode()
    done = subprocess.run([str(launcher)], input=config, env={"CNI_COMMAND": "VERSION"}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert "1.0.0" in json.loads(done.stdout)["supportedVersions"]
