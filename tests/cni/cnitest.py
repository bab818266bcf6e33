"""Test bed for the CNI plugin: pods are network namespaces wired by the reference plugins.

``CniBed`` owns a temp dir with a CNI bin dir (Debian's bridge/host-local/loopback plus our
``mesh-cni`` launcher), a conflist dir and a libcni cache dir; pods are ADDed/DELeted through
our libcni driver exactly as a runtime does (K8S_POD_* args, pod annotations capability).
Traffic helpers open listeners inside a pod's netns from a thread (setns is per thread) and
make client connections from child processes that enter the netns and drop to a uid.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import select
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE_PLUGIN_DIR = Path("/usr/lib/cni")
DRIVER = Path.home() / ".cache/mesh-injector/libcni-driver/libcni-driver"
STATUS = "sidecar.istio.io/status"
INJECTED = {STATUS: json.dumps({"initContainers": ["istio-validation"], "containers": ["istio-proxy"],
                                "volumes": [], "imagePullSecrets": [], "revision": "default"})}
SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
_counter = itertools.count(1)
#: For children that drop to an unprivileged uid: the venv's interpreter may live under /root.
UNPRIVILEGED_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def write_launcher(bin_dir: Path, name: str = "mesh-cni") -> Path:
    """An executable ``mesh-cni`` for a CNI bin dir: this interpreter, isolated (-I -S), our repo.

    The venv's site-packages go last on the path (no .pth processing: start-up stays lean) so
    the pyroute2 backend and PyYAML remain importable when asked for.
    """
    site_packages = sysconfig.get_paths()["purelib"]
    launcher = bin_dir / name
    launcher.write_text(
        f"#!{os.path.realpath(sys.executable)} -IS\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.path.append({site_packages!r})\n"
        "from cni.cli import main\n"
        "sys.exit(main())\n")
    launcher.chmod(0o755)
    return launcher


@dataclass
class Pod:
    name: str
    namespace: str
    netns: str
    container_id: str
    annotations: dict[str, str]
    result: dict = field(default_factory=dict)
    uid: str = ""

    @property
    def ipv4(self) -> str:
        return next(ip["address"].split("/")[0] for ip in self.result["ips"] if ":" not in ip["address"])

    @property
    def ipv6(self) -> str:
        return next(ip["address"].split("/")[0] for ip in self.result["ips"] if ":" in ip["address"])


class DriverError(Exception):
    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


class CniBed:
    def __init__(self, root: Path, *, with_plugin: bool = True) -> None:
        self.root = root
        self.bin_dir = root / "bin"
        self.conf_dir = root / "net.d"
        self.cache_dir = root / "cache"
        self.log_file = root / "mesh-cni.log"
        for directory in (self.bin_dir, self.conf_dir, self.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for plugin in ("bridge", "host-local", "loopback"):
            target = self.bin_dir / plugin
            if not target.exists():
                target.symlink_to(REFERENCE_PLUGIN_DIR / plugin)
        write_launcher(self.bin_dir)
        suffix = uuid.uuid4().hex[:6]
        self.bridge = f"mcb{suffix}"
        octet = int(suffix[:2], 16) % 200 + 20
        self.subnet_v4 = f"10.{octet}.{int(suffix[2:4], 16)}.0/24"
        self.subnet_v6 = f"fd00:{suffix[:4]}::/64"
        self.pods: list[Pod] = []
        self.with_plugin = with_plugin
        # The bridge plugin reuses an existing bridge. We make it with a fixed MAC: a Linux bridge
        # otherwise takes its ports' lowest MAC, which changes as pods come and go, and the
        # bridge plugin's CHECK then fails on the MAC cached at ADD.
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "address", "02:00:00:00:00:01", "up"], check=True)

    def conflist(self, name: str = "meshnet", *, plugin: Mapping[str, object] | None = None,
                 with_plugin: bool = True, version: str = "1.0.0") -> str:
        """Write a conflist: bridge + host-local (IPv4+IPv6, default routes) [+ mesh-cni]."""
        plugins: list[dict] = [{
            "type": "bridge", "bridge": self.bridge, "isGateway": False, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(self.root / "ipam"),
                     "ranges": [[{"subnet": self.subnet_v4}], [{"subnet": self.subnet_v6}]],
                     "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]},
        }]
        if with_plugin:
            entry = {"type": "mesh-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": True},
                     "logFile": str(self.log_file), "logLevel": "debug", "excludeNamespaces": ["kube-system"],
                     "captureDNS": False}
            entry.update(plugin or {})
            plugins.append(entry)
        (self.conf_dir / f"{name}.conflist").write_text(
            json.dumps({"cniVersion": version, "name": name, "plugins": plugins}))
        return name

    def driver(self, command: str, pod: Pod, network: str, *, check: bool = True,
               annotations: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
               ) -> subprocess.CompletedProcess:
        pod_uid = pod.uid or f"uid-{pod.name}"
        args = [str(DRIVER), command, "-confdir", str(self.conf_dir), "-name", network, "-netns", pod.netns,
                "-id", pod.container_id, "-ifname", "eth0", "-path", str(self.bin_dir),
                "-cachedir", str(self.cache_dir),
                "-args", f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                         f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id};K8S_POD_UID={pod_uid}"]
        pod_annotations = pod.annotations if annotations is None else annotations
        if pod_annotations is not None:
            args += ["-annotations", json.dumps(dict(pod_annotations))]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **(env or {})})
        if check and done.returncode != 0:
            raise DriverError(done.stderr)
        return done

    def new_pod(self, annotations: Mapping[str, str] | None = None, *, namespace: str = "default",
                name: str | None = None) -> Pod:
        index = next(_counter)
        pod_name = name or f"pod{index}"
        netns_name = f"mc{os.getpid()}x{index}"
        subprocess.run(["ip", "netns", "add", netns_name], check=True)
        # Runtimes bring the pod's loopback up themselves (containerd: the loopback plugin).
        subprocess.run(["ip", "-n", netns_name, "link", "set", "lo", "up"], check=True)
        pod = Pod(name=pod_name, namespace=namespace, netns=f"/run/netns/{netns_name}",
                  container_id=uuid.uuid4().hex, annotations=dict(annotations or {}))
        self.pods.append(pod)
        return pod

    def add_pod(self, network: str, annotations: Mapping[str, str] | None = None, **kwargs: object) -> Pod:
        pod = self.new_pod(annotations, **kwargs)  # type: ignore[arg-type]
        done = self.driver("add", pod, network)
        pod.result = json.loads(done.stdout)
        wait_for_dad(pod)
        return pod

    def delete_netns(self, pod: Pod) -> None:
        subprocess.run(["ip", "netns", "del", Path(pod.netns).name], check=False, capture_output=True)

    def cleanup(self, network: str | None = None) -> None:
        for pod in self.pods:
            if network is not None and Path(pod.netns).exists():
                self.driver("del", pod, network, check=False)
            self.delete_netns(pod)
        self.pods.clear()
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)


def wait_for_dad(pod: Pod, timeout: float = 5.0) -> None:
    """IPv6 addresses are 'tentative' until duplicate address detection ends; wait for that."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "-n", Path(pod.netns).name, "-6", "addr", "show", "tentative"],
                             capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.05)


