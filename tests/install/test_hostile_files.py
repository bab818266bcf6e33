"""A hostile or broken net dir: special files, huge files, symlinks and a full disk."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cni.install.agent import Agent, AgentConfig
from cni.install.files import MAX_CONFIG_BYTES
from tests.conftest import REPO, require_root
from tests.install.conftest import SHAPES, plugin_types, snapshot, write_shape
from tests.install.test_install import cli_flags


def test_fifos_in_the_net_and_bin_dirs_never_block_install_once(host: AgentConfig) -> None:
    write_shape(host, "bridge-conflist")
    os.mkfifo(host.cni_net_dir / "05-pipe.conflist")  # sorts first, has a config suffix
    os.mkfifo(host.cni_net_dir / "fifo")
    os.mkfifo(host.cni_bin_dir / "mesh-cni")  # where our launcher goes: replaced, never read
    done = subprocess.run(
        [sys.executable, "-m", "cni.cli", "install", *cli_flags(host), "--once", "--once-timeout", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert plugin_types(host.cni_net_dir / "10-bridge.conflist")[-1] == "mesh-cni"
    assert stat.S_ISFIFO(os.lstat(host.cni_net_dir / "05-pipe.conflist").st_mode)
    assert stat.S_ISREG(os.lstat(host.cni_bin_dir / "mesh-cni").st_mode)


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


def test_huge_file_is_never_read_and_is_named_when_it_may_be_the_primary(host: AgentConfig) -> None:
    write_shape(host, "bridge-conflist")
    huge = host.cni_net_dir / "05-huge.conflist"
    _sparse(huge, 50 << 20)
    valid, reason = Agent(host).reconcile()
    assert not valid
    assert "05-huge.conflist" in reason and "MAX_CONFIG_BYTES" in reason and str(MAX_CONFIG_BYTES) in reason
    assert plugin_types(host.cni_net_dir / "10-bridge.conflist") == ["bridge", "portmap"]
    huge.rename(host.cni_net_dir / "50-huge.conflist")  # after the primary: the runtime never uses it
    assert Agent(host).reconcile()[0]
    assert plugin_types(host.cni_net_dir / "10-bridge.conflist")[-1] == "mesh-cni"


@pytest.mark.parametrize("shape", ["bridge-conflist", "single-conf"])
def test_symlinked_config_is_edited_through_the_link_and_restored_as_it_was(
    host_own_runtime: AgentConfig, tmp_path: Path, shape: str
) -> None:
    host = host_own_runtime
    name, data, types = SHAPES[shape]
    managed = tmp_path / "managed"
    managed.mkdir()
    (managed / name).write_bytes(data)
    link = host.cni_net_dir / name
    link.symlink_to(managed / name)
    agent = Agent(host)
    assert agent.reconcile()[0]
    if name.endswith(".conflist"):
        assert link.is_symlink() and os.readlink(link) == str(managed / name)
        assert plugin_types(managed / name) == [*types, "mesh-cni"]
    else:  # a .conf becomes a .conflist of ours; the linked file itself is left as it was
        assert plugin_types(host.cni_net_dir / (name[: -len(".conf")] + ".conflist"))[-1] == "mesh-cni"
        assert (managed / name).read_bytes() == data
    agent.uninstall()
    assert link.is_symlink() and os.readlink(link) == str(managed / name)
    assert (managed / name).read_bytes() == data
    assert sorted(os.listdir(host.cni_net_dir)) == [name]


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "64k") -> Iterator[Path]:
    require_root()
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_enospc_while_writing_the_conflist_leaves_the_old_file_intact(
    host: AgentConfig, tmp_path: Path
) -> None:
    with tiny_tmpfs(tmp_path / "tiny") as mount:
        net = mount / "net.d"
        net.mkdir()
        config = replace(host, cni_net_dir=net)
        write_shape(config, "calico-conflist", bystanders=False)
        before = snapshot(net)
        _fill(mount / "filler")
        agent = Agent(config)
        assert agent.run(once=True, once_timeout_s=0.5) == 1
        assert "No space left" in agent.status.reason
        assert snapshot(net) == before, "the old conflist is intact"
        assert sorted(os.listdir(net)) == ["10-calico.conflist"], "no temp file left behind"
        (mount / "filler").unlink()
        assert Agent(config).reconcile()[0], "installs once there is room again"
        assert plugin_types(net / "10-calico.conflist")[-1] == "mesh-cni"
