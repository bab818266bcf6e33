"""Where the plugin learns a pod's annotations: from the runtime, else from the API server.

containerd and CRI-O pass every pod annotation in ``runtimeConfig`` when the conflist entry
declares the ``io.kubernetes.cri.pod-annotations`` capability, so the usual ADD needs no API
call. Otherwise we GET the pod with the kubeconfig named in the config, using only the standard
library (http.client + ssl), with bounded timeouts and retries. Transient failures map to CNI
code 11 (try again later) so the runtime retries: a pod that may need redirecting never starts
unredirected because the API was briefly away.
"""

from __future__ import annotations

import os
import time

from cni import fastjson
from cni.spec import POD_ANNOTATIONS_CAPABILITY, POD_LOOKUP_FAILED, TRY_AGAIN_LATER, CniError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (hot path)
if TYPE_CHECKING:
    from collections.abc import Mapping


def runtime_annotations(config: Mapping[str, object]) -> dict[str, str] | None:
    """Pod annotations passed by the runtime, or None when it passed none."""
    runtime = config.get("runtimeConfig")
    if not isinstance(runtime, dict):
        return None
    annotations = runtime.get(POD_ANNOTATIONS_CAPABILITY)
    if not isinstance(annotations, dict):
        return None
    return {str(k): str(v) for k, v in annotations.items()}


class Kubeconfig:
    """The parts of a kubeconfig needed for one authenticated GET."""

    def __init__(self, server: str, ca_file: str | None = None, ca_data: bytes | None = None,
                 token: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 insecure: bool = False) -> None:
        self.server = server.rstrip("/")
        self.ca_file = ca_file
        self.ca_data = ca_data
        self.token = token
        self.cert_file = cert_file
        self.key_file = key_file
        self.insecure = insecure


def _load_document(path: str) -> dict:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        document = fastjson.loads(raw)
    except ValueError:
        try:
            import yaml  # kubeconfigs are usually YAML; JSON ones need no parser beyond stdlib
        except ImportError:
            raise CniError(7, f"kubeconfig {path} is not JSON and PyYAML is not available") from None
        document = yaml.safe_load(raw)
    if not isinstance(document, dict):
        raise CniError(7, f"kubeconfig {path} is not a mapping")
    return document


def _named(items: object, name: str, key: str) -> dict:
    for item in items or []:  # type: ignore[attr-defined]
        if isinstance(item, dict) and item.get("name") == name:
            return item.get(key) or {}
    return {}


def load_kubeconfig(path: str) -> Kubeconfig:
    """Parse the current context of a kubeconfig; relative file paths are relative to it."""
    import base64

    try:
        document = _load_document(path)
    except OSError as error:
        raise CniError(7, f"cannot read kubeconfig {path}: {error.strerror}") from None
    base = os.path.dirname(os.path.abspath(path))
    context_name = document.get("current-context") or ""
    contexts = document.get("contexts") or []
    context = _named(contexts, context_name, "context") if context_name else (
        (contexts[0] or {}).get("context", {}) if contexts else {})
    cluster = _named(document.get("clusters"), context.get("cluster", ""), "cluster")
    user = _named(document.get("users"), context.get("user", ""), "user")
    if not cluster.get("server"):
        raise CniError(7, f"kubeconfig {path} has no server for context {context_name!r}")

    def file_of(key: str) -> str | None:
        value = cluster.get(key) if key.startswith("certificate-authority") else user.get(key)
        if not value:
            return None
        return value if os.path.isabs(value) else os.path.join(base, value)

    def data_of(source: dict, key: str) -> bytes | None:
        value = source.get(key)
        return base64.b64decode(value) if value else None

    token = user.get("token")
    if not token and user.get("tokenFile"):
        with open(file_of("tokenFile") or user["tokenFile"]) as handle:
            token = handle.read().strip()
    config = Kubeconfig(server=cluster["server"], ca_file=file_of("certificate-authority"),
                        ca_data=data_of(cluster, "certificate-authority-data"), token=token,
                        cert_file=file_of("client-certificate"), key_file=file_of("client-key"),
                        insecure=bool(cluster.get("insecure-skip-tls-verify")))
    cert_data, key_data = data_of(user, "client-certificate-data"), data_of(user, "client-key-data")
    if cert_data and key_data:
        config.cert_file, config.key_file = _private_files(cert_data, key_data)
    return config


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


def get_pod(kubeconfig: Kubeconfig, namespace: str, name: str, *, timeout: float = 2.0,
            attempts: int = 3) -> dict:
    """GET the pod; transient failures retried with backoff, then CniError(11); 4xx -> CniError(102)."""
    import http.client
    import ssl
    import urllib.parse

    url = urllib.parse.urlsplit(kubeconfig.server)
    quote = urllib.parse.quote
    path = f"{url.path.rstrip('/')}/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"
    headers = {"Accept": "application/json", "User-Agent": "mesh-cni"}
    if kubeconfig.token:
        headers["Authorization"] = f"Bearer {kubeconfig.token}"
    context = None
    if url.scheme == "https":
        context = ssl.create_default_context(
            cafile=kubeconfig.ca_file,
            cadata=kubeconfig.ca_data.decode() if kubeconfig.ca_data else None)
        if kubeconfig.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if kubeconfig.cert_file and kubeconfig.key_file:
            context.load_cert_chain(kubeconfig.cert_file, kubeconfig.key_file)
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(min(0.2 * 2 ** (attempt - 1), 1.0))
        try:
            if context is not None:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    url.hostname or "", url.port or 443, timeout=timeout, context=context)
            else:
                connection = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=timeout)
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as error:
            last = f"{type(error).__name__}: {error}"
            continue
        if response.status == 200:
            pod = fastjson.loads(body)
            if not isinstance(pod, dict):
                raise CniError(POD_LOOKUP_FAILED, f"pod {namespace}/{name}: the API server sent no object")
            return pod
        if response.status == 429 or response.status >= 500:
            last = f"HTTP {response.status}"
            continue
        raise CniError(POD_LOOKUP_FAILED, f"cannot read pod {namespace}/{name} from {kubeconfig.server}: "
                       f"HTTP {response.status}", body[:300].decode(errors="replace"))
    raise CniError(TRY_AGAIN_LATER, f"the API server {kubeconfig.server} is unreachable; cannot read pod "
                   f"{namespace}/{name} to decide its redirect (failing closed, retry later)", last)


def api_annotations(kubeconfig_path: str, namespace: str, name: str, uid: str | None, *,
                    timeout: float = 2.0, attempts: int = 3) -> dict[str, str]:
    pod = get_pod(load_kubeconfig(kubeconfig_path), namespace, name, timeout=timeout, attempts=attempts)
    metadata = pod.get("metadata") or {}
    if uid and metadata.get("uid") and metadata["uid"] != uid:
        raise CniError(TRY_AGAIN_LATER,
                       f"pod {namespace}/{name} on the API server has uid {metadata['uid']}, "
                       f"not {uid} (recreated?)")
    annotations = metadata.get("annotations") or {}
    return {str(k): str(v) for k, v in annotations.items()}
