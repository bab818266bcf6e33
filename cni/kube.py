"""The one Kubernetes client of the CNI side: the plugin's pod GET and the agent's REST + watch.

Standard library HTTP on purpose: the plugin is a fresh process per pod and the agent idles on
every node for the node's lifetime; the ``kubernetes`` client costs ~40 MiB RSS and half a
second of imports for a handful of REST calls. ``KubeApi`` only moves JSON; what to ask and what
the answers mean lives with the callers (cni.plugin, cni.repair).
"""

from __future__ import annotations

import http.client
import os
import ssl
import urllib.parse

from cni import fastjson

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the plugin imports us)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any


class ApiError(RuntimeError):
    """The API server answered with an HTTP error status."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"API answered {status}: {body[:300]}")


class KubeconfigError(ValueError):
    """A kubeconfig we cannot use (unreadable, not a mapping, no server)."""


class KubeApi:
    """JSON over HTTP(S) to one API server.

    Credentials: a bearer ``token``, or a ``token_file`` re-read on every call (projected
    service-account tokens rotate), and/or a client certificate; the server's CA from a file or
    inline PEM data.
    """

    def __init__(self, server: str, token_file: str | None = None, ca_file: str | None = None, *,
                 token: str | None = None, ca_data: bytes | None = None, cert_file: str | None = None,
                 key_file: str | None = None, insecure: bool = False, timeout_s: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.ca_file = ca_file
        self.token = token
        self.ca_data = ca_data
        self.cert_file = cert_file
        self.key_file = key_file
        self.insecure = insecure
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None

    @classmethod
    def from_kubeconfig(cls, path: str, *, timeout_s: float = 10.0) -> KubeApi:
        """The current context of a kubeconfig; relative file paths are relative to it."""
        return _from_kubeconfig(path, timeout_s)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context(
                cafile=self.ca_file, cadata=self.ca_data.decode() if self.ca_data else None)
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.cert_file and self.key_file:
                context.load_cert_chain(self.cert_file, self.key_file)
            self._context = context
        return self._context

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        url = urllib.parse.urlsplit(self.server)
        host = url.hostname or ""
        if url.scheme == "http":
            return http.client.HTTPConnection(host, url.port or 80, timeout=timeout)
        return http.client.HTTPSConnection(host, url.port or 443, timeout=timeout,
                                           context=self._ssl_context())

    def _path(self, path: str) -> str:
        return urllib.parse.urlsplit(self.server).path.rstrip("/") + path

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "mesh-cni"}
        token = self.token
        if self.token_file:
            with open(self.token_file) as handle:
                token = handle.read().strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                timeout_s: float | None = None) -> dict[str, Any]:
        """One call; ApiError on an HTTP error status, OSError/HTTPException when unreachable."""
        payload = None
        if body is not None:
            import json

            payload = json.dumps(body).encode()
        conn = self._connection(self.timeout_s if timeout_s is None else timeout_s)
        try:
            conn.request(method, self._path(path), body=payload,
                         headers=self._headers(content_type if payload else None))
            response = conn.getresponse()
            text = response.read().decode(errors="replace")
        finally:
            conn.close()
        if response.status >= 400:
            raise ApiError(response.status, text)
        document = fastjson.loads(text) if text else {}
        if not isinstance(document, dict):
            raise ApiError(response.status, f"not a JSON object: {text[:100]}")
        return document

    def watch(self, path: str, *, timeout_s: int = 60) -> Iterator[dict[str, Any]]:
        """Stream watch events (one JSON object per line) until the server ends the watch."""
        sep = "&" if "?" in path else "?"
        conn = self._connection(timeout_s + 10)
        try:
            conn.request("GET", self._path(f"{path}{sep}watch=true&timeoutSeconds={timeout_s}"),
                         headers=self._headers(None))
            response = conn.getresponse()
            if response.status >= 400:
                raise ApiError(response.status, response.read().decode(errors="replace"))
            while True:
                line = response.readline()
                if not line:
                    return
                if line.strip():
                    event = fastjson.loads(line)
                    if isinstance(event, dict):
                        yield event
        finally:
            conn.close()

    def get_pod(self, namespace: str, name: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        quote = urllib.parse.quote
        return self.request("GET", f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}",
                            timeout_s=timeout_s)


# --- kubeconfig files -----------------------------------------------------------------------------


def _load_document(path: str) -> dict:
    with open(path, "rb") as handle:
        raw = handle.read(1 << 20)
    try:
        document = fastjson.loads(raw)
    except ValueError:
        try:
            import yaml  # kubeconfigs are usually YAML; the installer's are JSON (no parser needed)
        except ImportError:
            raise KubeconfigError(f"kubeconfig {path} is not JSON and PyYAML is not available") from None
        document = yaml.safe_load(raw)
    if not isinstance(document, dict):
        raise KubeconfigError(f"kubeconfig {path} is not a mapping")
    return document


def _named(items: object, name: str, key: str) -> dict:
    for item in items or []:  # type: ignore[attr-defined]
        if isinstance(item, dict) and item.get("name") == name:
            return item.get(key) or {}
    return {}


def _from_kubeconfig(path: str, timeout_s: float) -> KubeApi:
    import base64

    try:
        document = _load_document(path)
    except OSError as error:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {error.strerror}") from None
    base = os.path.dirname(os.path.abspath(path))
    context_name = document.get("current-context") or ""
    contexts = document.get("contexts") or []
    context = _named(contexts, context_name, "context") if context_name else (
        (contexts[0] or {}).get("context", {}) if contexts else {})
    cluster = _named(document.get("clusters"), context.get("cluster", ""), "cluster")
    user = _named(document.get("users"), context.get("user", ""), "user")
    if not cluster.get("server"):
        raise KubeconfigError(f"kubeconfig {path} has no server for context {context_name!r}")

    def file_of(source: dict, key: str) -> str | None:
        value = source.get(key)
        if not value:
            return None
        return value if os.path.isabs(value) else os.path.join(base, value)

    def data_of(source: dict, key: str) -> bytes | None:
        value = source.get(key)
        return base64.b64decode(value) if value else None

    api = KubeApi(str(cluster["server"]), file_of(user, "tokenFile"),
                  file_of(cluster, "certificate-authority"),
                  token=user.get("token"), ca_data=data_of(cluster, "certificate-authority-data"),
                  cert_file=file_of(user, "client-certificate"), key_file=file_of(user, "client-key"),
                  insecure=bool(cluster.get("insecure-skip-tls-verify")), timeout_s=timeout_s)
    cert_data, key_data = data_of(user, "client-certificate-data"), data_of(user, "client-key-data")
    if cert_data and key_data:
        api.cert_file, api.key_file = _private_files(cert_data, key_data)
    return api


def _private_files(cert: bytes, key: bytes) -> tuple[str, str]:
    """ssl loads client certificates only from files: write them to a private temp dir."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="mesh-cni-")
    paths = []
    for name, data in (("tls.crt", cert), ("tls.key", key)):
        file_path = os.path.join(directory, name)
        fd = os.open(file_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        paths.append(file_path)
    return paths[0], paths[1]
