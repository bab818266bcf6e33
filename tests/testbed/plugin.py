"""pytest fixtures for the real Kubernetes parts (registered from tests/conftest.py).

`control_plane` (session): etcd + kube-apiserver + kube-controller-manager on loopback
(`tests.testbed.controlplane.ControlPlane`). With MESH_CONTROL_PLANE=DIR set, attaches to one
brought up by `python -m tests.testbed.controlplane up --dir DIR` and leaves it running.

`node` (session, needs root): kube-scheduler + containerd + kubelet registered with that control
plane, with the test images imported (`tests.testbed.node.Node`). Torn down at session end,
undoing its host changes.

Missing binaries or capabilities skip locally and fail under CI (`tests.conftest.require`).
Set MESH_TESTBED_KEEP=1 to keep work directories (logs) after the session.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import require
from tests.testbed.controlplane import ControlPlane, missing_binaries

if TYPE_CHECKING:
    from tests.testbed.node import Node


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """A real loopback control plane shared by the whole session; tests isolate by namespace."""
    attach_dir = os.environ.get("MESH_CONTROL_PLANE")
    if attach_dir:
        yield ControlPlane.attach(Path(attach_dir))
        return
    missing = missing_binaries()
    require(
        not missing, "needs the Kubernetes binaries from scripts/setup.d/30-kube.sh: " + ", ".join(missing)
    )
    plane = ControlPlane.start()
    try:
        yield plane
    finally:
        plane.stop()
        if not os.environ.get("MESH_TESTBED_KEEP"):
            shutil.rmtree(plane.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def node(control_plane: ControlPlane) -> Iterator[Node]:
    """A real single node (kubelet + containerd + runc) registered with `control_plane`."""
    from tests.testbed.node import Node, node_prerequisites_missing

    missing = node_prerequisites_missing()
    require(not missing, "needs the real node's parts: " + ", ".join(missing))
    attach_dir = os.environ.get("MESH_NODE")
    if attach_dir:
        yield Node.attach(Path(attach_dir), control_plane)
        return
    started = Node.start(control_plane)
    try:
        yield started
    finally:
        started.stop()
        problems = started.leftovers()
        if not os.environ.get("MESH_TESTBED_KEEP"):
            shutil.rmtree(started.workdir, ignore_errors=True)
    # The teardown is part of what is tested: a host not restored is an error of the session.
    assert not problems, "the node's teardown left host changes behind:\n" + "\n".join(problems)
