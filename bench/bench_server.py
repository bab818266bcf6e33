"""Webhook throughput and latency over HTTPS on loopback, and the server's memory over 100k reviews.

Starts ``mesh-injector serve`` (one uvicorn worker, its own CA and certificate), then drives
``POST /inject`` with ``wrk`` (HTTPS, keep-alive, 16 connections, 2 threads) on the same
machine with an AdmissionReview for a typical pod (three containers, probes on named and
numbered ports, a Deployment's ownerReferences). Prints reviews/s, p50/p99 and their ratio to the
targets (>= 1,500 reviews/s, p99 <= 20 ms), then keeps the load on until the server has answered
100,000 reviews and prints its RSS at 10k and at 100k reviews and the peak (VmHWM).

    .venv/bin/python bench/bench_server.py [--duration 15] [--connections 16] [--total 100000]

Needs ``wrk`` (Debian package; installed with apt-get when missing and running as root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from injector import pki  # noqa: E402

TARGET_RPS = 1500.0
TARGET_P99_MS = 20.0


def typical_review() -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-6f8d9c7b5-",
            "namespace": "shop",
            "labels": {"app": "web", "version": "v1", "pod-template-hash": "6f8d9c7b5"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6f8d9c7b5",
                                 "uid": "0b6c1f1e-7d1a-4c1e-9b8e-5a0e2b7f1c11", "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [
                {"name": "web", "image": "registry.example.com/shop/web:1.8.2",
                 "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 8081}],
                 "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "DB_HOST", "value": "db.shop"},
                         {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                 "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
                 "livenessProbe": {"httpGet": {"path": "/live", "port": 8081}, "initialDelaySeconds": 10},
                 "startupProbe": {"tcpSocket": {"port": "http"}, "failureThreshold": 30},
                 "volumeMounts": [{"name": "config", "mountPath": "/etc/web"}]},
                {"name": "worker", "image": "registry.example.com/shop/worker:1.8.2",
                 "command": ["/worker", "--queue=orders"],
                 "livenessProbe": {"exec": {"command": ["/worker", "health"]}},
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
                {"name": "exporter", "image": "registry.example.com/tools/exporter:0.9",
                 "ports": [{"name": "metrics", "containerPort": 9100}],
                 "readinessProbe": {"grpc": {"port": 9100}}},
            ],
            "volumes": [{"name": "config", "configMap": {"name": "web-config"}}],
        },
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }


def serve_command() -> list[str]:
    """``mesh-injector`` as installed in this interpreter's environment."""
    exe = Path(sys.executable).parent / "mesh-injector"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from injector.cli import main; sys.exit(main())"]


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench_server: needs wrk (apt-get install wrk)")
    return found


def wait_ready(url: str, ctx: ssl.SSLContext, server: subprocess.Popen[bytes], log: Path) -> bool:
    """Poll ``url``/readyz for up to 30 s; on failure print the server's log and return False."""
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/readyz", context=ctx, timeout=2)
            return True
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                print(log.read_text())
                return False
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_pids(pid: int) -> list[int]:
    """The serve supervisor and its worker processes."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB, summed over the supervisor and its workers."""
    rss = hwm = 0
    for one in server_pids(pid):
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{one}/status").read_text().splitlines())
        rss += int(fields["VmRSS"].split()[0])
        hwm += int(fields["VmHWM"].split()[0])
    return rss, hwm


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server's processes (load-robust: others do not inflate it)."""
    return sum(_cpu(one) for one in server_pids(pid))


def answered(url: str, ctx: ssl.SSLContext) -> int:
    text = urllib.request.urlopen(f"{url}/metrics", context=ctx, timeout=10).read().decode()
    total = 0.0
    for match in re.finditer(r'^mesh_injector_requests_total\{([^}]*)\} (\S+)$', text, re.M):
        labels = set(match.group(1).split(","))
        if {'endpoint="inject"', 'code="200"'} <= labels:
            total += float(match.group(2))
    return int(total)


