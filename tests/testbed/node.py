"""A real single node on this machine: kube-scheduler + containerd 2 + runc + kubelet.

It registers with a `ControlPlane` as `control_plane.node_name` (a name resolving to 127.0.0.1,
where the kubelet serves exec/logs/port-forward). Everything it can keep to itself lives in one
work directory: containerd's root, state, socket and config, runc's state, the kubelet's root
dir, the CNI bin and conf dirs (copies of Debian's reference plugins and a bridge + host-local
conflist; the machine's /etc/cni and /opt/cni are never touched) and the IPAM state.

What it cannot keep to itself, it records and undoes in `stop()`:
- sysctls the kubelet and the bridge plugin set (restored to the values found at start);
- cgroups under `kubepods` in every v1 hierarchy (processes left in them killed, dirs removed);
- entries it created in /var/log/pods and /var/log/containers (the dirs too if it created them),
  in /var/lib/kubelet/device-plugins (a path fixed in the kubelet) and, by name, libcni's cache
  files in /var/lib/cni/results (containerd has no setting for that cache);
- mounts under its work dir (pod volumes, netns, rootfs), the bridge `mesh-tb0`, shim sockets
  under /run/containerd/s;
- the Node object in the API.
Only processes it started (or that are provably its own: shims serving its containerd socket,
container processes in its kubepods cgroups) are stopped, by pid.

Images: `pause_image` (sandbox) and `busybox_image` are imported at start; add more with
`import_image(archive)` (see tests.testbed.images). Pods must use `imagePullPolicy: Never`.

Command line:
    python -m tests.testbed.node up [--dir DIR]     # needs a control plane (MESH_CONTROL_PLANE)
    python -m tests.testbed.node down [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.testbed import images
from tests.testbed.controlplane import ControlPlane
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

DEFAULT_DIR = Path(tempfile.gettempdir()) / "mesh-injector-testbed" / "node"
CNI_PLUGIN_DIR = Path("/usr/lib/cni")
BRIDGE = "mesh-tb0"
POD_SUBNET = "10.233.0.0/24"
PRIMARY_CONFLIST = "10-mesh-testbed.conflist"
#: Host sysctls the kubelet (setupKernelTunables) and the bridge plugin (isGateway) change.
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
)
#: Host dirs the kubelet, containerd and libcni write to whatever we configure: the kubelet's log
#: dirs, its device-plugin socket dir (hard-coded in 1.20), libcni's result cache (containerd 1.6
#: has no setting for it). Entries that appear during our run are ours and are removed, except in
#: shared dirs (SHARED_DIRS), where only entries with our prefix are (other CNI users write there).
TRACKED_DIRS = (
    Path("/var/log/pods"),
    Path("/var/log/containers"),
    Path("/var/lib/kubelet"),
    Path("/var/lib/kubelet/device-plugins"),
    Path("/var/lib/cni"),
    Path("/var/lib/cni/results"),
)
SHARED_DIRS: dict[str, tuple[str, ...]] = {
    "/var/lib/cni": (),
    # libcni names its cache files <network>-<container id>-<ifname>: our conflist's network and
    # the loopback network containerd's CRI sets up in every sandbox.
    "/var/lib/cni/results": ("mesh-testbed-", "cni-loopback-"),
}
SHIM_SOCKET_DIR = Path("/run/containerd/s")
#: Points at the work dir of the node running on this machine (one at a time: bridge, kubepods).
ACTIVE_POINTER = Path("/run/mesh-injector-testbed-node")
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: containerd 2's default import (defaults.DefaultConfigIncludePattern), read whatever the config says.
CONTAINERD_DROP_INS = Path("/etc/containerd/conf.d/*.toml")


def node_prerequisites_missing() -> list[str]:
    """What this machine lacks to run the node (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for name in ("kubelet", "kube-scheduler", "containerd", "containerd-shim-runc-v2", "ctr", "runc"):
        if not os.access(pinned_binary(name), os.X_OK):
            missing.append(f"{pinned_binary(name)} (scripts/setup --test)")
    for tool in ("gcc", "ip", "ldd"):
        if shutil.which(tool) is None:
            missing.append(tool)
    for path in (
        CNI_PLUGIN_DIR / "bridge",
        CNI_PLUGIN_DIR / "host-local",
        CNI_PLUGIN_DIR / "loopback",
        Path("/bin/busybox"),
    ):
        if not path.exists():
            missing.append(str(path))
    # containerd 2 always merges its default drop-in dir into any config (no setting turns it
    # off): a host drop-in would change the test node's runtime behind its back.
    drop_ins = sorted(CONTAINERD_DROP_INS.parent.glob(CONTAINERD_DROP_INS.name))
    if drop_ins:
        missing.append(f"no containerd drop-ins in {CONTAINERD_DROP_INS.parent} (found {drop_ins[0]})")
    if not (CGROUP_ROOT / "cpu").is_dir():
        missing.append("cgroup v1 hierarchies under /sys/fs/cgroup (the recipe uses cgroupfs v1)")
    return missing


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _cgroup_hierarchies() -> list[Path]:
    return sorted(p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink())


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest (latest) first."""
    points = []
    prefix = str(root.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return list(reversed(points))


def _containerd_config(workdir: Path, socket: Path) -> str:
    """containerd 2's config (format version 3): everything under the work dir, CRI on cgroupfs.

    Each setting that is not containerd's default is explained in tests/testbed/README.md.
    """
    ctd = workdir / "containerd"
    return f"""version = 3
root = "{ctd / "root"}"
state = "{ctd / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs",
  "io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{socket}.debug"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{ctd / "opt"}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{images.PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{pinned_binary("runc")}"
        SystemdCgroup = false
        Root = "{ctd / "runc"}"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{workdir / "cni" / "bin"}"]
    conf_dir = "{workdir / "cni" / "net.d"}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def _primary_conflist(workdir: Path) -> dict[str, Any]:
    """The node's primary network: a bridge with host-local IPAM (no masquerade: no host rules)."""
    return {
        "cniVersion": "1.0.0",
        "name": "mesh-testbed",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(workdir / "cni" / "ipam"),
                },
            }
        ],
    }


