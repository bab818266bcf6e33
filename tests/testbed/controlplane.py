"""A real Kubernetes control plane on loopback: etcd + kube-apiserver + kube-controller-manager.

Binaries come from scripts/setup.d/30-kube.sh and 31-etcd.sh (the Go modules pinned in
tools/kube and tools/etcd, cached under ~/.cache/mesh-injector/{kube,etcd}-<version>/bin).
Everything listens on 127.0.0.1 on free ports and lives in one work directory; `stop()` stops
exactly the processes `start()` started, by pid.

kubectl: `ControlPlane.kubectl()` runs the kubectl built with the other binaries (same version
as the API server: no skew); set MESH_KUBECTL to use another binary.

Command line (for benchmarks and humans):
    python -m tests.testbed.controlplane up [--dir DIR]    # start, print the env to use it
    python -m tests.testbed.controlplane env [--dir DIR]   # print `export KUBECONFIG=...` etc.
    python -m tests.testbed.controlplane down [--dir DIR]  # stop what `up` started, remove DIR
Tests attach to a control plane brought up this way when MESH_CONTROL_PLANE=DIR is set (and then
leave it running); otherwise the `control_plane` fixture starts and stops its own.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.testbed import certs
from tests.testbed.proc import (
    Daemon,
    TestbedError,
    free_port,
    kube_binary,
    load_state,
    pinned_binary,
    save_state,
    start_daemon,
    wait_until,
)

BINARIES = ("kube-apiserver", "kube-controller-manager")
DEFAULT_DIR = Path(tempfile.gettempdir()) / "mesh-injector-testbed" / "controlplane"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
ADMIN_USER = "mesh-admin"
#: Plain users with no roles at all (only system:authenticated), for RBAC tests: name -> uid.
PLAIN_USERS = ("mesh-user-a", "mesh-user-b")


def node_name() -> str:
    """The name the test node registers as: it must resolve to 127.0.0.1, where the kubelet listens.

    The API server reaches the kubelet (exec, logs, port-forward) by the node's Hostname address
    first, so the machine's hostname is used when it resolves to 127.0.0.1, else `localhost`.
    """
    override = os.environ.get("MESH_NODE_NAME")
    if override:
        return override
    host = socket.gethostname().lower()
    try:
        if socket.gethostbyname(host) == "127.0.0.1":
            return host
    except OSError:
        pass
    return "localhost"


def missing_binaries(names: Sequence[str] = BINARIES) -> list[str]:
    """Which of the binaries the control plane needs are not built/cached (empty when ready)."""
    missing = [str(kube_binary(n)) for n in names if not os.access(kube_binary(n), os.X_OK)]
    if not os.access(pinned_binary("etcd"), os.X_OK):
        missing.append(f"{pinned_binary('etcd')} (scripts/setup.d/31-etcd.sh)")
    if kubectl_path() is None:
        missing.append("kubectl (scripts/setup.d/30-kube.sh)")
    return missing


def kubectl_path() -> str | None:
    """The kubectl the test bed runs: $MESH_KUBECTL (a path or a name on PATH), else the built one."""
    chosen = os.environ.get("MESH_KUBECTL") or str(kube_binary("kubectl"))
    if "/" in chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which(chosen)


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError, the message shows what kubectl said."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}:\n{self.stderr}{self.stdout}"


def _write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str) -> None:
    """A kubeconfig with one cluster, one token user and one current context (JSON is valid YAML)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": user}}],
        "current-context": "testbed",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


#: SIGTERM -> SIGKILL for kube-apiserver. Here its graceful shutdown did not end by itself while
#: clients held connections (tests/install's restart test saw it last until the 15 s SIGKILL);
#: all its state is in etcd, so the test bed does not wait that long for it.
APISERVER_STOP_S = 3.0


