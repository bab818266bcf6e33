"""Fixtures of the end-to-end suite: the real node with our installer chained in and our webhook.

Package-scoped: images imported once, one webhook server, one installer process, all stopped
when the last e2e test is done (other suites use the same node: tests/install runs its own
installer there and must find the node's CNI config as it came). Tests that stop the
installer (to show a pod without redirect, or the uninstall) leave it to `mesh` to start it
again for the next test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import Installer, Webhook, import_mesh_images
from tests.install.conftest import snapshot

#: The buildah-built images take minutes and gigabytes to make (tests/e2e/build_images_buildah.sh);
#: their test is opt-in, so it is not collected at all unless asked for (never a silent skip).
collect_ignore = [] if os.environ.get("MESH_BUILDAH_IMAGES") else ["test_buildah_images.py"]


@pytest.fixture(scope="package")
def pristine_cni(node: Any) -> dict[str, tuple[bytes, int]]:
    """The node's CNI conf and bin dirs before our installer first ran (bytes + modes)."""
    return snapshot(node.cni_conf_dir, node.cni_bin_dir)


@pytest.fixture(scope="package")
def webhook(control_plane: Any, node: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    import_mesh_images(node)
    hook = Webhook.start(control_plane, tmp_path_factory.mktemp("e2e-webhook"))
    try:
        yield hook
    finally:
        hook.stop()


@pytest.fixture(scope="package")
def installer(
    node: Any, pristine_cni: dict[str, tuple[bytes, int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installer]:
    agent = Installer(node, Path(tmp_path_factory.mktemp("e2e-mesh-cni")))
    try:
        yield agent
    finally:
        agent.stop()
    assert snapshot(node.cni_conf_dir, node.cni_bin_dir) == pristine_cni, "uninstall left the node changed"


@pytest.fixture
def mesh(installer: Installer, webhook: Webhook) -> Installer:
    """The installer running (started again if a previous test stopped it) and the webhook up."""
    installer.start()
    return installer