def parse_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    wrk: str, url: str, script: Path, seconds: float, connections: int, threads: int, quiet: bool = False
) -> dict[str, float]:
    """wrk's numbers, plus ``wrk_cores``: the CPU wrk itself used per second of its run."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s", "--latency",
         "-s", str(script), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    result = {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "75", "90", "99"):
        found = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = parse_ms(found.group(1)) if found else float("nan")
    tail = re.search(r"^p99.9 (\d+)us max (\d+)us$", out, re.M)
    result["p999"], result["max"] = (int(tail.group(1)) / 1000, int(tail.group(2)) / 1000) if tail else (
        float("nan"), float("nan"))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["non2xx"] = float(errors.group(1)) if errors else 0.0
    result["sockerr"] = float(sum(int(g) for g in socket_errors.groups())) if socket_errors else 0.0
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    result["wrk_cores"] = (usage.ru_utime + usage.ru_stime) / (time.monotonic() - started)
    if socket_errors and not quiet:
        print(f"  wrk socket errors: {socket_errors.group(0)}")
    return result


#: Stands for the request number in the body of ``write_fixtures(distinct=True)``.
DISTINCT_MARK = "@@N@@"  # as long as TOKEN_MARK
#: Stands for the token volume's per-pod suffix in the body of ``write_fixtures``.
TOKEN_MARK = "@@T@@"


def write_fixtures(tmp: Path, distinct: bool = False) -> tuple[Path, Path]:
    """CA, serving pair, the review body and wrk's script in ``tmp``: (body, script).

    Every request is the same pod as kube-apiserver hands a workload's replicas to webhooks: the
    ServiceAccount plugin's token volume (mounted in every container) named anew per request,
    ``kube-api-access-<thread><n>``, as the plugin names it at random per pod. With ``distinct``
    each wrk thread also numbers its requests into the pod's ``version`` label, so no two reviews
    carry the same pod (every pod of its own workload).
    """
    ca = pki.make_ca("bench CA")
    serving = pki.issue_serving_cert(ca, ["127.0.0.1"])
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    (tmp / "tls.crt").write_bytes(serving.cert_pem)
    (tmp / "tls.key").write_bytes(serving.key_pem)
    review = typical_review()
    pod = review["request"]["object"]
    token = f"kube-api-access-{TOKEN_MARK}"
    pod["spec"]["volumes"].append({"name": token, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}})
    for container in pod["spec"]["containers"]:
        container.setdefault("volumeMounts", []).append(
            {"name": token, "readOnly": True, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
    body = tmp / ("review-distinct.json" if distinct else "review.json")
    if distinct:
        pod["metadata"]["labels"]["version"] = DISTINCT_MARK
    body.write_text(json.dumps(review))
    script = tmp / ("post-distinct.lua" if distinct else "post.lua")
    # The body is cut at its marks once per wrk thread; a request joins the pieces with its own
    # values (a gsub over the whole body per request cost wrk, and so the shared cores, ~10%).
    numbered = (
        'local template = wrk.body\n'
        'local pieces, marks, at = {}, {}, 1\n'
        'while true do\n'
        f'  local t = string.find(template, "{TOKEN_MARK}", at, true)\n'
        f'  local n = string.find(template, "{DISTINCT_MARK}", at, true)\n'
        '  local found = (t and n and math.min(t, n)) or t or n\n'
        '  if not found then break end\n'
        '  pieces[#pieces + 1] = string.sub(template, at, found - 1)\n'
        '  marks[#marks + 1] = found == t\n'
        f'  at = found + {len(TOKEN_MARK)}\n'
        'end\n'
        'local tail = string.sub(template, at)\n'
        'local threads, sent = 0, 0\n'
        'setup = function(thread) threads = threads + 1; thread:set("id", threads) end\n'
        'request = function()\n'
        '  sent = sent + 1\n'
        '  local token = string.format("%d%05d", id, sent % 100000)\n'
        '  local version = "v" .. id .. "-" .. sent\n'
        '  local out = {}\n'
        '  for i = 1, #pieces do\n'
        '    out[2 * i - 1] = pieces[i]\n'
        '    out[2 * i] = marks[i] and token or version\n'
        '  end\n'
        '  out[2 * #pieces + 1] = tail\n'
        '  return wrk.format(nil, nil, nil, table.concat(out))\n'
        'end\n'
    )
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        + numbered +
        # The tail beyond p99 (a stall every so often shows here first).
        'done = function(summary, latency, requests)\n'
        '  io.write(string.format("p99.9 %.0fus max %.0fus\\n", latency:percentile(99.9), latency.max))\n'
        'end\n'
    )
    return body, script


def start(tmp: Path, port: int, workers: int, log: Any,
          source: Path | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``mesh-injector serve`` on 127.0.0.1:``port`` with the files of ``write_fixtures`` (and
    the ``extra`` flags); from the tree ``source`` (``export_revision``) instead of this
    checkout when given."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    command = serve_command()
    if source is not None:
        env["PYTHONPATH"] = str(source)  # ahead of the editable install's finder
        command = [sys.executable, "-c", "import sys; from injector.cli import main; sys.exit(main())"]
    return subprocess.Popen(
        [*command, "serve", "--address", "127.0.0.1", "--port", str(port),
         "--tls-cert-file", str(tmp / "tls.crt"), "--tls-key-file", str(tmp / "tls.key"), "--no-events",
         "--workers", str(workers), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=source,
    )


def export_revision(revision: str, dest: Path) -> Path:
    """The repository's tree at ``revision`` (a commit to compare against), unpacked in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def worker_cpu_seconds(pid: int) -> list[float]:
    """CPU seconds of each worker process (the supervisor left out), to see how they share the load."""
    return [_cpu(one) for one in server_pids(pid)[1:]]


def stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of the measured run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--total", type=int, default=100_000, help="reviews before the final RSS reading")
    args = parser.parse_args(argv)
    wrk = ensure_wrk()

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp_name:
        tmp = Path(tmp_name)
        body, script = write_fixtures(tmp)
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        log = (tmp / "server.log").open("wb")
        server = start(tmp, port, 1, log)
        ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        try:
            if not wait_ready(url, ctx, server, tmp / "server.log"):
                return 1
            # Sanity: the review is answered with a patch.
            request = urllib.request.Request(f"{url}/inject", data=body.read_bytes(),
                                             headers={"content-type": "application/json"})
            answer = json.load(urllib.request.urlopen(request, context=ctx))
            assert answer["response"]["allowed"] and answer["response"].get("patch"), answer
            patch_bytes = len(answer["response"]["patch"])

            print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
                  f"review {body.stat().st_size} B, response patch {patch_bytes} B (base64)")
            run_wrk(wrk, f"{url}/inject", script, 3, args.connections, args.threads)  # warm-up
            cpu_before, count_before = cpu_seconds(server.pid), answered(url, ctx)
            m = run_wrk(wrk, f"{url}/inject", script, args.duration, args.connections, args.threads)
            cpu_ms = (cpu_seconds(server.pid) - cpu_before) * 1000 / max(answered(url, ctx) - count_before, 1)
            print(f"HTTPS keep-alive, {args.connections} connections, 1 server worker, wrk -t{args.threads}, "
                  f"{args.duration:.0f} s:")
            ratio = m["rps"] / TARGET_RPS
            print(f"  reviews/s   {m['rps']:8.0f}   (target >= {TARGET_RPS:.0f}: ratio {ratio:.2f})")
            print(f"  p50         {m['p50']:8.2f} ms")
            print(f"  p90         {m['p90']:8.2f} ms")
            print(f"  p99         {m['p99']:8.2f} ms (target <= {TARGET_P99_MS:.0f} ms: ratio "
                  f"{m['p99'] / TARGET_P99_MS:.2f})")
            print(f"  non-2xx     {m['non2xx']:8.0f} of {m['requests']:.0f}")
            print(f"  server CPU  {cpu_ms:8.3f} ms per review (load-robust): one core serves up to "
                  f"{1000 / cpu_ms:.0f} reviews/s (ratio to target {1000 / cpu_ms / TARGET_RPS:.2f})")

            # Memory: one long run on the same 16 keep-alive connections (as the API server keeps
            # its connections), RSS sampled at every 10% of the reviews.
            seconds = int(args.total / max(m["rps"], 1.0) * 3) + 30
            load = subprocess.Popen(
                [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "-s", str(script),
                 f"{url}/inject"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            samples: list[tuple[int, float]] = []
            try:
                step = args.total // 10
                next_mark = (answered(url, ctx) // step + 1) * step
                while next_mark <= args.total and load.poll() is None:
                    count = answered(url, ctx)
                    if count >= next_mark:
                        samples.append((count, rss_kib(server.pid)[0] / 1024))
                        next_mark += step
                    time.sleep(0.2)
            finally:
                load.terminate()
                load.wait(10)
            _, hwm = rss_kib(server.pid)
            print("memory (server RSS: supervisor + worker, MiB) by reviews answered: "
                  + ", ".join(f"{n // 1000}k: {mib:.1f}" for n, mib in samples))
            if len(samples) >= 2:
                half = samples[len(samples) // 2 - 1]
                print(f"  peak RSS (VmHWM) {hwm / 1024:.1f} MiB after {samples[-1][0]} reviews; growth over "
                      f"the second half ({half[0] // 1000}k -> {samples[-1][0] // 1000}k): "
                      f"{samples[-1][1] - half[1]:+.1f} MiB")
        finally:
            stop(server)
            log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