@dataclass
class ControlPlane:
    """A running loopback control plane (see the module docstring); the fields are contract 6."""

    workdir: Path
    server: str
    token: str
    ca_file: Path
    ca_key_file: Path
    kubeconfig: Path
    etcd_url: str
    node_name: str
    node_token: str
    service_account_key_file: Path
    #: Extra users with no roles (only system:authenticated): name -> bearer token.
    user_tokens: dict[str, str] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    #: False when attached to a control plane someone else started: stop() then leaves it running.
    owned: bool = True
    #: start() made the work dir itself (a temp dir): stop() removes it, logs and all, unless
    #: MESH_KEEP_TESTBED is set (each run used to leave hundreds of MiB in /tmp).
    temporary_workdir: bool = False

    # -- life cycle -------------------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path | None = None, *, timeout: float = 90.0) -> ControlPlane:
        """Start etcd, kube-apiserver and kube-controller-manager; return once usable for pods."""
        missing = missing_binaries()
        if missing:
            raise TestbedError("missing binaries (run scripts/setup --test): " + ", ".join(missing))
        temporary = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="mesh-cp-"))
        workdir.mkdir(parents=True, exist_ok=True)
        pki = workdir / "pki"
        pki.mkdir(exist_ok=True)
        logs = workdir / "logs"

        ca_file, ca_key = pki / "ca.crt", pki / "ca.key"
        certs.make_ca(ca_file, ca_key)
        certs.issue_serving_cert(
            ca_file,
            ca_key,
            pki / "apiserver.crt",
            pki / "apiserver.key",
            common_name="kube-apiserver",
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=["127.0.0.1", KUBERNETES_SERVICE_IP],
        )
        certs.make_rsa_key(pki / "sa.key", pki / "sa.pub")

        node = node_name()
        admin_token, node_token = secrets.token_hex(16), secrets.token_hex(16)
        user_tokens = {user: secrets.token_hex(16) for user in PLAIN_USERS}
        rows = [
            f'{admin_token},{ADMIN_USER},{uuid.uuid4()},"system:masters"',
            f'{node_token},system:node:{node},{uuid.uuid4()},"system:nodes"',
        ]
        rows += [f"{tok},{user},{uuid.uuid4()}" for user, tok in user_tokens.items()]
        tokens_csv = pki / "tokens.csv"
        tokens_csv.write_text("\n".join(rows) + "\n")
        tokens_csv.chmod(0o600)

        etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        server = f"https://127.0.0.1:{api_port}"
        plane = cls(
            workdir=workdir,
            temporary_workdir=temporary,
            server=server,
            token=admin_token,
            ca_file=ca_file,
            ca_key_file=ca_key,
            kubeconfig=workdir / "admin.kubeconfig",
            etcd_url=etcd_url,
            node_name=node,
            node_token=node_token,
            service_account_key_file=pki / "sa.key",
            user_tokens=user_tokens,
        )
        _write_kubeconfig(plane.kubeconfig, server, ca_file, admin_token, ADMIN_USER)
        try:
            plane._start_etcd(etcd_port, etcd_peer_port, logs, timeout)
            plane._start_apiserver(api_port, tokens_csv, logs, timeout)
            plane._start_controller_manager(logs, timeout)
        except BaseException:
            plane.stop()
            raise
        plane.save()
        return plane

    def _start_etcd(self, port: int, peer_port: int, logs: Path, timeout: float) -> None:
        peer = f"http://127.0.0.1:{peer_port}"
        # etcd's data on tmpfs when there is one: fsync on a shared disk makes the API slow.
        data_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else self.workdir
        data_dir = Path(tempfile.mkdtemp(prefix="mesh-etcd-", dir=data_root))
        (self.workdir / "etcd-data").write_text(str(data_dir))
        etcd = start_daemon(
            "etcd",
            [
                str(pinned_binary("etcd")),
                "--name",
                "testbed",
                "--data-dir",
                str(data_dir),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"testbed={peer}",
                "--initial-cluster-state",
                "new",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
            logs,
        )
        self.daemons.append(etcd)

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") == "true"

        wait_until("etcd /health", healthy, timeout, daemons=[etcd])

    def _start_apiserver(self, port: int, tokens_csv: Path, logs: Path, timeout: float) -> None:
        pki = self.workdir / "pki"
        apiserver = start_daemon(
            "kube-apiserver",
            [
                str(kube_binary("kube-apiserver")),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={pki / 'apiserver-generated'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca_file}",
                f"--token-auth-file={tokens_csv}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,"
                "DefaultTolerationSeconds,NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
                "ResourceQuota,Priority",
                "--allow-privileged=true",
                "--kubelet-preferred-address-types=Hostname,InternalIP,ExternalIP",
                # The kubernetes Service's endpoints would be 127.0.0.1, which Endpoints validation
                # refuses (loopback); without a kube-proxy pods cannot use that Service anyway.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
            logs,
        )
        self.daemons.append(apiserver)
        wait_until(
            "kube-apiserver /readyz", lambda: self.get_raw("/readyz") == b"ok", timeout, daemons=self.daemons
        )

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (etcd and the controller manager keep running): an API outage."""
        for daemon in [d for d in self.daemons if d.name == "kube-apiserver"]:
            daemon.stop(APISERVER_STOP_S)
            self.daemons.remove(daemon)
        self.save()

    def restart_apiserver(self, timeout: float = 90.0) -> None:
        """Start kube-apiserver again (stopping it first if it runs) with the same port,
        certificates, tokens and service-account keys, so every client's config stays valid."""
        self.stop_apiserver()
        port = int(self.server.rsplit(":", 1)[1])
        self._start_apiserver(port, self.workdir / "pki" / "tokens.csv", self.workdir / "logs", timeout)
        self.save()

    def _start_controller_manager(self, logs: Path, timeout: float) -> None:
        manager = start_daemon(
            "kube-controller-manager",
            [
                str(kube_binary("kube-controller-manager")),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                f"--service-account-private-key-file={self.service_account_key_file}",
                f"--root-ca-file={self.ca_file}",
                f"--cluster-signing-cert-file={self.ca_file}",
                f"--cluster-signing-key-file={self.ca_key_file}",
                "--leader-elect=false",
                "--secure-port=0",
                "--controllers=*",
                "--v=1",
            ],
            logs,
        )
        self.daemons.append(manager)
        # Its service-account and root-CA publisher controllers have run once the default
        # namespace has both (every pod's projected token volume needs the CA ConfigMap).
        wait_until(
            "kube-controller-manager (default service account and kube-root-ca.crt)",
            lambda: self._service_account_ready("default", "default"),
            timeout,
            daemons=self.daemons,
        )

    def stop(self) -> None:
        """Stop the daemons we started (apiserver clients first, etcd last) and drop etcd's data."""
        if not self.owned:
            return
        for daemon in reversed(self.daemons):
            daemon.stop(APISERVER_STOP_S if daemon.name == "kube-apiserver" else 15.0)
        marker = self.workdir / "etcd-data"
        if marker.exists():
            data_dir = Path(marker.read_text())
            if data_dir.name.startswith("mesh-etcd-"):
                shutil.rmtree(data_dir, ignore_errors=True)
            marker.unlink()
        if self.temporary_workdir and not os.environ.get("MESH_KEEP_TESTBED"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- state for the command line -------------------------------------------------------------

    def save(self) -> None:
        state: dict[str, Any] = {
            "server": self.server,
            "token": self.token,
            "ca_file": str(self.ca_file),
            "ca_key_file": str(self.ca_key_file),
            "kubeconfig": str(self.kubeconfig),
            "etcd_url": self.etcd_url,
            "node_name": self.node_name,
            "node_token": self.node_token,
            "service_account_key_file": str(self.service_account_key_file),
            "user_tokens": self.user_tokens,
            "daemons": [d.to_json() for d in self.daemons],
        }
        save_state(self.workdir / "state.json", state)

    @classmethod
    def attach(cls, workdir: Path, *, owned: bool = False) -> ControlPlane:
        """A handle on a control plane started by another process (`up`); it is not ours to stop."""
        state = load_state(workdir / "state.json")
        return cls(
            workdir=workdir,
            server=str(state["server"]),
            token=str(state["token"]),
            ca_file=Path(str(state["ca_file"])),
            ca_key_file=Path(str(state["ca_key_file"])),
            kubeconfig=Path(str(state["kubeconfig"])),
            etcd_url=str(state["etcd_url"]),
            node_name=str(state["node_name"]),
            node_token=str(state["node_token"]),
            service_account_key_file=Path(str(state["service_account_key_file"])),
            user_tokens=dict(state["user_tokens"]),  # type: ignore[arg-type]
            daemons=[Daemon.from_json(d) for d in state["daemons"]],  # type: ignore[union-attr]
            owned=owned,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point kubectl and clients at this control plane."""
        return {"KUBECONFIG": str(self.kubeconfig), "MESH_CONTROL_PLANE": str(self.workdir)}

    # -- clients ----------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def get_raw(self, path: str, *, token: str | None = None, timeout: float = 5.0) -> bytes:
        """GET a path on the API server with a bearer token (admin by default); the raw body."""
        req = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {token or self.token}"}
        )
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str, *, token: str | None = None) -> dict[str, Any]:
        return json.loads(self.get_raw(path, token=token))

    def kubectl(
        self,
        *args: str,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (see module docstring) against this control plane as the admin."""
        binary = kubectl_path()
        if binary is None:
            raise TestbedError("kubectl not found; run scripts/setup.d/30-kube.sh")
        text_input = input.decode() if isinstance(input, bytes) else input
        # Discovery cache in the work dir, not in ~/.kube: nothing of ours outlives the control plane.
        cmd = [
            binary,
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        proc = subprocess.run(
            cmd, input=text_input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def api_client(self, token: str | None = None) -> Any:
        """A `kubernetes.client.ApiClient` for this server (admin token unless `token` is given)."""
        from kubernetes import client  # imported lazily: heavy, and not every user needs it

        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_file)
        configuration.verify_ssl = True
        configuration.api_key = {"authorization": token or self.token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(configuration)

    # -- helpers tests share ------------------------------------------------------------------------

    def _exists(self, path: str) -> bool:
        try:
            self.get_json(path)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return False
            raise
        return True

    def _service_account_ready(self, namespace: str, name: str) -> bool:
        """The service account exists and so does the namespace's `kube-root-ca.crt` ConfigMap.

        Since 1.24 no token Secret is made: pods get a projected, bound token whose volume also
        carries `ca.crt` from that ConfigMap (the kubelet cannot start the pod without it).
        """
        return self._exists(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}") and self._exists(
            f"/api/v1/namespaces/{namespace}/configmaps/kube-root-ca.crt"
        )

    def wait_for_service_account(self, namespace: str, name: str = "default", timeout: float = 60.0) -> None:
        """Wait until a service account and its namespace's root CA ConfigMap exist (pods need both)."""
        wait_until(
            f"service account {namespace}/{name} and kube-root-ca.crt",
            lambda: self._service_account_ready(namespace, name),
            timeout,
            daemons=self.daemons if self.owned else [],
        )

    def service_account_token(self, namespace: str, name: str, timeout: float = 60.0) -> str:
        """Create (if needed) a service account and return a bearer token for it, e.g. for RBAC tests.

        A bound token from the TokenRequest API (`kubectl create token`), valid for a day.
        """
        self.kubectl("create", "serviceaccount", name, "-n", namespace, check=False)
        self.wait_for_service_account(namespace, name, timeout)
        return self.kubectl("create", "token", name, "-n", namespace, "--duration=24h").stdout.strip()

    def create_namespace(
        self, name: str | None = None, *, labels: Mapping[str, str] | None = None, prefix: str = "t"
    ) -> str:
        """Create a namespace (a unique name unless given) and wait until pods can be created in it."""
        name = name or f"{prefix}-{uuid.uuid4().hex[:8]}"
        manifest = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels or {})},
        }
        self.kubectl("create", "-f", "-", input=json.dumps(manifest))
        self.wait_for_service_account(name)
        return name

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace without waiting for its finalization (its pods' grace periods)."""
        self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


# -- command line -----------------------------------------------------------------------------------


def _print_env(plane: ControlPlane) -> None:
    for key, value in plane.env().items():
        print(f"export {key}={value}")
    print(f"# server {plane.server}  admin token {plane.token}  ca {plane.ca_file}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed.controlplane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down", "env", "status"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("MESH_CONTROL_PLANE", DEFAULT_DIR)),
        help=f"work directory (default {DEFAULT_DIR} or $MESH_CONTROL_PLANE)",
    )
    args = parser.parse_args(argv)
    workdir: Path = args.dir
    state = workdir / "state.json"
    if args.action == "up":
        if state.exists() and any(d.alive() for d in ControlPlane.attach(workdir).daemons):
            print(f"already up in {workdir}", file=sys.stderr)
            _print_env(ControlPlane.attach(workdir))
            return 0
        started = time.monotonic()
        plane = ControlPlane.start(workdir)
        print(f"# control plane up in {time.monotonic() - started:.1f}s", file=sys.stderr)
        _print_env(plane)
        return 0
    if not state.exists():
        print(f"no control plane in {workdir}", file=sys.stderr)
        return 0 if args.action == "down" else 1
    plane = ControlPlane.attach(workdir, owned=True)
    if args.action == "env":
        _print_env(plane)
    elif args.action == "status":
        for daemon in plane.daemons:
            running = "running" if daemon.alive() else "stopped"
            print(f"{daemon.name:24} pid {daemon.pid:<8} {running}  {daemon.log}")
    else:
        plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"control plane in {workdir} stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
