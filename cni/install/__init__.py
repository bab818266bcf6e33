"""`mesh-cni install` / `mesh-cni uninstall`: the CNI DaemonSet's main process.

Every flag can also come from an environment variable (DaemonSets configure through env); the
flag wins. Node prerequisites: create nodes with the taint ``cni.istio.io/not-ready:NoSchedule``
(kubelet ``--register-with-taints``) so nothing is scheduled before the agent removes it, which
it does for its own node (``NODE_NAME``) once the install is valid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cni.cli import argument_parser
from cni.install.agent import Agent, AgentConfig, install_signal_handlers
from cni.install.conflist import PLUGIN_DEFAULTS, EntryOptions
from cni.install.kubeconfig import api_server_url

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

#: (flag, env var, default, help). Booleans default to False and take env values 1/true/yes.
FLAGS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--cni-bin-dir", "CNI_BIN_DIR", "/opt/cni/bin", "host CNI bin dir the launcher goes into"),
    ("--cni-net-dir", "CNI_NET_DIR", "/etc/cni/net.d", "host CNI config dir to chain into"),
    ("--runtime-dir", "MESH_CNI_RUNTIME_DIR", "/opt/mesh-cni", "host dir for the self-contained runtime"),
    ("--state-dir", "MESH_CNI_STATE_DIR", "/var/lib/mesh-cni", "host dir for install state (exact restore)"),
    ("--kubeconfig", "MESH_CNI_KUBECONFIG", "/var/lib/mesh-cni/kubeconfig", "plugin kubeconfig path (0600)"),
    ("--token-file", "MESH_CNI_TOKEN_FILE", f"{SA_DIR}/token", "service-account token (projected, rotates)"),
    ("--ca-file", "MESH_CNI_CA_FILE", f"{SA_DIR}/ca.crt", "API server CA bundle"),
    (
        "--api-server",
        "MESH_CNI_API_SERVER",
        None,
        "API URL; default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT",
    ),
    ("--plugin-log-file", "MESH_CNI_PLUGIN_LOG_FILE", "/var/log/mesh-cni/mesh-cni.log", "conflist logFile"),
    ("--plugin-log-level", "MESH_CNI_PLUGIN_LOG_LEVEL", PLUGIN_DEFAULTS["logLevel"], "conflist logLevel"),
    (
        "--exclude-namespaces",
        "MESH_CNI_EXCLUDE_NAMESPACES",
        ",".join(PLUGIN_DEFAULTS["excludeNamespaces"]),
        "conflist excludeNamespaces (comma list)",
    ),
    (
        "--plugin-extra-json",
        "MESH_CNI_PLUGIN_EXTRA_JSON",
        "{}",
        "JSON object of extra keys for our conflist entry (e.g. the plugin's agentSocket)",
    ),
    ("--health-address", "MESH_CNI_HEALTH_ADDRESS", "0.0.0.0", "health/metrics listen address"),
    (
        "--health-port",
        "MESH_CNI_HEALTH_PORT",
        "8000",
        "health/metrics port (/readyz /healthz /metrics); -1 off",
    ),
    ("--node-name", "NODE_NAME", None, "this node (taint removal and repair act on it only)"),
    ("--repair", "MESH_CNI_REPAIR", "label", "pods started without redirect: off | label | delete"),
    (
        "--repair-exit-codes",
        "MESH_CNI_REPAIR_EXIT_CODES",
        "",
        "validation exit codes that mean 'no redirect' (comma list; empty: any non-zero)",
    ),
    ("--resync-seconds", "MESH_CNI_RESYNC_SECONDS", "5", "safety-net re-check period besides inotify"),
    ("--once-timeout", "MESH_CNI_ONCE_TIMEOUT", "60", "with --once: seconds to wait for a CNI config"),
    ("--log-level", "MESH_CNI_LOG_LEVEL", "info", "agent log level"),
)
BOOL_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--once", "MESH_CNI_ONCE", "install, verify and exit (init containers, tests)"),
    ("--keep-on-exit", "MESH_CNI_KEEP_ON_EXIT", "on SIGTERM leave everything installed (upgrades)"),
    ("--no-remove-taint", "MESH_CNI_NO_REMOVE_TAINT", "do not remove cni.istio.io/not-ready from the node"),
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def build_parser(prog: str = "mesh-cni install") -> argparse.ArgumentParser:
    parser = argument_parser(prog, __doc__)
    for flag, env, default, text in FLAGS:
        parser.add_argument(flag, default=os.environ.get(env, default), help=f"{text} [env {env}]")
    for flag, env, text in BOOL_FLAGS:
        parser.add_argument(
            flag, action="store_true", default=_truthy(os.environ.get(env)), help=f"{text} [env {env}]"
        )
    return parser


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    api = args.api_server
    if not api and os.environ.get("KUBERNETES_SERVICE_HOST"):
        api = api_server_url(
            os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        )
    if args.repair not in ("off", "label", "delete"):
        raise SystemExit(f"--repair must be off, label or delete, not {args.repair!r}")
    port = int(args.health_port)
    extra = json.loads(args.plugin_extra_json or "{}")
    if not isinstance(extra, dict):
        raise SystemExit("--plugin-extra-json must be a JSON object")
    kubeconfig = Path(args.kubeconfig)
    return AgentConfig(
        cni_bin_dir=Path(args.cni_bin_dir),
        cni_net_dir=Path(args.cni_net_dir),
        runtime_dir=Path(args.runtime_dir),
        state_dir=Path(args.state_dir),
        kubeconfig=kubeconfig,
        token_file=Path(args.token_file),
        ca_file=Path(args.ca_file) if args.ca_file else None,
        api_server=api or None,
        entry=EntryOptions(
            kubeconfig=str(kubeconfig),
            log_file=args.plugin_log_file,
            log_level=args.plugin_log_level,
            exclude_namespaces=tuple(n.strip() for n in args.exclude_namespaces.split(",") if n.strip()),
            extra=tuple(sorted(extra.items())),
        ),
        keep_on_exit=args.keep_on_exit,
        health_address=args.health_address,
        health_port=None if port < 0 else port,
        node_name=args.node_name or None,
        remove_taint=not args.no_remove_taint,
        repair_mode=args.repair,
        repair_exit_codes=frozenset(int(c) for c in args.repair_exit_codes.split(",") if c.strip()) or None,
        resync_s=float(args.resync_seconds),
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Install, keep installed until SIGTERM, then uninstall (unless --keep-on-exit)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.log_level)
    config = config_from_args(args)
    agent = Agent(config)
    if config.cni_net_dir == config.kubeconfig.parent:
        raise SystemExit("the kubeconfig must live outside the CNI net dir (the runtime would parse it)")
    if args.once:
        try:
            return agent.run(once=True, once_timeout_s=float(args.once_timeout))
        finally:
            agent.close()
    install_signal_handlers(agent)
    agent.start_health()
    agent.start_kube_workers()
    try:
        code = agent.run()
    finally:
        agent.close()
    if config.keep_on_exit:
        logging.getLogger("mesh-cni.install").info("--keep-on-exit: leaving the install in place")
    else:
        agent.uninstall()
    return code


def uninstall_main(argv: list[str] | None = None) -> int:
    """Remove exactly our conflist entry, launcher, kubeconfig and runtime (what SIGTERM does)."""
    args = build_parser("mesh-cni uninstall").parse_args(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.log_level)
    agent = Agent(config_from_args(args))
    try:
        agent.uninstall()
    finally:
        agent.close()
    return 0
