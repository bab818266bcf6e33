"""The real Istio as an oracle: istioctl's offline manifest generate + kube-inject, beside our core.

Istio's files (injector ConfigMap ``config`` and ``values``, mesh config) are generated here at
test time by the pinned ``istioctl manifest generate`` and never committed. A mode is a capture
mode (Istio CNI on gives ``istio-validation``, off gives ``istio-init``) and a native-sidecar
setting; each is one Istio installation and one equivalent config of ours.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from injector.config import InjectorConfig, compile_config
from injector.core import inject
from injector.result import Decision

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "istio"
CACHE = Path(os.environ.get("MESH_INJECTOR_CACHE", Path.home() / ".cache" / "mesh-injector"))

INJECTED, SKIPPED, REFUSED = "injected", "skipped", "refused"


def release() -> dict[str, str]:
    """tools/istio/release.env as a mapping (branch, commit, the release's image tag)."""
    out = {}
    for line in (TOOLS / "release.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def version() -> str:
    rel = release()
    return f"{rel['ISTIO_BRANCH']}-{rel['ISTIO_COMMIT']}"


def bin_dir() -> Path:
    """Where scripts/setup.d/60-istio.sh puts the binaries for the current pin."""
    return CACHE / f"istio-{version()}" / "bin"


def istioctl() -> Path | None:
    path = bin_dir() / "istioctl"
    return path if os.access(path, os.X_OK) else None


@dataclass(frozen=True)
class Mode:
    """One Istio installation and the config of ours meant to be equivalent to it."""

    capture: str  # "cni" (Istio CNI on: istio-validation) or "init" (istio-init)
    native: bool  # native sidecars (Istio: ENABLE_NATIVE_SIDECARS; ours: values.proxy.nativeSidecars)

    @property
    def name(self) -> str:
        return f"{self.capture}-{'native' if self.native else 'classic'}"


MODES = tuple(Mode(c, n) for c in ("cni", "init") for n in (False, True))


@dataclass(frozen=True)
class Outcome:
    decision: str
    obj: dict[str, Any] | None  # the object as output (None when refused)
    message: str = ""


def run(cmd: list[str], *, env: dict[str, str] | None = None, stdin: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


@cache
def istio_files(capture: str) -> Path:
    """Run ``istioctl manifest generate`` for a capture mode; keep the injector's and mesh's files.

    The hub and tag are the release's (tools/istio/release.env), so the image Istio injects is
    the one its release ships; everything else is the default profile.
    """
    tool = istioctl()
    assert tool is not None, f"istioctl missing under {bin_dir()}: run scripts/setup.d/60-istio.sh"
    rel = release()
    cmd = [str(tool), "manifest", "generate", "--set", "hub=docker.io/istio",
           "--set", f"tag={rel['ISTIO_PROXY_TAG']}"]
    if capture == "cni":
        cmd += ["--set", "components.cni.enabled=true"]
    proc = run(cmd)
    assert proc.returncode == 0, f"istioctl manifest generate failed: {proc.stderr[-2000:]}"
    out = Path(tempfile.mkdtemp(prefix=f"istio-{capture}-"))
    # Kept for the whole process (the result is cached), removed when it exits.
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    found = set()
    for doc in yaml.load_all(proc.stdout, Loader=yaml.CSafeLoader):
        if not isinstance(doc, dict) or doc.get("kind") != "ConfigMap":
            continue
        name, data = doc["metadata"]["name"], doc.get("data") or {}
        if name == "istio-sidecar-injector":
            (out / "inject-config.yaml").write_text(data["config"])
            (out / "values.json").write_text(data["values"])
            found.add(name)
        elif name == "istio":
            (out / "mesh.yaml").write_text(data["mesh"])
            found.add(name)
    assert found == {"istio-sidecar-injector", "istio"}, f"manifest generate gave only {found}"
    return out


def istio_inject(objs: list[dict[str, Any]], mode: Mode) -> list[Outcome]:
    """istioctl kube-inject, offline, on each object: one call for all, and one more after each
    object it refuses (a refused object ends istioctl's run over the file)."""
    files = istio_files(mode.capture)
    env = {"ENABLE_NATIVE_SIDECARS": "true" if mode.native else "false"}

    def call(batch: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        return run([str(istioctl()), "kube-inject", "--revision", "default", "-f", "-",
                    "--injectConfigFile", str(files / "inject-config.yaml"),
                    "--meshConfigFile", str(files / "mesh.yaml"),
                    "--valuesFile", str(files / "values.json")],
                   env=env, stdin=yaml.dump_all(batch, Dumper=yaml.CSafeDumper))

    out: list[Outcome] = []
    rest = list(objs)
    while rest:
        proc = call(rest)
        # istioctl writes each object as it goes and stops at the first it refuses: what it
        # wrote are the objects before that one.
        docs = [d for d in yaml.load_all(proc.stdout, Loader=yaml.CSafeLoader) if d is not None]
        out.extend(Outcome(INJECTED if _istio_injected(d) else SKIPPED, d, proc.stderr) for d in docs)
        if proc.returncode == 0:
            assert len(docs) == len(rest), f"istioctl gave {len(docs)} objects for {len(rest)}"
            break
        assert len(docs) < len(rest), f"istioctl failed after all objects: {proc.stderr[-500:]}"
        out.append(Outcome(REFUSED, None, proc.stderr.strip()))
        rest = rest[len(docs) + 1:]
    return out


def _istio_injected(obj: dict[str, Any]) -> bool:
    if obj.get("kind") == "List":
        return any(_istio_injected(i) for i in obj.get("items") or [] if isinstance(i, dict))
    meta = pod_metadata(obj)
    return "sidecar.istio.io/status" in (meta.get("annotations") or {})


@cache
def our_config(mode: Mode) -> InjectorConfig:
    """Our defaults with the mode's capture and native-sidecar settings: nothing else changed,
    so a default that differs from Istio's shows up as a difference."""
    return compile_config({"values": {"proxy": {
        "capture": mode.capture, "nativeSidecars": "true" if mode.native else "false"}}})


def our_inject(objs: Iterable[dict[str, Any]], mode: Mode) -> list[Outcome]:
    """Our core on each object, as the webhook sees it (selectors already applied)."""
    out = []
    for obj in objs:
        result = inject(obj, config=our_config(mode))
        if result.decision is Decision.REJECT:
            out.append(Outcome(REFUSED, None, f"{result.reason.code}: {result.reason.message}"))
        elif result.decision is Decision.INJECT:
            out.append(Outcome(INJECTED, result.mutated))
        else:
            out.append(Outcome(SKIPPED, result.mutated, result.reason.code))
    return out


_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"), "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"), "Job": ("spec", "template"),
    "DeploymentConfig": ("spec", "template"),  # OpenShift's; in istioctl's kind table too
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod (or pod template) inside a Pod or workload."""
    node: Any = obj
    for key in _TEMPLATE_PATHS.get(obj.get("kind") or "Pod", ()):
        node = (node or {}).get(key)
    return node if isinstance(node, dict) else None


def pod_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    """The metadata injection reads and writes. Istio takes a CronJob's from
    ``spec.jobTemplate.metadata`` (the Job's, not the pod template's): an Istio quirk that the
    differential looks through, listing it as one intended difference."""
    if obj.get("kind") == "CronJob" and "sidecar.istio.io/status" in (
            ((obj.get("spec") or {}).get("jobTemplate") or {}).get("metadata") or {}).get("annotations", {}):
        return obj["spec"]["jobTemplate"]["metadata"]
    return (pod_template(obj) or {}).get("metadata") or {}