def _kubelet_config(
    port: int, healthz_port: int, containerd_socket: Path, feature_gates: Mapping[str, bool] | None = None
) -> dict[str, Any]:
    """The kubelet's settings; each one that is not the kubelet's default: tests/testbed/README.md."""
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{containerd_socket}",
        # This host mounts cgroup v1 hierarchies (hybrid, no systemd): the kubelet refuses to
        # start on v1 unless told otherwise (v1 support is in maintenance since 1.31).
        "failCgroupV1": False,
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        # Loopback only: the API server reaches the kubelet without client certificates.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        # A shared CI disk must not make the node evict test pods or delete imported images.
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "nodeStatusUpdateFrequency": "4s",
        "maxPods": 50,
    }
    if feature_gates:
        config["featureGates"] = dict(feature_gates)
    return config


def _wait_for_machine(control_plane: ControlPlane, timeout: float) -> None:
    """One node per machine: wait while another one runs; clean up after one whose owner crashed.

    A node whose kubelet is gone but whose host changes remain (a killed test session) is torn
    down from its recorded state, so the next session starts from a clean machine.
    """
    deadline = time.monotonic() + timeout
    announced = False
    while ACTIVE_POINTER.exists():
        workdir = Path(ACTIVE_POINTER.read_text().strip())
        try:
            other = Node.attach(workdir, control_plane, owned=True)
        except (OSError, ValueError, KeyError):
            ACTIVE_POINTER.unlink(missing_ok=True)
            return
        kubelet = next((d for d in other.daemons if d.name == "kubelet"), None)
        if kubelet is None or not kubelet.alive():
            other.stop()
            ACTIVE_POINTER.unlink(missing_ok=True)
            return
        if time.monotonic() > deadline:
            raise TestbedError(
                f"another test node runs here ({workdir}); stop it with scripts/testbed/node down "
                f"--dir {workdir}"
            )
        if not announced:
            print(
                f"waiting for the test node in {workdir} to stop (set MESH_NODE={workdir} to use it)",
                file=sys.stderr,
            )
            announced = True
        time.sleep(2)


