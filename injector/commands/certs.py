"""Bootstrap, publish and rotate the webhook's TLS certificate (Secret + caBundle)."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from injector.certs import CertPolicy, ClusterCerts, Conflict, service_dns_names


def _duration(text: str) -> dt.timedelta:
    """``90d``, ``12h``, ``30m``, ``45s`` (or plain seconds) as a timedelta."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = text.strip()
    try:
        if text and text[-1] in units:
            return dt.timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return dt.timedelta(seconds=float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90d, 12h, 30m, 45s)") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--kubeconfig", default=env("KUBECONFIG"), help="kubeconfig file (default: in-cluster)"
    )
    parser.add_argument(
        "--namespace", default=env("POD_NAMESPACE", "mesh-system"), help="namespace of the Secret"
    )
    parser.add_argument(
        "--secret", default="mesh-injector-tls", help="Secret holding CA and serving certificate"
    )
    parser.add_argument(
        "--webhook-config",
        default="mesh-injector",
        help="our MutatingWebhookConfiguration whose caBundle is kept current ('' to leave webhooks alone)",
    )
    parser.add_argument(
        "--tag-webhook-config",
        action="append",
        default=[],
        metavar="NAME",
        help="a revision tag's MutatingWebhookConfiguration whose caBundle is kept current too (repeatable)",
    )
    parser.add_argument(
        "--service", default="mesh-injector", help="webhook Service: its DNS names go in the SANs"
    )
    parser.add_argument("--cluster-domain", default="cluster.local")
    parser.add_argument("--dns-name", action="append", default=[], help="extra DNS SAN (repeatable)")
    parser.add_argument("--ip", action="append", default=[], help="extra IP SAN (repeatable)")
    parser.add_argument("--ca-validity", type=_duration, default=_duration("365d"))
    parser.add_argument("--cert-validity", type=_duration, default=_duration("90d"))
    parser.add_argument(
        "--ca-renew-before", type=_duration, default=None, help="default: a third of its validity"
    )
    parser.add_argument(
        "--cert-renew-before", type=_duration, default=None, help="default: a third of its validity"
    )
    parser.add_argument(
        "--settle",
        type=_duration,
        default=_duration("30s"),
        help="how long a new CA is in the caBundle before it signs the served certificate",
    )
    parser.add_argument(
        "--overlap",
        type=_duration,
        default=_duration("10m"),
        help="how long a retired CA stays in the caBundle after its certificate was replaced",
    )
    parser.add_argument(
        "--write-dir", type=Path, default=None, help="also publish tls.crt/tls.key/ca.crt here"
    )
    parser.add_argument("--watch", action="store_true", help="keep reconciling (in-cluster sidecar mode)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between passes with --watch")
    parser.add_argument("--rotate-ca", action="store_true", help="start a CA rotation now")
    parser.add_argument("--renew", action="store_true", help="issue a new serving certificate now")


def _api_client(kubeconfig: str | None):  # -> kubernetes.client.ApiClient
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config()


class _NoCluster(Exception):
    """No Kubernetes API to talk to: one line on stderr, exit 2."""


def _connect(kubeconfig: str | None):  # -> kubernetes.client.ApiClient
    from kubernetes.config import ConfigException

    try:
        return _api_client(kubeconfig)
    except (ConfigException, OSError) as exc:
        where = kubeconfig or "in-cluster config or ~/.kube/config"
        raise _NoCluster(f"cannot use the kubeconfig ({where}): {exc}; give --kubeconfig, set KUBECONFIG, "
                         "or run inside the cluster") from None


def _api_failure(exc: Exception) -> str | None:
    """A one-line reason for an API or connection failure, None for anything else (a bug: re-raise)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return f"API request failed: {exc.status} {exc.reason}"
    if isinstance(exc, (HTTPError, OSError)):
        return f"cannot reach the API server: {exc}"
    return None


def run_against_cluster(command: str, body: Callable[[], int]) -> int:
    """``body()``, with no cluster to talk to (exit 2) or an API failure (exit 1) as one line on
    stderr naming ``command``, never a traceback (anything else is a bug and is raised)."""
    try:
        return body()
    except _NoCluster as exc:
        print(f"mesh-injector {command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = _api_failure(exc)
        if reason is None:
            raise
        print(f"mesh-injector {command}: {reason}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """Exit 0: certificate in place; 1: the API failed or kept conflicting; 2: no cluster to talk to."""
    return run_against_cluster("certs", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [*service_dns_names(args.service, args.namespace, args.cluster_domain), *args.dns_name, *args.ip]
    policy = CertPolicy(
        names=tuple(dict.fromkeys(names)),
        ca_validity=args.ca_validity,
        cert_validity=args.cert_validity,
        ca_renew_before=args.ca_renew_before,
        cert_renew_before=args.cert_renew_before,
        settle=args.settle,
        overlap=args.overlap,
    )
    certs = ClusterCerts(
        api_client=_connect(args.kubeconfig),
        namespace=args.namespace,
        secret_name=args.secret,
        webhook_config=args.webhook_config or None,
        tag_webhook_configs=tuple(args.tag_webhook_config),
        policy=policy,
        write_dir=args.write_dir,
    )
    if args.watch:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        certs.run(interval=args.interval, stop=stop, rotate_ca=args.rotate_ca, renew=args.renew)
        return 0
    for _ in range(5):
        try:
            result = certs.reconcile_once(rotate_ca=args.rotate_ca, renew=args.renew)
        except Conflict as exc:
            print(f"certs: {exc}; retrying", file=sys.stderr)
            continue
        state = result.state
        print(f"actions: {', '.join(result.actions) or 'none'}")
        for item in result.waiting:
            print(f"waiting: {item}")
        print(f"serving certificate expires {state.serving.not_after:%Y-%m-%d %H:%M:%S}Z")
        print(f"CA expires {state.ca.not_after:%Y-%m-%d %H:%M:%S}Z; caBundle holds {len(state.trusted)} CA")
        return 0
    print("certs: gave up after repeated conflicts", file=sys.stderr)
    return 1
