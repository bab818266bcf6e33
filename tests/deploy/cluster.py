"""Putting the rendered manifests on the shared loopback control plane without disturbing others.

The control plane is shared by the whole test session, and our webhook has `failurePolicy: Fail`.
So what is applied *for real* differs from the rendered objects in three stated ways:
- each webhook's namespaceSelector also requires a label only this test run's namespaces carry;
- the webhook calls a server on loopback by URL (there is no node to run the Deployment);
- the Deployment is scaled to 0 and the DaemonSet pinned to no node (no images here).
Everything else, RBAC above all, is applied exactly as rendered.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO
from tests.deploy.manifests import find, to_yaml

RUN_LABEL = "mesh-injector.io/deploy-test"


def harmless(objs: list[dict[str, Any]], *, run_id: str, webhook_url: str | None) -> list[dict[str, Any]]:
    out = copy.deepcopy(objs)
    webhook = find(out, "MutatingWebhookConfiguration", "mesh-injector")
    for hook in webhook["webhooks"]:
        hook["namespaceSelector"].setdefault("matchExpressions", []).append(
            {"key": RUN_LABEL, "operator": "In", "values": [run_id]}
        )
        if webhook_url:
            hook["clientConfig"] = {"url": webhook_url}
    find(out, "Deployment", "mesh-injector")["spec"]["replicas"] = 0
    daemonset = find(out, "DaemonSet", "mesh-cni-node")
    daemonset["spec"]["template"]["spec"]["nodeSelector"] = {RUN_LABEL: "no-such-node"}
    return out


def without_namespace(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [copy.deepcopy(o) for o in objs if o["kind"] != "Namespace"]


def apply(control_plane: Any, objs: list[dict[str, Any]], *extra: str) -> str:
    return control_plane.kubectl("apply", *extra, "-f", "-", input=to_yaml(objs)).stdout


def delete(control_plane: Any, objs: list[dict[str, Any]]) -> None:
    """Remove what we applied, except the namespace (re-creating a terminating one would race)."""
    control_plane.kubectl(
        "delete",
        "--ignore-not-found",
        "--wait=false",
        "-f",
        "-",
        input=to_yaml(without_namespace(objs)),
        check=False,
    )


def write_kubeconfig(path: Path, control_plane: Any, token: str) -> Path:
    """A kubeconfig acting as a service account (its token), against the loopback API server."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "cp",
                "cluster": {
                    "server": control_plane.server,
                    "certificate-authority": str(control_plane.ca_file),
                },
            }
        ],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "cp", "user": "sa"}}],
        "current-context": "sa",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def cli(*args: str) -> list[str]:
    """How a user runs `mesh-injector ...` from this checkout: the console script."""
    script = Path(sys.executable).parent / "mesh-injector"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from injector.cli import main; sys.exit(main())", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO, env=env
    )