# --- Running things inside a netns ------------------------------------------------------------


def _enter(netns_path: str) -> None:
    from cni import netns

    fd = os.open(netns_path, os.O_RDONLY)
    netns.setns(fd)
    os.close(fd)


@contextlib.contextmanager
def in_netns(netns_path: str) -> Iterator[None]:
    """The calling thread is inside the netns for the block (sockets made here stay there)."""
    from cni import netns

    with netns.entered(netns_path):
        yield


def run_in_netns(netns_path: str, argv: list[str], *, uid: int | None = None, gid: int | None = None,
                 timeout: float = 30, env: Mapping[str, str] | None = None, input: str | None = None
                 ) -> subprocess.CompletedProcess:
    """A child process entering the netns (and dropping to uid/gid) before exec."""

    def prepare() -> None:
        _enter(netns_path)
        if gid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
        if uid is not None:
            os.setresuid(uid, uid, uid)

    return subprocess.run(argv, preexec_fn=prepare, capture_output=True, text=True, timeout=timeout,
                          env=dict(env) if env is not None else None, input=input)


CLIENT = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
kind = socket.SOCK_DGRAM if sys.argv[4] == "udp" else socket.SOCK_STREAM
s = socket.socket(family, kind)
s.settimeout(2)
if sys.argv[3]:
    s.bind((sys.argv[3], 0))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.send(b"hello")
    if kind == socket.SOCK_STREAM:
        s.recv(16)
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e)
"""


def connect(pod: Pod, host: str, port: int, *, uid: int | None = None, gid: int | None = None,
            source: str = "", proto: str = "tcp") -> str:
    """Connect from inside the pod (as uid/gid); returns 'connected', 'refused' or 'error ...'."""
    argv = [UNPRIVILEGED_PYTHON, "-I", "-S", "-c", CLIENT, host, str(port), source, proto]
    done = run_in_netns(pod.netns, argv,
                        uid=uid, gid=gid if gid is not None else uid, timeout=15)
    return (done.stdout.strip() or done.stderr.strip())


def original_destination(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


@dataclass
class Landing:
    """Where one connection arrived: the listening port and its original destination."""

    port: int
    original: tuple[str, int]
    peer: tuple


class Listeners:
    """TCP (and UDP) listeners in a pod's netns on all addresses; records every arrival.

    Each TCP connection is answered with b"ok" so clients see an established connection; the
    original destination is read with SO_ORIGINAL_DST (IPv6: IP6T_SO_ORIGINAL_DST).
    """

    def __init__(self, pod: Pod, tcp_ports: tuple[int, ...] = (), udp_ports: tuple[int, ...] = ()) -> None:
        self.arrivals: queue.Queue[Landing] = queue.Queue()
        self.sockets: dict[socket.socket, tuple[str, int]] = {}
        with in_netns(pod.netns):
            for port in tcp_ports:
                for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((address, port))
                    sock.listen(16)
                    self.sockets[sock] = ("tcp", port)
            for port in udp_ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("0.0.0.0", port))
                self.sockets[sock] = ("udp", port)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select(list(self.sockets), [], [], 0.1)
            for sock in ready:
                kind, port = self.sockets[sock]
                if kind == "udp":
                    _, peer = sock.recvfrom(2048)
                    self.arrivals.put(Landing(port, ("", 0), peer))
                    continue
                conn, peer = sock.accept()
                with conn:
                    try:
                        original = original_destination(conn)
                    except OSError:
                        original = conn.getsockname()[:2]
                    self.arrivals.put(Landing(port, (original[0], original[1]), peer))
                    with contextlib.suppress(OSError):
                        conn.sendall(b"ok")

    def next(self, timeout: float = 3.0) -> Landing | None:
        try:
            return self.arrivals.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()

    def __enter__(self) -> Listeners:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nft_ruleset(netns_path: str | None = None) -> str:
    """`nft list ruleset` (inspection only), inside a netns or on the host."""
    argv = ["nft", "list", "ruleset"]
    if netns_path is not None:
        argv = ["ip", "netns", "exec", Path(netns_path).name, *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def have_tools() -> bool:
    return all(shutil.which(tool) for tool in ("ip", "nft")) and DRIVER.exists() and (
        REFERENCE_PLUGIN_DIR / "bridge").exists()


def exec_plugin(bed: CniBed, command: str | None, stdin: bytes | dict | None, *,
                pod: Pod | None = None, env: Mapping[str, str] | None = None,
                drop: tuple[str, ...] = ()) -> tuple[int, object, str]:
    """Run our plugin binary directly as a runtime would: (exit code, parsed stdout, stderr)."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_PATH": str(bed.bin_dir),
                "CNI_IFNAME": "eth0"}
    if command is not None:
        full_env["CNI_COMMAND"] = command
    if pod is not None:
        full_env.update(CNI_CONTAINERID=pod.container_id, CNI_NETNS=pod.netns,
                        CNI_ARGS=f"K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};IgnoreUnknown=1")
    full_env.update(env or {})
    for key in drop:
        full_env.pop(key, None)
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else (stdin or b"")
    done = subprocess.run([str(bed.bin_dir / "mesh-cni")], input=data, capture_output=True, env=full_env,
                          timeout=60)
    out = done.stdout.decode()
    parsed = json.loads(out) if out.strip() else None
    return done.returncode, parsed, done.stderr.decode()


def plugin_config(bed: CniBed, *, version: str = "1.0.0", annotations: Mapping[str, str] | None = None,
                  prev_result: dict | None = None, **extra: object) -> dict:
    """One plugin's stdin config as libcni builds it from the conflist."""
    config: dict = {"cniVersion": version, "name": "meshnet", "type": "mesh-cni",
                    "logFile": str(bed.log_file), "excludeNamespaces": ["kube-system"]}
    if annotations is not None:
        config["runtimeConfig"] = {"io.kubernetes.cri.pod-annotations": dict(annotations)}
    if prev_result is not None:
        config["prevResult"] = prev_result
    config.update(extra)
    return config
