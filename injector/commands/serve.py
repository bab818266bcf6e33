"""Run the admission webhook server (HTTPS) with /inject, /dry-run, /audit, /healthz, /readyz, /metrics.

The process that starts is a small supervisor: it checks the configuration and the certificate
(exit 2 when either is unusable), binds the listening sockets, and forks ``--workers`` uvicorn
workers. With ``--reuse-port`` (the default on Linux) each worker accepts on a socket of its own,
all bound to the port with ``SO_REUSEPORT``: the kernel deals new connections out by a hash of
their addresses, so a burst of them (a load balancer, the API server, a benchmark opening its
connections at once) is split evenly from the first one instead of going to whichever worker
happened to be idle. The supervisor keeps every socket open, so connections dealt to a worker
that died wait in its queue for the replacement instead of being reset. Without it, all workers
accept on one shared socket. Each worker loads, reloads and serves on its own; their metrics
meet in a shared directory (prometheus_client's multiprocess mode) so any worker's ``/metrics``
shows the sum. A worker that dies is replaced; SIGTERM/SIGINT stop the workers gracefully.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("injector.serve")

DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024  # = injector.http.DEFAULT_MAX_BODY_BYTES (kept import-free)
MiB = 1024 * 1024
#: Linux balances SO_REUSEPORT listeners; elsewhere the option means something else or nothing.
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"),
              proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Cores this process may use: the cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``),
    rounded up, and never more than the CPUs it is allowed to run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota: float | None = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2: "0::/path"
            for base in (cgroup_root / rel, cgroup_root):
                with contextlib.suppress(OSError, ValueError):
                    limit, period = (base / "cpu.max").read_text().split()[:2]
                    if limit != "max":
                        quota = int(limit) / int(period)
                    break
        elif "cpu" in controllers.split(","):
            for mount in (cgroup_root / controllers, cgroup_root / "cpu,cpuacct", cgroup_root / "cpu"):
                found = False
                for base in (mount / rel, mount):
                    with contextlib.suppress(OSError, ValueError):
                        q = int((base / "cpu.cfs_quota_us").read_text())
                        period = int((base / "cpu.cfs_period_us").read_text())
                        if q > 0:
                            quota = q / period
                        found = True
                        break
                if found:
                    break
        if quota is not None:
            break
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    return max(1, cpus)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from injector.dryrun_runner import DryRunProcessLimits
    from injector.http import HttpLimits

    http, dry = HttpLimits(), DryRunProcessLimits()
    parser.add_argument("--address", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9443, help="HTTPS port (default: %(default)s)")
    parser.add_argument("--tls-cert-file", required=True,
                        help="PEM certificate chain served to the API server; re-read when it changes")
    parser.add_argument("--tls-key-file", required=True, help="PEM private key of --tls-cert-file")
    parser.add_argument("--tls-reload-interval", type=float, default=1.0, metavar="SECONDS",
                        help="how often the certificate files are checked for changes (default: %(default)s)")
    parser.add_argument("--config-dir", default=None,
                        help="configuration directory (a mounted ConfigMap: config/values/templates); "
                             "built-in defaults when omitted")
    parser.add_argument("--config-reload-interval", type=float, default=2.0, metavar="SECONDS",
                        help="how often --config-dir is checked for changes (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0,
                        help="uvicorn worker processes; 0 = one per core of the container's CPU limit "
                             "(cgroup v1/v2 quota, else the CPUs this process may run on) (default: 0)")
    parser.add_argument("--reuse-port", action=argparse.BooleanOptionalAction, default=REUSE_PORT,
                        help="with several workers, a listening socket per worker (SO_REUSEPORT: the "
                             "kernel spreads new connections evenly) instead of one shared by all "
                             "(default: %(default)s)")
    parser.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True,
                        help="the HTTP protocol answers a POST /inject of up to 256 KiB itself (no ASGI "
                             "task, one write); --no-fast-path sends every request through ASGI (same "
                             "answers; for comparison) (default: %(default)s)")
    parser.add_argument("--answer-memo", type=int, default=512, metavar="ENTRIES",
                        help="remember the answers for this many distinct pods: a replica of a pod "
                             "already answered (the same at admission but for its token volume's name "
                             "and managedFields, same namespace and "
                             "config) is answered again without the injection core; 0 turns it off "
                             "(default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted; larger ones get HTTP 400 (default: %(default)s)")
    limits = parser.add_argument_group("HTTP limits (per worker; each refusal names its flag)")
    limits.add_argument("--max-header-bytes", type=int, default=http.max_header_bytes,
                        help="request line + headers; larger gets 431 (default: %(default)s)")
    limits.add_argument("--max-headers", type=int, default=http.max_headers,
                        help="request headers; more gets 431 (default: %(default)s)")
    limits.add_argument("--header-timeout", type=float, default=http.header_timeout, metavar="SECONDS",
                        help="time for a request's headers to arrive, then 408 (default: %(default)s)")
    limits.add_argument("--body-timeout", type=float, default=http.body_timeout, metavar="SECONDS",
                        help="time for a request's body after its headers; then 408 (default: %(default)s)")
    limits.add_argument("--request-deadline", type=float, default=http.request_deadline, metavar="SECONDS",
                        help="an admission review not decided by then is answered allowed: false, reason "
                             "Timeout; keep it below the webhook's timeoutSeconds (default: %(default)s)")
    limits.add_argument("--keepalive-timeout", type=float, default=http.keepalive_timeout, metavar="SECONDS",
                        help="idle keep-alive connections are closed after this (default: %(default)s)")
    limits.add_argument("--max-requests-per-connection", type=int, default=http.max_requests_per_connection,
                        help="then the answer says Connection: close, so long-lived clients spread over "
                             "workers and replicas; 0 = unlimited (default: %(default)s)")
    limits.add_argument("--max-connections", type=int, default=http.max_connections,
                        help="open connections per worker (lowered to fit RLIMIT_NOFILE); a new one evicts "
                             "the slowest client still sending headers (default: %(default)s)")
    limits.add_argument("--tls-handshake-timeout", type=float, default=http.tls_handshake_timeout,
                        metavar="SECONDS", help="(default: %(default)s)")
    limits.add_argument("--drain-timeout", type=float, default=http.drain_timeout, metavar="SECONDS",
                        help="on SIGTERM, keep answering on open connections (each answer closing its "
                             "connection) for up to this long (default: %(default)s)")
    dr = parser.add_argument_group("/dry-run (runs in a child process per request)")
    dr.add_argument("--dry-run-auth", choices=["tokenreview", "none"], default="tokenreview",
                    help="tokenreview: bearer token + SubjectAccessReview 'create pods'; none: for a "
                         "server on a laptop only (default: %(default)s)")
    dr.add_argument("--dry-run-max-body-bytes", type=int, default=dry.max_body_bytes,
                    help="(default: %(default)s)")
    dr.add_argument("--dry-run-timeout", type=float, default=dry.timeout, metavar="SECONDS",
                    help="wall clock and CPU time of one dry-run (default: %(default)s)")
    dr.add_argument("--dry-run-max-memory", type=int, default=dry.max_memory_bytes // MiB, metavar="MIB",
                    help="memory one dry-run may add (default: %(default)s)")
    dr.add_argument("--dry-run-max-output", type=int, default=dry.max_output_bytes // MiB, metavar="MIB",
                    help="(default: %(default)s)")
    dr.add_argument("--dry-run-concurrency", type=int, default=dry.concurrency,
                    help="dry-runs at once per worker; more get 429 (default: %(default)s)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                        help="kubeconfig for Events, /audit and /dry-run authentication (default: "
                             "$KUBECONFIG, else in-cluster credentials when running in a pod, else no API "
                             "access)")
    parser.add_argument("--no-events", action="store_true",
                        help="do not post Kubernetes Events for rejected pods and warnings")
    parser.add_argument("--events-queue-size", type=int, default=256,
                        help="pending Events kept before new ones are dropped (default: %(default)s)")
    parser.add_argument("--event-loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="event loop implementation; auto uses uvloop when it is installed "
                             "(default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level of the JSON logs on stderr (default: %(default)s)")


def _limits(args: argparse.Namespace) -> tuple[Any, Any]:
    from injector.dryrun_runner import DryRunProcessLimits
    from injector.http import HttpLimits

    http = HttpLimits(
        max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        request_deadline=args.request_deadline, keepalive_timeout=args.keepalive_timeout,
        max_requests_per_connection=args.max_requests_per_connection,
        max_connections=args.max_connections, tls_handshake_timeout=args.tls_handshake_timeout,
        drain_timeout=args.drain_timeout,
    )
    dry = DryRunProcessLimits(
        max_body_bytes=args.dry_run_max_body_bytes, timeout=args.dry_run_timeout,
        max_memory_bytes=args.dry_run_max_memory * MiB, max_output_bytes=args.dry_run_max_output * MiB,
        concurrency=args.dry_run_concurrency, auth=args.dry_run_auth == "tokenreview",
    )
    for name in ("header_timeout", "body_timeout", "request_deadline", "keepalive_timeout",
                 "tls_handshake_timeout"):
        if getattr(http, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if min(http.max_header_bytes, http.max_headers, http.max_connections, dry.concurrency, dry.timeout) <= 0:
        raise ValueError("limits must be > 0")
    return http, dry


def _listen(address: str, port: int, count: int = 1) -> list[socket.socket]:
    """``count`` listening sockets on (address, port): one, or ``SO_REUSEPORT`` siblings (the
    later ones bind the port the first got, so ``--port 0`` works too)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, port))
            port = sock.getsockname()[1]
            sock.listen(2048)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def run(args: argparse.Namespace) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="mesh-injector-metrics-")
    try:
        return _supervise(args, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(args: argparse.Namespace, metrics_dir: str) -> int:
    from injector import metrics as metrics_mod
    from injector.config import ConfigError
    from injector.configwatch import ConfigHolder
    from injector.metrics import InjectorMetrics, mark_process_dead
    from injector.server import configure_logging
    from injector.tls import CertificateError, ReloadingCertificate

    configure_logging(args.log_level)
    try:
        http_limits, dry_limits = _limits(args)
    except ValueError as exc:
        log.error("cannot start: invalid limit", extra={"error": str(exc)})
        return 2
    # Loaded here so that a broken start fails at once (exit 2); the workers inherit both. These
    # metrics count in memory and are dropped: the workers publish their own.
    scratch = InjectorMetrics()
    config = ConfigHolder(args.config_dir, scratch)
    try:
        config.load_initial()
    except ConfigError as exc:
        log.error("cannot start: invalid configuration", extra={"error": str(exc)})
        return 2
    certificate = ReloadingCertificate(args.tls_cert_file, args.tls_key_file)
    try:
        certificate.load()
    except CertificateError as exc:
        log.error("cannot start: no usable serving certificate", extra={"error": str(exc)})
        return 2
    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        log.error("cannot start: kubeconfig unusable", extra={"error": f"{args.kubeconfig} is not a file"})
        return 2
    workers = args.workers if args.workers > 0 else cpu_limit()
    try:
        socks = _listen(args.address, args.port, workers if args.reuse_port and workers > 1 else 1)
    except OSError as exc:
        log.error("cannot start: cannot listen", extra={"error": str(exc), "port": args.port})
        return 2
    # From here on every metric counts into the directory the workers share.
    metrics_mod.enable_multiprocess(metrics_dir)
    from injector.http import ConnectionShares

    shares = ConnectionShares.create(workers) if workers > 1 else None
    log.info("serving", extra={"address": args.address, "port": args.port, "config_hash": config.config_hash,
                               "workers": workers, "reuse_port": len(socks) > 1,
                               "connection_cap": http_limits.connection_cap()})

    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        for sock in socks:  # once the workers close theirs too, new connections are refused, not queued
            sock.close()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started)

    def spawn(index: int) -> None:
        if shares is not None:
            ConnectionShares(shares, index, workers).reset()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                own = socks[index % len(socks)]
                for other in socks:  # the siblings stay with the supervisor and their own workers
                    if other is not own:
                        other.close()
                code = _worker(args, index, workers, own, config, certificate, http_limits, dry_limits,
                               shares)
            except BaseException:
                log.exception("worker failed", extra={"worker": index})
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = (index, time.monotonic())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(workers):
        spawn(index)
    failures = 0
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index, started = children.pop(pid)
        mark_process_dead(pid)
        if stopping:
            continue
        failures = failures + 1 if time.monotonic() - started < 5 else 0
        log.error("worker exited; starting a new one",
                  extra={"worker": index, "pid": pid, "status": status, "restarts_in_a_row": failures})
        time.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)))
        if not stopping:
            spawn(index)
    return 0


