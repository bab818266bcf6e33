"""The static Envoy bootstrap for the ``envoy`` template: a transparent proxy with no control plane.

Traffic the redirect sends to 15001 (outbound) or 15006 (inbound) goes where it was going: the
``original_dst`` listener filter recovers the pre-redirect destination and an ORIGINAL_DST
cluster connects there. ``http_inspector`` sniffs each connection: HTTP/1.x and h2c pass through
the HTTP connection manager (per-direction request metrics, access logs), everything else
through the TCP proxy. Inbound connections leave from 127.0.0.6 / ::6, which the redirect rules
let through, so the app sees a loopback peer as under Istio. A connection whose original
destination is one of the proxy's own ports is blackholed: forwarding it would make Envoy
connect to itself until its circuit breakers trip.

Envoy's admin API listens on 127.0.0.1 only. The two listeners other pods can reach (readiness
on 15021, stats on 15090) normalise the path, reject escaped slashes, and route exactly one
``GET`` path with no query string to one fixed admin path; anything else is answered 404 by
Envoy itself. Every capture and status listener binds 0.0.0.0 and ``::``.

Per-pod switches (access logs, connection caps) are Envoy runtime keys, see proxyagent.settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cni import annotations as ann
from proxyagent import settings as ps

ADMIN_PORT = ps.ADMIN_PORT
_T = "type.googleapis.com/envoy.extensions."
_TCP_PROXY = _T + "filters.network.tcp_proxy.v3.TcpProxy"
_HCM = _T + "filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "filters.http.router.v3.Router"
_ORIGINAL_DST = _T + "filters.listener.original_dst.v3.OriginalDst"
_HTTP_INSPECTOR = _T + "filters.listener.http_inspector.v3.HttpInspector"
_FILE_LOG = _T + "access_loggers.file.v3.FileAccessLog"
_HTTP_OPTIONS = _T + "upstreams.http.v3.HttpProtocolOptions"
_DOWNSTREAM_CX = _T + "resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"

#: Original destinations never forwarded: the capture ports and admin (Istio blackholes these).
BLACKHOLE_PORTS: tuple[int, ...] = (ps.ADMIN_PORT, ps.OUTBOUND_PORT, ps.INBOUND_PORT)
#: What http_inspector reports for HTTP/1.x and cleartext HTTP/2.
_HTTP_PROTOCOLS = ["http/1.0", "http/1.1", "h2c"]


@dataclass(frozen=True)
class BootstrapSettings:
    """Injector-wide defaults; the agent may override the runtime-backed ones per pod."""

    access_log: bool = True
    #: Active downstream connections per capture listener (one peer cannot exhaust the proxy).
    max_connections: int = 10_000
    #: Active connections on each status listener (kubelet probes and scrapes need few).
    status_max_connections: int = 128
    connect_timeout: str = "10s"
    #: How long protocol sniffing waits for the first bytes before falling back to TCP
    #: (server-first protocols such as MySQL or SMTP wait this long once per connection).
    sniff_timeout: str = "1s"
    #: A client must finish sending request headers within this (slow-loris protection).
    request_headers_timeout: str = "10s"
    tcp_idle_timeout: str = "3600s"


def _address(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def _dual_stack(port: int) -> dict[str, Any]:
    """Listener address fields binding 0.0.0.0 and :: (IPv6-only socket) on ``port``."""
    return {
        "address": _address("0.0.0.0", port),
        "additional_addresses": [{"address": _address("::", port)}],
    }


def _json_log(direction: str, protocol: str | None) -> list[dict[str, Any]]:
    """One JSON line per request (HTTP) or connection (TCP) on stdout, gated by a runtime key."""
    fields = {
        "time": "%START_TIME%",
        "direction": direction,
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": protocol or "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "duration_ms": "%DURATION%",
        "upstream_host": "%UPSTREAM_HOST%",
        "original_destination": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "peer": "%DOWNSTREAM_REMOTE_ADDRESS%",
    }
    return [
        {
            "name": "envoy.access_loggers.file",
            "filter": {
                "runtime_filter": {
                    "runtime_key": ps.ACCESS_LOG_KEY,
                    "percent_sampled": {"numerator": 100, "denominator": "HUNDRED"},
                    "use_independent_randomness": True,
                }
            },
            "typed_config": {
                "@type": _FILE_LOG,
                "path": "/dev/stdout",
                "log_format": {"json_format": fields},
            },
        }
    ]


def _tcp_proxy(prefix: str, cluster: str, s: BootstrapSettings, log: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _TCP_PROXY,
        "stat_prefix": prefix,
        "cluster": cluster,
        "idle_timeout": s.tcp_idle_timeout,
    }
    if log is not None:
        config["access_log"] = _json_log(log, "TCP")
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": config}


def _hcm(
    prefix: str,
    routes: list[dict[str, Any]],
    s: BootstrapSettings,
    *,
    router_suppress_envoy_headers: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    router: dict[str, Any] = {"@type": _ROUTER}
    if router_suppress_envoy_headers:
        router["suppress_envoy_headers"] = True
    config = {
        "@type": _HCM,
        "stat_prefix": prefix,
        "codec_type": "AUTO",
        "request_headers_timeout": s.request_headers_timeout,
        "route_config": {
            "name": prefix,
            "virtual_hosts": [{"name": prefix, "domains": ["*"], "routes": routes}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": router}],
        **extra,
    }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _capture_listener(
    name: str, port: int, direction: str, cluster: str, s: BootstrapSettings
) -> dict[str, Any]:
    prefix = direction.lower()
    blackholes = [
        {
            "name": f"blackhole_{p}",
            "filter_chain_match": {"destination_port": p},
            "filters": [_tcp_proxy(f"{prefix}_blackhole", "BlackHoleCluster", s, None)],
        }
        for p in BLACKHOLE_PORTS
    ]
    passthrough = [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]
    http = {
        "name": f"{prefix}_http",
        "filter_chain_match": {"application_protocols": _HTTP_PROTOCOLS},
        "filters": [
            _hcm(
                prefix,
                passthrough,
                s,
                access_log=_json_log(prefix, None),
                upgrade_configs=[{"upgrade_type": "websocket"}],
                http2_protocol_options={"max_concurrent_streams": 1024},
                # A transparent proxy: keep the request and the app's answer as they were
                # (no path rewriting, the app's own Server header, no x-envoy-* headers).
                use_remote_address=False,
                normalize_path=False,
                server_header_transformation="PASS_THROUGH",
                router_suppress_envoy_headers=True,
                # Long-lived idle streams (gRPC watches) stay up; connections idle for an
                # hour close; the connection caps bound how many anyone can hold.
                stream_idle_timeout="0s",
                common_http_protocol_options={"idle_timeout": s.tcp_idle_timeout},
            )
        ],
    }
    return {
        "name": name,
        **_dual_stack(port),
        "traffic_direction": direction,
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": _ORIGINAL_DST}},
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": _HTTP_INSPECTOR}},
        ],
        "listener_filters_timeout": s.sniff_timeout,
        "continue_on_listener_filters_timeout": True,
        "filter_chains": [*blackholes, http],
        "default_filter_chain": {
            "name": f"{prefix}_tcp",
            "filters": [_tcp_proxy(prefix, cluster, s, prefix)],
        },
    }


def _status_listener(
    name: str, port: int, path: str, admin_path: str, s: BootstrapSettings
) -> dict[str, Any]:
    """One fixed GET route to one admin path; every other method, path or query is a local 404."""
    exact = [
        {"name": ":path", "string_match": {"exact": path}},
        {"name": ":method", "string_match": {"exact": "GET"}},
    ]
    routes = [
        {
            "match": {"path": path, "headers": exact},
            "route": {"cluster": "admin", "prefix_rewrite": admin_path, "timeout": "5s"},
        },
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    # An absolute-form or CONNECT request has no route either: CONNECT needs a connect_matcher.
    return {
        "name": name,
        **_dual_stack(port),
        "filter_chains": [
            {
                "filters": [
                    _hcm(
                        name,
                        routes,
                        s,
                        normalize_path=True,
                        merge_slashes=True,
                        path_with_escaped_slashes_action="REJECT_REQUEST",
                        stream_idle_timeout="10s",
                        common_http_protocol_options={"idle_timeout": "60s", "max_headers_count": 64},
                    )
                ]
            }
        ],
    }


def _original_dst_cluster(name: str, s: BootstrapSettings, bind: tuple[str, str] | None) -> dict[str, Any]:
    limit = s.max_connections
    cluster: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": s.connect_timeout,
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": limit,
                    "max_pending_requests": limit,
                    "max_requests": limit,
                    "max_retries": 0,
                }
            ]
        },
        # HTTP goes upstream in the protocol it came in (HTTP/1.1 stays 1.1, h2c stays h2c).
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            }
        },
    }
    if bind is not None:
        v4, v6 = bind
        # IP_BIND_ADDRESS_NO_PORT: the source port is chosen at connect(), per destination;
        # bind() alone would reserve a port against every destination (TIME_WAIT included),
        # which at a new connection per request slows and then exhausts the ephemeral range.
        no_port = [{"level": 0, "name": 24, "int_value": 1, "state": "STATE_PREBIND"}]
        cluster["upstream_bind_config"] = {
            "source_address": {"address": v4, "port_value": 0},
            "socket_options": no_port,
            "extra_source_addresses": [
                {"address": {"address": v6, "port_value": 0}, "socket_options": {"socket_options": no_port}}
            ],
        }
    return cluster


def build_bootstrap(settings: BootstrapSettings | None = None) -> dict[str, Any]:
    """The bootstrap as a dict in Envoy's v3 JSON form (snake_case field names)."""
    s = settings or BootstrapSettings()
    defaults = {
        ps.ACCESS_LOG_KEY: 100 if s.access_log else 0,
        ps.connection_limit_key(ps.OUTBOUND_LISTENER): s.max_connections,
        ps.connection_limit_key(ps.INBOUND_LISTENER): s.max_connections,
        ps.connection_limit_key(ps.HEALTH_LISTENER): s.status_max_connections,
        ps.connection_limit_key(ps.PROMETHEUS_LISTENER): s.status_max_connections,
    }
    listeners = [
        _capture_listener(ps.OUTBOUND_LISTENER, ps.OUTBOUND_PORT, "OUTBOUND", "PassthroughCluster", s),
        _capture_listener(ps.INBOUND_LISTENER, ps.INBOUND_PORT, "INBOUND", "InboundPassthroughCluster", s),
        _status_listener(
            ps.PROMETHEUS_LISTENER, ps.PROMETHEUS_PORT, "/stats/prometheus", "/stats/prometheus", s
        ),
        _status_listener(ps.HEALTH_LISTENER, ps.HEALTH_PORT, "/healthz/ready", "/ready", s),
    ]
    admin_cluster = {
        "name": "admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "admin",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", ADMIN_PORT)}}]}],
        },
    }
    global_cap = 2 * s.max_connections + 2 * s.status_max_connections
    return {
        "node": {"id": "mesh-injector-sidecar", "cluster": "mesh-injector"},
        "admin": {"address": _address("127.0.0.1", ADMIN_PORT)},
        "layered_runtime": {
            "layers": [
                {"name": "defaults", "static_layer": defaults},
                {"name": ps.POD_LAYER, "static_layer": {}},
            ]
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _DOWNSTREAM_CX,
                        "max_active_downstream_connections": global_cap,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                _original_dst_cluster("PassthroughCluster", s, None),
                _original_dst_cluster(
                    "InboundPassthroughCluster", s, (ann.INBOUND_PASSTHROUGH_V4, ann.INBOUND_PASSTHROUGH_V6)
                ),
                {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s"},
                admin_cluster,
            ],
        },
    }


def bootstrap_json(settings: BootstrapSettings | None = None) -> str:
    """Compact JSON (valid YAML) for Envoy's ``--config-yaml``."""
    return json.dumps(build_bootstrap(settings), separators=(",", ":"))
