"""Running the real webhook server for tests: a `mesh-injector serve` process on loopback HTTPS.

Certificates are laid out the way the kubelet mounts a Secret (``..data`` symlink to a
timestamped directory, ``tls.crt``/``tls.key`` symlinks through it) so rotation tests swap them
exactly as Kubernetes does.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from injector import pki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SecretDir:
    """A directory like a mounted ``kubernetes.io/tls`` Secret, updated by an atomic symlink swap."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.generation = 0

    @property
    def cert_file(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.root / "tls.key"

    def write(self, pair: pki.KeyPair) -> None:
        self.generation += 1
        version = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self.generation}"
        version.mkdir()
        (version / "tls.crt").write_bytes(pair.cert_pem)
        (version / "tls.key").write_bytes(pair.key_pem)
        tmp_link = self.root / "..data_tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(version.name)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        os.replace(tmp_link, self.root / "..data")  # the atomic step
        for name in ("tls.crt", "tls.key"):
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")
        if old is not None and old != version:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class Pki:
    ca: pki.KeyPair
    ca_file: Path

    def serving(self, names: Sequence[str] = ("127.0.0.1", "localhost")) -> pki.KeyPair:
        return pki.issue_serving_cert(self.ca, names)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


def make_pki(directory: Path) -> Pki:
    ca = pki.make_ca("mesh-injector test CA")
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    return Pki(ca, ca_file)