def _worker(args: argparse.Namespace, index: int, workers: int, sock: socket.socket, config: Any,
            certificate: Any, http_limits: Any, dry_limits: Any, shares: Any) -> int:
    """One uvicorn worker on its listening socket (runs in the forked child)."""
    import uvicorn

    from injector.dryrun_runner import DryRunRunner
    from injector.events import EventRecorder, api_client
    from injector.http import ConnectionShares, LimitedServer, ServerState, protocol_class
    from injector.metrics import InjectorMetrics
    from injector.server import INLINE_BODY_BYTES, create_app

    metrics = InjectorMetrics()
    config.metrics = metrics
    if index == 0:  # the start-up loads happened once, for all workers
        metrics.config_reloads.inc("success")
        metrics.cert_reloads.inc("success")
    try:
        api = api_client(args.kubeconfig)
    except Exception as exc:
        log.error("cannot start: kubeconfig unusable", extra={"error": str(exc)})
        return 2
    if api is not None:
        def cluster_version() -> str | None:
            from kubernetes import client

            raw = client.VersionApi(api).get_code(_preload_content=False, _request_timeout=5)
            return str(json.loads(raw.data).get("gitVersion") or "") or None

        config.cluster_version = cluster_version
    config.refresh_cluster_version()  # nativeSidecars: auto follows this cluster's version
    events = None if args.no_events else EventRecorder(api, metrics, max_queue=args.events_queue_size)
    state = ServerState(
        config=config, metrics=metrics, certificate=certificate, events=events, api=api,
        max_body_bytes=args.max_body_bytes, tls_reload_interval=args.tls_reload_interval,
        config_reload_interval=args.config_reload_interval, limits=http_limits,
        dry_run=DryRunRunner(dry_limits), worker=index, workers=workers,
        answer_memo=max(0, args.answer_memo),
    )
    state.dry_run.warm(config.current)
    app = create_app(state)
    uv_config = uvicorn.Config(
        app,
        # httptools (C parser) plus our limits and the connection balance between workers
        http=protocol_class(http_limits, metrics,
                            ConnectionShares(shares, index, workers) if shares is not None else None,
                            inline=app.inject_endpoint if args.fast_path else None,
                            inline_max_bytes=min(INLINE_BODY_BYTES, args.max_body_bytes)),
        ws="none",
        loop=args.event_loop,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_keep_alive=math.ceil(http_limits.keepalive_timeout),
        workers=1,
    )
    uv_config.load()
    # Our own context: its SNI callback moves each handshake to the newest certificate.
    uv_config.ssl = certificate.listening_context
    server = LimitedServer(uv_config, http_limits)
    log.info("worker serving", extra={"worker": index, "pid": os.getpid(), "api": api is not None,
                                      "events": bool(events and events.enabled)})
    server.run(sockets=[sock])  # with the loop factory of --event-loop
    return 0
