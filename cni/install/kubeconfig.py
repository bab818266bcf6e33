"""The plugin's kubeconfig, written by the agent: the API server URL and embedded credentials."""

from __future__ import annotations

import base64
import json
from typing import Any


def api_server_url(host: str, port: str | int, scheme: str = "https") -> str:
    """``https://host:port`` with IPv6 literals bracketed (KUBERNETES_SERVICE_HOST may be one)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def render_kubeconfig(*, server: str, token: str, ca_pem: bytes | None, insecure: bool = False) -> bytes:
    """The plugin's kubeconfig as JSON (valid YAML too): the stdlib-only plugin parses it with ``json``.

    The CA and token are embedded, not referenced: the plugin runs on the host, where the
    agent's mounted service-account files do not exist.
    """
    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    body = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "mesh-cni", "user": {"token": token.strip()}}],
        "contexts": [{"name": "mesh-cni", "context": {"cluster": "local", "user": "mesh-cni"}}],
        "current-context": "mesh-cni",
    }
    return (json.dumps(body, indent=2) + "\n").encode()
