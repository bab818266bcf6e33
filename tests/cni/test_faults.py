"""Faults around one pod: the node agent killed mid-ADD, ADD and DEL racing for one container."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cni.cnitest import INJECTED, REPO, CniBed, exec_plugin, nft_ruleset, plugin_config

#: The real agent, killed with SIGKILL inside its handler: before it touches the netns, or after
#: the kernel applied the batch but before it answered (the plugin then cannot know it was done).
DYING_AGENT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from cni import agent, plugin
real_run = plugin.run
def run(env, stdin):
    if sys.argv[2] == "after-apply":
        real_run(env, stdin)
    os.kill(os.getpid(), signal.SIGKILL)
plugin.run = run
agent.serve(sys.argv[1])
"""


def _redirects(netns: str) -> int:
    return nft_ruleset(netns).count("redirect to :15001")


@pytest.mark.parametrize("when", ["before-apply", "after-apply"])
def test_agent_killed_mid_add_the_plugin_falls_back_and_redirects_once(
        bed: CniBed, tmp_path: Path, when: str) -> None:
    reference = bed.new_pod(INJECTED)
    assert exec_plugin(bed, "ADD", plugin_config(bed, annotations=INJECTED), pod=reference)[0] == 0
    path = tmp_path / "agent.sock"
    dying = subprocess.Popen([sys.executable, "-c", DYING_AGENT.format(repo=str(REPO)), str(path), when])
    try:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pod = bed.new_pod(INJECTED)
        config = plugin_config(bed, annotations=INJECTED, agentSocket=str(path))
        code, out, stderr = exec_plugin(bed, "ADD", config, pod=pod)
        assert dying.wait(timeout=20) == -9, "the agent died in the middle of the ADD"
    finally:
        if dying.poll() is None:
            dying.kill()
            dying.wait()
    assert code == 0, (out, stderr)
    check = exec_plugin(bed, "CHECK", plugin_config(bed, annotations=INJECTED), pod=pod)
    assert check[0] == 0, check  # exactly the table ADD programs: no rule twice
    assert nft_ruleset(pod.netns).count("table inet mesh_cni") == 1
    assert _redirects(pod.netns) == _redirects(reference.netns)


def test_concurrent_add_and_del_of_one_container_end_consistent(bed: CniBed) -> None:
    config = plugin_config(bed, annotations=INJECTED)
    for _ in range(8):
        pod = bed.new_pod(INJECTED)
        results: dict[str, tuple[int, object, str]] = {}

        def call(command: str, pod=pod, results=results) -> None:  # type: ignore[no-untyped-def]
            results[command] = exec_plugin(bed, command, config, pod=pod)

        threads = [threading.Thread(target=call, args=(c,)) for c in ("ADD", "DEL")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results["ADD"][0] == 0 and results["DEL"][0] == 0, results
        listing = nft_ruleset(pod.netns)
        if "table inet mesh_cni" in listing:  # ADD came last: the whole table, nothing less
            assert exec_plugin(bed, "CHECK", config, pod=pod)[0] == 0
        assert exec_plugin(bed, "DEL", config, pod=pod)[0] == 0
        assert "table inet mesh_cni" not in nft_ruleset(pod.netns)
