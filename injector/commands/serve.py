"""Run the admission webhook server (HTTPS) with /inject, /dry-run, /audit, /healthz, /readyz, /metrics."""

from __future__ import annotations

import argparse
import logging
import os

from injector.server import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger("injector.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted; larger ones get HTTP 400 (default: %(default)s)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                        help="kubeconfig for Events and /audit (default: $KUBECONFIG, else in-cluster "
                             "credentials when running in a pod, else no API access)")
    parser.add_argument("--no-events", action="store_true",
                        help="do not post Kubernetes Events for rejected pods and warnings")
    parser.add_argument("--events-queue-size", type=int, default=256,
                        help="pending Events kept before new ones are dropped (default: %(default)s)")
    parser.add_argument("--event-loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="event loop implementation; auto uses uvloop when it is installed "
                             "(default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level of the JSON logs on stderr (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from injector.config import ConfigError
    from injector.configwatch import ConfigHolder
    from injector.events import EventRecorder, api_client
    from injector.metrics import InjectorMetrics
    from injector.server import ServerState, configure_logging, create_app
    from injector.tls import CertificateError, ReloadingCertificate

    configure_logging(args.log_level)
    metrics = InjectorMetrics()
    config = ConfigHolder(args.config_dir, metrics)
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
    metrics.cert_reloads.inc("success")
    try:
        api = api_client(args.kubeconfig)
    except Exception as exc:
        log.error("cannot start: kubeconfig unusable", extra={"error": str(exc)})
        return 2
    events = None if args.no_events else EventRecorder(api, metrics, max_queue=args.events_queue_size)
    state = ServerState(
        config=config,
        metrics=metrics,
        certificate=certificate,
        events=events,
        api=api,
        max_body_bytes=args.max_body_bytes,
        tls_reload_interval=args.tls_reload_interval,
        config_reload_interval=args.config_reload_interval,
    )
    app = create_app(state)
    try:
        import httptools  # noqa: F401 - uvicorn's C parser: ~2.7x the throughput of h11

        http_impl = "httptools"
    except ImportError:
        http_impl = "h11"
        log.warning("httptools is not installed: serving with the slower pure-Python h11 parser")
    uv_config = uvicorn.Config(
        app,
        host=args.address,
        port=args.port,
        http=http_impl,
        loop=args.event_loop,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_keep_alive=30,
        workers=1,
    )
    uv_config.load()
    # Our own context: its SNI callback moves each handshake to the newest certificate.
    uv_config.ssl = certificate.listening_context
    server = uvicorn.Server(uv_config)
    log.info("serving", extra={"address": args.address, "port": args.port, "config_hash": config.config_hash,
                               "events": bool(events and events.enabled), "api": api is not None,
                               "http": http_impl})
    server.run()  # with the loop factory of --event-loop
    return 0