def tls_connect(server: RunningServer, ctx: ssl.SSLContext | None = None,
                timeout: float = 10.0) -> ssl.SSLSocket:
    """A raw TLS connection to the server (for speaking HTTP byte by byte)."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return (ctx or server.pki.ssl_context()).wrap_socket(raw, server_hostname="127.0.0.1")


def read_response(conn: ssl.SSLSocket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    conn.settimeout(timeout)
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return data


def inject_bytes(body: bytes, target: str = "/inject", extra: str = "") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


Response = tuple[bytes, dict[bytes, bytes], bytes]


def split_response(data: bytes) -> tuple[Response, bytes] | None:
    """The first whole response in ``data`` (status line, headers, body) and what follows it,
    or None while it is incomplete (responses are Content-Length framed)."""
    head, found, rest = data.partition(b"\r\n\r\n")
    if not found:
        return None
    status, *lines = head.split(b"\r\n")
    headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines)}
    length = int(headers[b"content-length"])
    if len(rest) < length:
        return None
    return (status, headers, rest[:length]), rest[length:]


def read_n(conn: ssl.SSLSocket, count: int) -> list[Response]:
    """Read until ``count`` whole responses arrived (the connection stays open)."""
    out: list[Response] = []
    data = b""
    while True:
        while (found := split_response(data)) is not None:
            response, data = found
            out.append(response)
        if len(out) >= count:
            return out
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {len(out)} responses and {data[:300]!r}"
        data += chunk


def duplex(conn: ssl.SSLSocket, payload: bytes, done: Callable[[bytes], bool],
           timeout: float = 60.0) -> bytes:
    """Send ``payload`` while reading what comes back, from this one thread, until
    ``done(received)`` or the server closes; returns what was received.

    A client that must write more than the server reads before answering (pipelined requests,
    a flood the server cuts off) needs to read while it writes. One SSLSocket must not be
    written by one thread while another reads it (OpenSSL's rule for one SSL object): a sender
    thread beside the reader made the read see a false end of stream under load.
    """
    conn.setblocking(False)
    view, sent, received = memoryview(payload), 0, b""
    deadline = time.monotonic() + timeout
    try:
        while not done(received):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"sent {sent} of {len(view)} bytes, received {len(received)}")
            writing = sent < len(view)
            if conn.pending():
                readable, writable = True, False
            else:
                ready_r, ready_w, _ = select.select([conn], [conn] if writing else [], [], left)
                readable, writable = bool(ready_r), bool(ready_w)
            if writable:
                try:
                    sent += conn.send(view[sent:sent + 256 * 1024])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass  # retried with the same bytes, as OpenSSL requires
                except OSError:
                    sent = len(view)  # the server hung up mid-send: read what it said
            if readable:
                try:
                    chunk = conn.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                except (ssl.SSLError, ConnectionError):
                    chunk = b""
                if not chunk:
                    break
                received += chunk
    finally:
        conn.setblocking(True)
    return received


def serve_command() -> list[str]:
    """``mesh-injector`` as a user runs it: the installed console script, else its entry point."""
    script = Path(sys.executable).parent / "mesh-injector"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from injector.cli import main; sys.exit(main())"]


@dataclass
class RunningServer:
    url: str
    port: int
    pki: Pki
    secret: SecretDir
    process: subprocess.Popen[bytes]
    log_file: Path
    config_dir: Path | None = None
    args: list[str] = field(default_factory=list)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.pki.ssl_context(), **{"timeout": 10.0, **kwargs})

    def logs(self) -> list[dict[str, Any]]:
        """The server's log lines, including those of every request answered so far.

        The server writes a review's line after sending the answer, so a client can hold the
        answer before the line exists. One more request first is a barrier: the event loop
        does that bookkeeping at the start of its next turn, before it reads anything else."""
        if self.process.poll() is None:
            try:
                with self.client() as client:
                    client.get("/healthz")
            except httpx.HTTPError:
                pass  # stopping or stopped: the log is as complete as it will get
        out = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(
    workdir: Path,
    *,
    config_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    server_pki: Pki | None = None,
    names: Sequence[str] = ("127.0.0.1", "localhost"),
    timeout: float = 30.0,
    workers: int = 1,
    nofile: int | None = None,
) -> RunningServer:
    """Start ``mesh-injector serve``; ``nofile`` lowers its RLIMIT_NOFILE (soft and hard)."""
    workdir.mkdir(parents=True, exist_ok=True)
    server_pki = server_pki or make_pki(workdir)
    secret = SecretDir(workdir / "tls")
    secret.write(server_pki.serving(names))
    port = free_port()
    log_file = workdir / f"server-{port}.log"
    args = [
        *serve_command(), "serve", "--address", "127.0.0.1", "--port", str(port),
        "--tls-cert-file", str(secret.cert_file), "--tls-key-file", str(secret.key_file),
        "--tls-reload-interval", "0.2", "--config-reload-interval", "0.2", "--workers", str(workers),
        *(["--config-dir", str(config_dir)] if config_dir else []), *extra_args,
    ]
    proc_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    # The server's temporary files (its workers' metrics directory) inside the test's own dir: a
    # server a test kills with SIGKILL cannot remove them itself.
    proc_env["TMPDIR"] = str(workdir)
    proc_env.update(env or {})
    with log_file.open("wb") as log:
        def limit_fds() -> None:
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=proc_env,
                                   preexec_fn=limit_fds)
    server = RunningServer(f"https://127.0.0.1:{port}", port, server_pki, secret, process, log_file,
                           config_dir, args)
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_file.read_text()}")
            try:
                if client.get("/readyz").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server not ready after {timeout}s:\n{log_file.read_text()}")
            time.sleep(0.05)


# --- AdmissionReview builders -------------------------------------------------------------------


def typical_pod(name: str = "web", **meta: Any) -> dict[str, Any]:
    """A pod like a Deployment makes: three containers, probes on named and numbered ports."""
    metadata: dict[str, Any] = {"generateName": f"{name}-5d9c7b-", "labels": {"app": name}}
    metadata.update(meta)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [
                {"name": "app", "image": "nginx:1.25", "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                 "livenessProbe": {"tcpSocket": {"port": 8080}}},
                {"name": "worker", "image": "busybox", "command": ["sh", "-c", "sleep 1d"]},
                {"name": "metrics", "image": "prom/exporter", "ports": [{"containerPort": 9100}]},
            ]
        },
    }


def review(
    obj: Mapping[str, Any] | None,
    *,
    api_version: str = "admission.k8s.io/v1",
    operation: str = "CREATE",
    namespace: str = "apps",
    kind: Any = None,
    resource: str = "pods",
    dry_run: bool = False,
    uid: str | None = None,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": kind if kind is not None else {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": resource},
        "operation": operation,
        "namespace": namespace,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "dryRun": dry_run,
    }
    if obj is not None:
        request["object"] = obj
    return {"apiVersion": api_version, "kind": "AdmissionReview", "request": request}


def decoded_patch(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    body = response["response"]
    assert body.get("patchType") == "JSONPatch"
    return json.loads(base64.b64decode(body["patch"]))
