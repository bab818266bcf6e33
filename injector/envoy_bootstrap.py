"""The static Envoy bootstrap for the ``envoy`` template: a transparent proxy with no control plane.

Traffic the redirect sends to 15001 (outbound) or 15006 (inbound) is forwarded to where it was
going: the ``original_dst`` listener filter recovers the pre-redirect destination and an
ORIGINAL_DST cluster connects there. Inbound connections leave from 127.0.0.6, which the
redirect rules let through, so the app sees a loopback peer like under Istio. The proxy runs as
the proxy UID, which the rules exempt, so its own connections are not captured again.
"""

from __future__ import annotations

import json
from typing import Any

from cni import annotations as ann

ADMIN_PORT = 15000
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_ORIGINAL_DST = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"


def _address(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def _capture_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": _address("0.0.0.0", port),
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": _ORIGINAL_DST}}
        ],
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": name, "cluster": cluster},
                    }
                ]
            }
        ],
    }


def _admin_route_listener(name: str, port: int, path: str, rewrite: str | None) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": "admin"}
    if rewrite is not None:
        route["prefix_rewrite"] = rewrite
    return {
        "name": name,
        "address": _address("0.0.0.0", port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": _HCM,
                            "stat_prefix": name,
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": name,
                                        "domains": ["*"],
                                        "routes": [{"match": {"prefix": path}, "route": route}],
                                    }
                                ]
                            },
                            "http_filters": [
                                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
                            ],
                        },
                    }
                ]
            }
        ],
    }


def _original_dst_cluster(name: str, bind_ip: str | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
    }
    if bind_ip is not None:
        cluster["upstream_bind_config"] = {"source_address": {"address": bind_ip, "port_value": 0}}
    return cluster


def build_bootstrap(
    *, health_port: int = ann.HEALTH_PORT, prometheus_port: int = ann.PROMETHEUS_PORT
) -> dict[str, Any]:
    """The bootstrap as a dict in Envoy's v3 JSON form (snake_case field names)."""
    return {
        "node": {"id": "mesh-injector-sidecar", "cluster": "mesh-injector"},
        "admin": {"address": _address("127.0.0.1", ADMIN_PORT)},
        "static_resources": {
            "listeners": [
                _capture_listener("virtualOutbound", ann.OUTBOUND_CAPTURE_PORT, "PassthroughCluster"),
                _capture_listener("virtualInbound", ann.INBOUND_CAPTURE_PORT, "InboundPassthroughCluster"),
                _admin_route_listener("prometheus_stats", prometheus_port, "/stats/prometheus", None),
                _admin_route_listener("health", health_port, "/healthz/ready", "/ready"),
            ],
            "clusters": [
                _original_dst_cluster("PassthroughCluster", None),
                _original_dst_cluster("InboundPassthroughCluster", ann.INBOUND_PASSTHROUGH_V4),
                {
                    "name": "admin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "admin",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", ADMIN_PORT)}}]}
                        ],
                    },
                },
            ],
        },
    }


def bootstrap_json() -> str:
    """Compact JSON (valid YAML) for Envoy's ``--config-yaml``."""
    return json.dumps(build_bootstrap(), separators=(",", ":"))
