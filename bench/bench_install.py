"""Installer speed: conflist overwrite -> re-installed, the agent's idle CPU and RSS, plugin start-up.

    .venv/bin/python bench/bench_install.py [--rounds 30] [--idle-seconds 10]

Everything runs against temp dirs standing in for /etc/cni/net.d, /opt/cni/bin and
/opt/mesh-cni; nothing on the host is touched. Targets: re-install <= 1 s after an overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cni.install.agent import Agent, AgentConfig  # noqa: E402
from cni.install.conflist import EntryOptions  # noqa: E402

PRIMARY = {
    "cniVersion": "1.0.0",
    "name": "bench",
    "plugins": [
        {"type": "bridge", "bridge": "bench0", "ipam": {"type": "host-local", "subnet": "10.77.0.0/24"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
TARGET_REINSTALL_S = 1.0


def _config(root: Path, **changes: object) -> AgentConfig:
    net, bin_dir = root / "net.d", root / "bin"
    net.mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    state = root / "state"
    base = {
        "cni_bin_dir": bin_dir, "cni_net_dir": net, "runtime_dir": root / "opt-mesh-cni", "state_dir": state,
        "kubeconfig": state / "kubeconfig", "entry": EntryOptions(kubeconfig=str(state / "kubeconfig")),
        "health_port": None, "resync_s": 60.0,
    }  # fmt: skip
    base.update(changes)
    return AgentConfig(**base)  # type: ignore[arg-type]


def _chained(path: Path) -> bool:
    try:
        return json.loads(path.read_bytes())["plugins"][-1]["type"] == "mesh-cni"
    except (OSError, ValueError, KeyError, IndexError):
        return False


def _wait(predicate, timeout: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            return float("inf")
        time.sleep(0.0005)
    return time.perf_counter() - start


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(".bench-tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def _summary(name: str, samples: list[float], target: float | None = None) -> None:
    samples = sorted(samples)
    p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
    line = (
        f"{name:<44} median {statistics.median(samples) * 1000:8.1f} ms   p95 {p95 * 1000:8.1f} ms   "
        f"max {samples[-1] * 1000:8.1f} ms"
    )
    if target is not None:
        line += f"   target {target * 1000:.0f} ms -> max/target {samples[-1] / target:.3f}"
    print(line)


def bench_reinstall(root: Path, rounds: int, *, contended: bool) -> None:
    """Uncontended: raw reaction time (contention detection off, since this loop overwrites far
    more often than any real agent). Contended: the default back-off against a 10 Hz writer."""
    config = _config(root) if contended else _config(root, contention_threshold=10**9)
    primary = config.cni_net_dir / "10-bench.conflist"
    original = (json.dumps(PRIMARY, indent=2) + "\n").encode()
    primary.write_bytes(original)
    agent = Agent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    first = _wait(lambda: _chained(primary), timeout=120)
    print(
        f"first install (builds the runtime bundle)     {first * 1000:8.1f} ms  "
        f"(bundle {sum(f.stat().st_size for f in config.runtime_dir.rglob('*') if f.is_file()) >> 20} MiB)"
    )
    del started
    atomic, inplace, binary = [], [], []
    for _ in range(0 if contended else rounds):
        time.sleep(0.05)
        _atomic(primary, original)
        atomic.append(_wait(lambda: _chained(primary)))
        time.sleep(0.05)
        primary.write_bytes(original)  # truncate + write in place
        inplace.append(_wait(lambda: _chained(primary)))
        time.sleep(0.05)
        (config.cni_bin_dir / "mesh-cni").unlink()
        binary.append(_wait(lambda: os.access(config.cni_bin_dir / "mesh-cni", os.X_OK)))
    # A contended episode: a writer every 100 ms for 3 s, then silence; time until we are back.
    backs = []
    for _ in range(3 if contended else 0):
        end = time.perf_counter() + 3
        while time.perf_counter() < end:
            _atomic(primary, original)
            time.sleep(0.1)
        backs.append(_wait(lambda: _chained(primary)))
        time.sleep(1.0)
    agent.stop()
    thread.join(10)
    agent.close()
    if contended:
        _summary("10 Hz writer for 3 s stops -> re-installed", backs, TARGET_REINSTALL_S)
        counters = agent.status.counters
        print(
            f"  against {counters['mesh_cni_install_overwrites_total']} overwrites we wrote "
            f"{counters['mesh_cni_install_writes_total']} times (back-off)"
        )
        return
    _summary("conflist replaced (rename) -> re-installed", atomic, TARGET_REINSTALL_S)
    _summary("conflist rewritten in place -> re-installed", inplace, TARGET_REINSTALL_S)
    _summary("binary removed -> launcher back", binary, TARGET_REINSTALL_S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_idle(root: Path, seconds: float) -> None:
    config = _config(root)
    (config.cni_net_dir / "10-bench.conflist").write_bytes(json.dumps(PRIMARY).encode())
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "MESH_CNI_"))}
    env.update(
        CNI_NET_DIR=str(config.cni_net_dir), CNI_BIN_DIR=str(config.cni_bin_dir),
        MESH_CNI_RUNTIME_DIR=str(config.runtime_dir), MESH_CNI_STATE_DIR=str(config.state_dir),
        MESH_CNI_KUBECONFIG=str(config.kubeconfig), MESH_CNI_HEALTH_ADDRESS="127.0.0.1",
        MESH_CNI_HEALTH_PORT=str(port), MESH_CNI_LOG_LEVEL="warning",
    )  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "cni.install"], cwd=REPO, env=env)
    try:
        ready = _wait(lambda: _ready(port), timeout=120)
        time.sleep(1.0)
        cpu0, t0 = _proc_cpu_s(proc.pid), time.perf_counter()
        time.sleep(seconds)
        cpu1, t1 = _proc_cpu_s(proc.pid), time.perf_counter()
        rss = _proc_rss_kib(proc.pid)
        print(f"agent ready after start                       {ready * 1000:8.1f} ms")
        print(
            f"agent idle CPU over {seconds:.0f} s (5 s resync)        "
            f"{(cpu1 - cpu0) / (t1 - t0) * 100:8.3f} % "
            f"of one core ({(cpu1 - cpu0) * 1000:.0f} ms CPU)"
        )
        print(f"agent RSS (health server + inotify loop)      {rss / 1024:8.1f} MiB")
    finally:
        proc.terminate()
        proc.wait(15)


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200
    except OSError:
        return False


def bench_plugin_start(root: Path, rounds: int) -> None:
    """What the runtime pays per pod for the plugin process: the bundled launcher vs the venv."""
    config = _config(root)
    launcher = config.cni_bin_dir / "mesh-cni"
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "mesh-cni"}).encode()
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}

    def timed(argv: list[str]) -> list[float]:
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run(argv, input=stdin, env=env, capture_output=True, check=True)
            out.append(time.perf_counter() - start)
        return out

    _summary("plugin VERSION via installed launcher", timed([str(launcher)]))
    _summary("plugin VERSION via venv python -m cni.cli", timed([sys.executable, "-I", "-m", "cni.cli"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-install-") as tmp:
        root = Path(tmp)
        bench_reinstall(root / "a", args.rounds, contended=False)
        bench_reinstall(root / "c", args.rounds, contended=True)
        bench_plugin_start(root / "a", min(args.rounds, 20))
        bench_idle(root / "b", args.idle_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