@dataclass
class Node:
    """A running single node; see the module docstring."""

    workdir: Path
    control_plane: ControlPlane
    name: str
    containerd_socket: Path
    cni_bin_dir: Path
    cni_conf_dir: Path
    primary_conflist: Path
    kubelet_port: int
    pod_subnet: str = POD_SUBNET
    bridge: str = BRIDGE
    daemons: list[Daemon] = field(default_factory=list)
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    #: Host paths that did not exist before start (removed by stop) and, for log dirs that did,
    #: the entries they held then (anything else in them is ours).
    created_paths: list[str] = field(default_factory=list)
    log_dir_entries: dict[str, list[str]] = field(default_factory=dict)
    shim_sockets_before: list[str] = field(default_factory=list)
    owned: bool = True
    #: start() made the work dir itself (a temp dir): stop() removes it, logs and all, unless
    #: MESH_KEEP_TESTBED is set (each run used to leave hundreds of MiB in /tmp).
    temporary_workdir: bool = False

    # -- life cycle -------------------------------------------------------------------------------

    @classmethod
    def start(
        cls, control_plane: ControlPlane, workdir: Path | None = None, *, timeout: float = 120.0
    ) -> Node:
        missing = node_prerequisites_missing()
        if missing:
            raise TestbedError("cannot run the node: missing " + ", ".join(missing))
        _wait_for_machine(control_plane, float(os.environ.get("MESH_NODE_WAIT", "600")))
        for hierarchy in _cgroup_hierarchies():
            if (hierarchy / "kubepods").exists():
                raise TestbedError(f"{hierarchy / 'kubepods'} exists: another kubelet runs here, refusing")
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True, check=False).returncode == 0:
            raise TestbedError(f"interface {BRIDGE} exists: another test node runs here, refusing")
        temporary = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="mesh-node-"))
        workdir.mkdir(parents=True, exist_ok=True)
        socket = workdir / "containerd" / "containerd.sock"
        node = cls(
            workdir=workdir,
            control_plane=control_plane,
            name=control_plane.node_name,
            containerd_socket=socket,
            cni_bin_dir=workdir / "cni" / "bin",
            cni_conf_dir=workdir / "cni" / "net.d",
            primary_conflist=workdir / "cni" / "net.d" / PRIMARY_CONFLIST,
            kubelet_port=free_port(),
            temporary_workdir=temporary,
        )
        node._record_host_state()
        node.save()
        ACTIVE_POINTER.write_text(str(workdir))
        try:
            node._start_scheduler()
            node._start_containerd(timeout)
            node._import_base_images()
            node._start_kubelet(timeout)
        except BaseException:
            node.stop()
            raise
        node.save()
        return node

    def _record_host_state(self) -> None:
        self.saved_sysctls = {
            name: _sysctl_path(name).read_text().strip() for name in SYSCTLS if _sysctl_path(name).exists()
        }
        for directory in TRACKED_DIRS:
            if directory.exists():
                self.log_dir_entries[str(directory)] = sorted(os.listdir(directory))
            else:
                self.created_paths.append(str(directory))
        for path in (Path("/run/containerd"), SHIM_SOCKET_DIR):
            if not path.exists():
                self.created_paths.append(str(path))
        if SHIM_SOCKET_DIR.exists():
            self.shim_sockets_before = sorted(os.listdir(SHIM_SOCKET_DIR))

    def _start_scheduler(self) -> None:
        plane = self.control_plane
        self.daemons.append(
            start_daemon(
                "kube-scheduler",
                [
                    str(kube_binary("kube-scheduler")),
                    f"--kubeconfig={plane.kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",
                    "--v=1",
                ],
                self.workdir / "logs",
            )
        )

    def _start_containerd(self, timeout: float) -> None:
        self.cni_bin_dir.mkdir(parents=True, exist_ok=True)
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        for plugin in sorted(CNI_PLUGIN_DIR.iterdir()):
            shutil.copy2(plugin, self.cni_bin_dir / plugin.name)
        self.primary_conflist.write_text(json.dumps(_primary_conflist(self.workdir), indent=2) + "\n")
        config = self.workdir / "containerd" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(_containerd_config(self.workdir, self.containerd_socket))
        # containerd finds its shim on PATH (the shim finds runc through the config's BinaryName).
        env = {
            **os.environ,
            "PATH": f"{pinned_binary('containerd').parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        containerd = start_daemon(
            "containerd",
            [str(pinned_binary("containerd")), "--config", str(config), "--log-level", "info"],
            self.workdir / "logs",
            env=env,
        )
        self.daemons.append(containerd)
        wait_until(
            "containerd socket",
            lambda: self.ctr("version", check=False).returncode == 0,
            timeout,
            daemons=[containerd],
        )

    def _import_base_images(self) -> None:
        self.import_image(images.pause_image())
        self.import_image(images.busybox_image())

    def _start_kubelet(
        self, timeout: float, *, feature_gates: Mapping[str, bool] | None = None, verbosity: int = 1
    ) -> None:
        plane = self.control_plane
        kubelet_dir = self.workdir / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.workdir / "kubelet.kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "testbed",
                            "cluster": {"server": plane.server, "certificate-authority": str(plane.ca_file)},
                        }
                    ],
                    "users": [{"name": "node", "user": {"token": plane.node_token}}],
                    "contexts": [{"name": "node", "context": {"cluster": "testbed", "user": "node"}}],
                    "current-context": "node",
                }
            )
        )
        kubeconfig.chmod(0o600)
        config = self.workdir / "kubelet-config.json"
        config.write_text(
            json.dumps(
                _kubelet_config(self.kubelet_port, free_port(), self.containerd_socket, feature_gates),
                indent=2,
            )
        )
        kubelet = start_daemon(
            "kubelet",
            [
                str(kube_binary("kubelet")),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={kubelet_dir}",
                f"--cert-dir={kubelet_dir / 'pki'}",
                f"--hostname-override={self.name}",
                f"--v={verbosity}",
            ],
            self.workdir / "logs",
        )
        self.daemons.append(kubelet)
        self.save()
        wait_until(f"node {self.name} Ready", self._ready, timeout, daemons=self.daemons)
        # The node lifecycle controller lifts the not-ready taint shortly after; the scheduler
        # will not place pods before that.
        wait_until(f"node {self.name} untainted", self._untainted, timeout, daemons=self.daemons)

    def restart_kubelet(
        self, *, feature_gates: Mapping[str, bool] | None = None, verbosity: int = 1, timeout: float = 120.0
    ) -> None:
        """Run the kubelet again with other feature gates / log verbosity (benchmarks compare a
        cluster setting such as EventedPLEG). Only on an idle node: running pods are left to the
        new kubelet, which adopts them, but their probes restart."""
        old = next(d for d in self.daemons if d.name == "kubelet")
        old.stop()
        self.daemons.remove(old)
        since = time.time()
        self._start_kubelet(timeout, feature_gates=feature_gates, verbosity=verbosity)
        # The node object still says Ready from the old kubelet: wait for the new one's heartbeat.
        wait_until(f"node {self.name} heartbeat", lambda: self._heartbeat() >= int(since), timeout)

    def _heartbeat(self) -> float:
        for condition in self._node_object().get("status", {}).get("conditions", []):
            if condition["type"] == "Ready" and condition["status"] == "True":
                stamp = time.strptime(condition["lastHeartbeatTime"], "%Y-%m-%dT%H:%M:%SZ")
                return time.mktime(stamp) - time.timezone
        return 0.0

    def _node_object(self) -> dict[str, Any]:
        return self.control_plane.get_json(f"/api/v1/nodes/{self.name}")

    def _ready(self) -> bool:
        conditions = self._node_object().get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _untainted(self) -> bool:
        taints = self._node_object().get("spec", {}).get("taints") or []
        return not any(t["key"].startswith("node.kubernetes.io/") for t in taints)

    def stop(self) -> None:
        """Undo everything start() did (see module docstring); safe to call on a half-started node."""
        if not self.owned:
            return
        by_name = {d.name: d for d in self.daemons}
        kubelet = by_name.get("kubelet")
        if kubelet is not None and kubelet.alive():
            self._drain(kubelet)
        if kubelet is not None:
            kubelet.stop()
        if "containerd" in by_name and by_name["containerd"].alive():
            self._kill_tasks()
        self._kill_own_shims()
        self._kill_cgroup_processes()
        if "containerd" in by_name:
            by_name["containerd"].stop()
        self._kill_own_shims()
        if "kube-scheduler" in by_name:
            by_name["kube-scheduler"].stop()
        with contextlib.suppress(Exception):
            self.control_plane.kubectl(
                "delete", "node", self.name, "--ignore-not-found", "--wait=false", check=False, timeout=20
            )
        self._unmount_all()
        self._remove_cgroups()
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
        self._restore_sysctls()
        self._clean_host_paths()
        with contextlib.suppress(OSError):
            if ACTIVE_POINTER.read_text() == str(self.workdir):
                ACTIVE_POINTER.unlink()
        if self.temporary_workdir and not os.environ.get("MESH_KEEP_TESTBED"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What stop() should have undone but did not (empty after a clean teardown)."""
        problems = [f"{d.name} (pid {d.pid}) still running" for d in self.daemons if d.alive()]
        for name, value in self.saved_sysctls.items():
            now = _sysctl_path(name).read_text().strip()
            if now != value:
                problems.append(f"sysctl {name} is {now}, was {value}")
        problems += [
            f"cgroup {h / 'kubepods'} left" for h in _cgroup_hierarchies() if (h / "kubepods").exists()
        ]
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True, check=False).returncode == 0:
            problems.append(f"bridge {BRIDGE} left")
        problems += [f"mount {point} left" for point in _mounts_under(self.workdir)]
        problems += [
            f"{path} left" for path in self.created_paths if Path(path).exists() and path not in SHARED_DIRS
        ]
        for directory in [*self.log_dir_entries, *(p for p in self.created_paths if p in SHARED_DIRS)]:
            problems += [f"{directory}/{entry} left" for entry in self._new_entries(directory)]
        if self._own_shims():
            problems.append(f"containerd shims for {self.containerd_socket} left: {self._own_shims()}")
        return problems

    def _drain(self, kubelet: Daemon) -> None:
        """Force-delete every pod bound here and give the kubelet a bounded time to stop them.

        Stopping pods through the kubelet runs CNI DEL for each sandbox (chained plugins clean up).
        """
        plane = self.control_plane
        with contextlib.suppress(Exception):
            listed = plane.get_json(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.name}")
            for pod in listed.get("items", []):
                meta = pod["metadata"]
                plane.kubectl(
                    "delete",
                    "pod",
                    meta["name"],
                    "-n",
                    meta["namespace"],
                    "--grace-period=0",
                    "--force",
                    "--wait=false",
                    check=False,
                    timeout=20,
                )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and kubelet.alive():
            tasks = self.ctr("tasks", "ls", "-q", check=False)
            if tasks.returncode != 0 or not tasks.stdout.strip():
                return
            time.sleep(0.5)

    def _kill_tasks(self) -> None:
        """Kill and delete any container task left (their sandboxes get no CNI DEL then)."""
        tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False)
        deadline = time.monotonic() + 10
        for task in tasks:
            while (
                self.ctr("tasks", "delete", task, check=False).returncode != 0 and time.monotonic() < deadline
            ):
                time.sleep(0.2)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)

    def _own_shims(self) -> list[int]:
        """Pids of containerd shims serving our socket (identified by it, not by their name)."""
        marker = str(self.containerd_socket).encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and marker in argv:
                pids.append(int(proc.name))
        return pids

    def _kill_own_shims(self) -> None:
        for pid in self._own_shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _kill_cgroup_processes(self) -> None:
        """Container processes still in our kubepods cgroups are ours: kill them."""
        for hierarchy in _cgroup_hierarchies():
            root = hierarchy / "kubepods"
            if not root.is_dir():
                continue
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)

    def _unmount_all(self) -> None:
        for _ in range(3):
            points = _mounts_under(self.workdir)
            if not points:
                return
            for point in points:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def _remove_cgroups(self) -> None:
        for hierarchy in _cgroup_hierarchies():
            root = hierarchy / "kubepods"
            if not root.is_dir():
                continue
            dirs = sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            )
            deadline = time.monotonic() + 10
            for directory in [*dirs, root]:
                while True:
                    try:
                        directory.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.1)

    def _restore_sysctls(self) -> None:
        for name, value in self.saved_sysctls.items():
            path = _sysctl_path(name)
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value + "\n")

    def _new_entries(self, directory: str) -> list[str]:
        """Entries of a tracked dir that appeared during our run (in shared dirs: with our prefix)."""
        try:
            now = set(os.listdir(directory))
        except FileNotFoundError:
            return []
        new = now - set(self.log_dir_entries.get(directory, []))
        if directory in SHARED_DIRS:
            new = {entry for entry in new if entry.startswith(SHARED_DIRS[directory])}
        return sorted(new)

    def _clean_host_paths(self) -> None:
        # Deepest first: /var/lib/kubelet/device-plugins before /var/lib/kubelet, and so on.
        tracked = sorted({*self.log_dir_entries, *self.created_paths}, key=len, reverse=True)
        for directory in tracked:
            for entry in self._new_entries(directory):
                target = Path(directory) / entry
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
        if SHIM_SOCKET_DIR.exists() and str(SHIM_SOCKET_DIR) not in self.created_paths:
            for entry in set(os.listdir(SHIM_SOCKET_DIR)) - set(self.shim_sockets_before):
                (SHIM_SOCKET_DIR / entry).unlink(missing_ok=True)
        for created in sorted(self.created_paths, key=len, reverse=True):
            path = Path(created)
            if created in SHARED_DIRS:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only when empty: someone else may use it now
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    # -- state ------------------------------------------------------------------------------------

    def save(self) -> None:
        save_state(
            self.workdir / "state.json",
            {
                "control_plane": str(self.control_plane.workdir),
                "name": self.name,
                "containerd_socket": str(self.containerd_socket),
                "cni_bin_dir": str(self.cni_bin_dir),
                "cni_conf_dir": str(self.cni_conf_dir),
                "primary_conflist": str(self.primary_conflist),
                "kubelet_port": self.kubelet_port,
                "daemons": [d.to_json() for d in self.daemons],
                "saved_sysctls": self.saved_sysctls,
                "created_paths": self.created_paths,
                "log_dir_entries": self.log_dir_entries,
                "shim_sockets_before": self.shim_sockets_before,
            },
        )

    @classmethod
    def attach(cls, workdir: Path, control_plane: ControlPlane, *, owned: bool = False) -> Node:
        state = load_state(workdir / "state.json")
        return cls(
            workdir=workdir,
            control_plane=control_plane,
            name=str(state["name"]),
            containerd_socket=Path(str(state["containerd_socket"])),
            cni_bin_dir=Path(str(state["cni_bin_dir"])),
            cni_conf_dir=Path(str(state["cni_conf_dir"])),
            primary_conflist=Path(str(state["primary_conflist"])),
            kubelet_port=int(state["kubelet_port"]),  # type: ignore[arg-type]
            daemons=[Daemon.from_json(d) for d in state["daemons"]],  # type: ignore[union-attr]
            saved_sysctls=dict(state["saved_sysctls"]),  # type: ignore[arg-type]
            created_paths=list(state["created_paths"]),  # type: ignore[arg-type]
            log_dir_entries=dict(state["log_dir_entries"]),  # type: ignore[arg-type]
            shim_sockets_before=list(state["shim_sockets_before"]),  # type: ignore[arg-type]
            owned=owned,
        )

    # -- tools for tests --------------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run `ctr` against this node's containerd, in the CRI namespace `k8s.io`."""
        cmd = [
            str(pinned_binary("ctr")),
            "--address",
            str(self.containerd_socket),
            "--namespace",
            "k8s.io",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)

    def import_image(self, archive: Path) -> None:
        """Load an OCI archive (tests.testbed.images) so pods can use it with imagePullPolicy Never."""
        self.ctr("images", "import", str(archive))

    def pod_netns(self, namespace: str, name: str) -> Path:
        """The network namespace of a running pod's sandbox (for `nsenter --net=...` checks)."""
        for container in self.ctr("containers", "ls", "-q").stdout.split():
            done = self.ctr("containers", "info", container, check=False)
            if done.returncode != 0:
                continue  # removed since the listing (another pod being deleted): not ours
            info = json.loads(done.stdout)
            labels = info.get("Labels") or {}
            if (
                labels.get("io.cri-containerd.kind") == "sandbox"
                and labels.get("io.kubernetes.pod.namespace") == namespace
                and labels.get("io.kubernetes.pod.name") == name
            ):
                for ns in info["Spec"]["linux"]["namespaces"]:
                    if ns["type"] == "network" and ns.get("path"):
                        return Path(ns["path"])
        raise TestbedError(f"no running sandbox for pod {namespace}/{name}")

    def wait_for_pod(
        self, namespace: str, name: str, *, phase: str = "Running", timeout: float = 60.0
    ) -> dict[str, Any]:
        """Wait until a pod reaches `phase` (fails early when it lands in Failed instead)."""
        found: dict[str, Any] = {}

        def reached() -> bool:
            pod = self.control_plane.get_json(f"/api/v1/namespaces/{namespace}/pods/{name}")
            found.clear()
            found.update(pod)
            current = pod.get("status", {}).get("phase")
            if current == "Failed" and phase != "Failed":
                raise AssertionError(f"pod {namespace}/{name} failed: {json.dumps(pod.get('status'))}")
            return current == phase

        try:
            wait_until(f"pod {namespace}/{name} {phase}", reached, timeout, daemons=self.daemons)
        except TestbedError as err:
            raise TestbedError(f"{err}\nlast status: {json.dumps(found.get('status'), indent=1)}") from None
        return found

    def env(self) -> dict[str, str]:
        return {
            "MESH_NODE": str(self.workdir),
            "CONTAINERD_ADDRESS": str(self.containerd_socket),
            "CONTAINERD_NAMESPACE": "k8s.io",
        }


# -- command line -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed.node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down", "env", "status"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("MESH_NODE", DEFAULT_DIR)),
        help=f"work directory (default {DEFAULT_DIR} or $MESH_NODE)",
    )
    parser.add_argument(
        "--control-plane",
        type=Path,
        default=Path(os.environ.get("MESH_CONTROL_PLANE", DEFAULT_DIR.parent / "controlplane")),
        help="the control plane's work directory (default $MESH_CONTROL_PLANE)",
    )
    args = parser.parse_args(argv)
    state = args.dir / "state.json"
    if args.action == "up":
        plane = ControlPlane.attach(args.control_plane)
        started = time.monotonic()
        node = Node.start(plane, args.dir)
        print(f"# node {node.name} Ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
        for key, value in node.env().items():
            print(f"export {key}={value}")
        return 0
    if not state.exists():
        print(f"no node in {args.dir}", file=sys.stderr)
        return 0 if args.action == "down" else 1
    control_dir = Path(str(load_state(state)["control_plane"]))
    plane = ControlPlane.attach(control_dir)
    node = Node.attach(args.dir, plane, owned=True)
    if args.action == "env":
        for key, value in node.env().items():
            print(f"export {key}={value}")
    elif args.action == "status":
        for daemon in node.daemons:
            running = "running" if daemon.alive() else "stopped"
            print(f"{daemon.name:24} pid {daemon.pid:<8} {running}  {daemon.log}")
    else:
        node.stop()
        problems = node.leftovers()
        for problem in problems:
            print(f"not restored: {problem}", file=sys.stderr)
        shutil.rmtree(args.dir, ignore_errors=True)
        if problems:
            return 1
        print(f"node in {args.dir} stopped and host restored", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
