"""Uninstalling (SIGTERM to the installer, as when its DaemonSet is deleted) restores the node's
CNI config and bin dirs byte for byte (and modes), and removes the runtime and state it made."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import require_root
from tests.e2e.mesh import Installer
from tests.install.conftest import snapshot

pytestmark = [pytest.mark.node, pytest.mark.root]


def test_uninstall_restores_the_node_cni_config_byte_for_byte(
    node: Any, mesh: Installer, pristine_cni: dict[str, tuple[bytes, int]]
) -> None:
    require_root()
    assert mesh.installed()
    assert snapshot(node.cni_conf_dir, node.cni_bin_dir) != pristine_cni
    assert mesh.stop() == 0
    assert snapshot(node.cni_conf_dir, node.cni_bin_dir) == pristine_cni
    assert not mesh.runtime_dir.exists() and not mesh.state_dir.exists()
    assert not (node.cni_bin_dir / "mesh-cni").exists()
