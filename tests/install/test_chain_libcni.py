"""The chain the installer writes, run by libcni on real network namespaces, redirects traffic.

Reuses the plugin team's harness (``tests.cni.cnitest``): reference bridge + host-local plugins
and our libcni driver. Here the conflist and the ``mesh-cni`` binary are the ones the installer
put there, and libcni runs inside a private mount namespace where every host Python, the venv
and this repository are hidden: the plugin can only be the installed, self-contained runtime.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni.install.agent import Agent, AgentConfig
from cni.install.conflist import EntryOptions
from tests.cni import cnitest
from tests.conftest import REPO

OUT = 15001


def _hiding_driver(tmp: Path) -> Path:
    """A wrapper running the libcni driver in a private mount namespace where host Pythons, the
    venv, this repository and /usr/bin (so also /bin/sh on merged-/usr hosts) are hidden."""
    hidden = {Path(sys.base_prefix), Path(sys.prefix), REPO, *Path("/usr/lib").glob("python3*")}
    hidden.add(Path("/usr/local/lib"))
    lines = ["set -e"]
    outermost = [
        p for p in sorted(hidden) if p.is_dir() and not any(p != q and p.is_relative_to(q) for q in hidden)
    ]
    lines += [f"mount -t tmpfs -o ro,size=4k hidden '{p}'" for p in outermost]
    lines += ["mount -t tmpfs -o ro,size=4k hidden /usr/bin", f"exec '{cnitest.DRIVER}' \"$@\""]
    inner = tmp / "driver-inner.sh"
    inner.write_text("\n".join(lines) + "\n")
    wrapper = tmp / "driver-without-python"
    wrapper.write_text(f'#!/bin/sh\nexec unshare -m --propagation private /bin/sh {inner} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture
def installed_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    from tests.cni.conftest import require_bed

    require_bed()
    bed = cnitest.CniBed(tmp_path / "bed")
    network = bed.conflist("meshnet", with_plugin=False)  # the node's primary: bridge only
    primary = bed.conf_dir / "meshnet.conflist"
    before = primary.read_bytes()
    runtime = tmp_path / "opt-mesh-cni"  # its own: uninstall removes it
    config = AgentConfig(
        cni_bin_dir=bed.bin_dir,
        cni_net_dir=bed.conf_dir,
        runtime_dir=runtime,
        state_dir=tmp_path / "state",
        kubeconfig=tmp_path / "state" / "kubeconfig",
        entry=EntryOptions(
            kubeconfig=str(tmp_path / "state" / "kubeconfig"), log_file=str(bed.log_file), log_level="debug"
        ),
        health_port=None,
    )
    agent = Agent(config)
    assert agent.reconcile()[0]
    monkeypatch.setattr(cnitest, "DRIVER", _hiding_driver(tmp_path))
    try:
        yield bed, network, agent
    finally:
        bed.cleanup(network)
        agent.uninstall()
        assert primary.read_bytes() == before


def test_installed_chain_redirects_outbound_traffic(installed_bed: tuple) -> None:
    bed, network, agent = installed_bed
    conflist = json.loads((bed.conf_dir / "meshnet.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "mesh-cni"]
    assert (bed.bin_dir / "mesh-cni").read_bytes().startswith(f"#!{agent.config.runtime_dir}".encode())

    server = bed.add_pod(network, {}, name="server")
    pod = bed.add_pod(network, cnitest.INJECTED)
    with cnitest.Listeners(pod, (OUT,)) as local, cnitest.Listeners(server, (8080,)) as remote:
        assert cnitest.connect(pod, server.ipv4, 8080) == "connected"
        landing = local.next()
        assert landing is not None and landing.port == OUT and landing.original == (server.ipv4, 8080)
        assert remote.next(0.3) is None
    assert "mesh_cni" in cnitest.nft_ruleset(pod.netns)
    assert "mesh_cni" not in cnitest.nft_ruleset(server.netns), "uninjected pods are left alone"


def test_uninstalled_chain_no_longer_calls_the_plugin(installed_bed: tuple) -> None:
    bed, network, agent = installed_bed
    agent.uninstall()
    pod = bed.add_pod(network, cnitest.INJECTED)
    assert "mesh_cni" not in cnitest.nft_ruleset(pod.netns)
