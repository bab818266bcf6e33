"""Names shared by the bootstrap (built by the injector) and the agent (which runs in the proxy image).

Stdlib only and no imports of ``injector``/``cni``: the proxy image carries ``proxyagent`` alone.
Per-pod settings travel as Envoy runtime keys: the bootstrap declares them with the injector's
defaults in the ``defaults`` layer, and the agent fills the ``pod`` layer from the pod's proxy
config before starting Envoy, so one static bootstrap serves every pod.
"""

from __future__ import annotations

ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
STATUS_PORT = 15020
HEALTH_PORT = 15021
PROMETHEUS_PORT = 15090

OUTBOUND_LISTENER = "virtualOutbound"
INBOUND_LISTENER = "virtualInbound"
HEALTH_LISTENER = "health"
PROMETHEUS_LISTENER = "prometheus_stats"

#: Runtime layer the agent fills per pod (the last layer wins).
POD_LAYER = "pod"
#: Percent (0-100) of connections/requests logged; 0 turns access logs off.
ACCESS_LOG_KEY = "mesh.access_log"


def connection_limit_key(listener: str) -> str:
    """Envoy's runtime key for one listener's active connection cap."""
    return f"envoy.resource_limits.listener.{listener}.connection_limit"


#: proxyMetadata / environment names the agent understands (Istio passes proxyMetadata as env).
ENV_ACCESS_LOG = "MESH_ACCESS_LOG"
ENV_MAX_CONNECTIONS = "MESH_MAX_CONNECTIONS"
#: Bounds on MESH_MAX_CONNECTIONS (per capture listener).
MAX_CONNECTIONS_LIMIT = 1_000_000
