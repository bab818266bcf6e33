"""The one definition of the pod annotations shared by the injector and the CNI plugin.

The injector validates these annotations, resolves defaults and writes the resolved values back
onto the pod; the CNI plugin reads them and turns them into a redirect plan. Both import this
module, so the injector rejects exactly what the plugin would reject. Standard library only: it
is on the CNI hot path, which runs as a fresh process per pod start.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

# --- Annotation and label keys (Istio's names where Istio has one) ---------------------------

INJECT = "sidecar.istio.io/inject"  # label (preferred) or annotation: "true" / "false"
STATUS = "sidecar.istio.io/status"  # JSON written by the injector: what it injected
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
STATUS_PORT = "status.sidecar.istio.io/port"
# Ours: Istio keeps these in proxy config / pilot-agent flags; the plugin needs them resolved.
PROXY_UID = "traffic.mesh-injector.io/proxyUID"
PROXY_GID = "traffic.mesh-injector.io/proxyGID"
CAPTURE_DNS = "traffic.mesh-injector.io/captureDNS"

#: Every annotation whose value the injector validates and writes back resolved.
TRAFFIC_ANNOTATIONS: tuple[str, ...] = (
    INTERCEPTION_MODE,
    INCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INTERFACES,
    STATUS_PORT,
    PROXY_UID,
    PROXY_GID,
    CAPTURE_DNS,
)

# --- Well-known ports and addresses -----------------------------------------------------------

OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
TUNNEL_PORT = 15008  # HBONE
STATUS_PORT_DEFAULT = 15020  # agent: merged metrics, app probes
HEALTH_PORT = 15021  # proxy readiness
DNS_CAPTURE_PORT = 15053
PROMETHEUS_PORT = 15090  # Envoy stats
PROXY_UID_DEFAULT = 1337
#: The proxy's own ports, never redirected inbound whatever the annotations say.
PROXY_INBOUND_PORTS: tuple[int, ...] = (TUNNEL_PORT, STATUS_PORT_DEFAULT, HEALTH_PORT, PROMETHEUS_PORT)
#: Source address the proxy uses to hand inbound traffic to the app over loopback.
INBOUND_PASSTHROUGH_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_V6 = "::6"

MODE_REDIRECT = "REDIRECT"
MODE_TPROXY = "TPROXY"
MODE_NONE = "NONE"
ALL = "*"


class AnnotationError(ValueError):
    """A pod annotation has a value we cannot act on; names the annotation and the value."""

    def __init__(self, annotation: str, value: str, problem: str) -> None:
        self.annotation = annotation
        self.value = value
        self.problem = problem
        super().__init__(f"annotation {annotation}={value!r}: {problem}")


# --- Value parsers: one per kind of value -----------------------------------------------------


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_port(annotation: str, value: str, item: str | None = None) -> int:
    """A TCP port number, 1..65535 (``item`` is one entry of a list ``value``, for the error)."""
    text = (value if item is None else item).strip()
    if not text.isdigit():
        raise AnnotationError(annotation, value, f"{text!r} is not a port number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise AnnotationError(annotation, value, f"port {port} is outside 1-65535")
    return port


def parse_ports(annotation: str, value: str, *, allow_all: bool = False) -> tuple[int, ...] | None:
    """Comma-separated ports; ``*`` (where allowed) means every port and returns None."""
    text = value.strip()
    if text == ALL:
        if not allow_all:
            raise AnnotationError(annotation, value, "'*' is not allowed here")
        return None
    ports: set[int] = set()
    for item in _items(text):
        if item == ALL:
            raise AnnotationError(annotation, value, "'*' must stand alone")
        ports.add(parse_port(annotation, value, item))
    return tuple(sorted(ports))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidrs(annotation: str, value: str, *, allow_all: bool = False) -> tuple[Network, ...] | None:
    """Comma-separated IPv4/IPv6 CIDRs (host bits are masked); ``*`` (where allowed) is None."""
    text = value.strip()
    if text == ALL:
        if not allow_all:
            raise AnnotationError(annotation, value, "'*' is not allowed here")
        return None
    networks: dict[str, Network] = {}
    for item in _items(text):
        if item == ALL:
            raise AnnotationError(annotation, value, "'*' must stand alone")
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise AnnotationError(annotation, value, f"{item!r} is not an IP address or CIDR") from None
        networks[str(network)] = network
    return tuple(sorted(networks.values(), key=lambda n: (n.version, n.network_address, n.prefixlen)))


def parse_interfaces(annotation: str, value: str) -> tuple[str, ...]:
    """Comma-separated Linux interface names (1-15 bytes, no '/', whitespace or ':')."""
    names: list[str] = []
    for item in _items(value):
        if len(item.encode()) > 15 or any(c in item for c in "/: \t") or item in (".", ".."):
            raise AnnotationError(annotation, value, f"{item!r} is not a valid interface name")
        if item not in names:
            names.append(item)
    return tuple(sorted(names))


def parse_bool(annotation: str, value: str) -> bool:
    """Kubernetes-style booleans as Istio accepts them (true/false, y/n, yes/no, on/off, 1/0)."""
    text = value.strip().lower()
    if text in ("true", "y", "yes", "on", "1"):
        return True
    if text in ("false", "n", "no", "off", "0"):
        return False
    raise AnnotationError(annotation, value, "expected true or false")


def parse_id(annotation: str, value: str) -> int:
    """A Linux uid/gid."""
    text = value.strip()
    if not text.isdigit() or int(text) > 2**32 - 2:
        raise AnnotationError(annotation, value, "expected a numeric uid/gid")
    return int(text)


def parse_mode(annotation: str, value: str) -> str:
    text = value.strip().upper()
    if text == MODE_TPROXY:
        raise AnnotationError(annotation, value, "TPROXY interception is not supported; use REDIRECT or NONE")
    if text not in (MODE_REDIRECT, MODE_NONE):
        raise AnnotationError(annotation, value, "expected REDIRECT or NONE")
    return text


# --- The redirect plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficDefaults:
    """Mesh-wide defaults, used where a pod does not set the annotation (values.global.proxy)."""

    interception_mode: str = MODE_REDIRECT
    include_outbound_ip_ranges: str = ALL
    exclude_outbound_ip_ranges: str = ""
    include_inbound_ports: str = ALL
    exclude_inbound_ports: str = ""
    include_outbound_ports: str = ""
    exclude_outbound_ports: str = ""
    exclude_interfaces: str = ""
    status_port: int = STATUS_PORT_DEFAULT
    proxy_uid: int = PROXY_UID_DEFAULT
    proxy_gid: int = PROXY_UID_DEFAULT
    capture_dns: bool = False


@dataclass(frozen=True)
class RedirectPlan:
    """What to redirect inside one pod's network namespace (Istio REDIRECT semantics).

    ``inbound_ports``/``outbound_include_cidrs`` of None mean "all"; an empty tuple means "none".
    """

    mode: str = MODE_REDIRECT
    proxy_uid: int = PROXY_UID_DEFAULT
    proxy_gid: int = PROXY_UID_DEFAULT
    outbound_capture_port: int = OUTBOUND_CAPTURE_PORT
    inbound_capture_port: int = INBOUND_CAPTURE_PORT
    inbound_ports: tuple[int, ...] | None = None
    inbound_exclude_ports: tuple[int, ...] = PROXY_INBOUND_PORTS
    outbound_include_cidrs: tuple[Network, ...] | None = None
    outbound_exclude_cidrs: tuple[Network, ...] = ()
    outbound_include_ports: tuple[int, ...] = ()
    outbound_exclude_ports: tuple[int, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    capture_dns: bool = False
    dns_capture_port: int = DNS_CAPTURE_PORT
    status_port: int = STATUS_PORT_DEFAULT

    @property
    def redirects(self) -> bool:
        return self.mode == MODE_REDIRECT


@dataclass(frozen=True)
class ResolvedTraffic:
    """A validated plan plus the annotation values that reproduce it, for writing onto the pod."""

    plan: RedirectPlan
    annotations: dict[str, str] = field(default_factory=dict)


def _ports_text(ports: tuple[int, ...] | None) -> str:
    return ALL if ports is None else ",".join(str(p) for p in ports)


def _cidrs_text(cidrs: tuple[Network, ...] | None) -> str:
    return ALL if cidrs is None else ",".join(str(c) for c in cidrs)


def resolve_traffic(
    annotations: Mapping[str, str], defaults: TrafficDefaults | None = None
) -> ResolvedTraffic:
    """Validate the pod's traffic annotations over the defaults; raise AnnotationError on the first bad one.

    The returned ``annotations`` hold every traffic key in canonical form, so the plugin reading
    them back gets the same plan without knowing the injector's defaults.
    """
    d = defaults or TrafficDefaults()

    def get(key: str, default: str) -> str:
        value = annotations.get(key)
        return default if value is None else str(value)

    mode = parse_mode(INTERCEPTION_MODE, get(INTERCEPTION_MODE, d.interception_mode))
    status_port = parse_port(STATUS_PORT, get(STATUS_PORT, str(d.status_port)))
    inbound_ports = parse_ports(INCLUDE_INBOUND_PORTS, get(INCLUDE_INBOUND_PORTS, d.include_inbound_ports),
                                allow_all=True)
    user_inbound_excludes = parse_ports(EXCLUDE_INBOUND_PORTS,
                                        get(EXCLUDE_INBOUND_PORTS, d.exclude_inbound_ports)) or ()
    include_cidrs = parse_cidrs(INCLUDE_OUTBOUND_IP_RANGES,
                                get(INCLUDE_OUTBOUND_IP_RANGES, d.include_outbound_ip_ranges), allow_all=True)
    exclude_cidrs = parse_cidrs(EXCLUDE_OUTBOUND_IP_RANGES,
                                get(EXCLUDE_OUTBOUND_IP_RANGES, d.exclude_outbound_ip_ranges)) or ()
    include_out_ports = parse_ports(INCLUDE_OUTBOUND_PORTS,
                                    get(INCLUDE_OUTBOUND_PORTS, d.include_outbound_ports)) or ()
    exclude_out_ports = parse_ports(EXCLUDE_OUTBOUND_PORTS,
                                    get(EXCLUDE_OUTBOUND_PORTS, d.exclude_outbound_ports)) or ()
    interfaces = parse_interfaces(EXCLUDE_INTERFACES, get(EXCLUDE_INTERFACES, d.exclude_interfaces))
    uid = parse_id(PROXY_UID, get(PROXY_UID, str(d.proxy_uid)))
    gid = parse_id(PROXY_GID, get(PROXY_GID, str(d.proxy_gid)))
    dns = parse_bool(CAPTURE_DNS, get(CAPTURE_DNS, "true" if d.capture_dns else "false"))

    inbound_excludes = tuple(sorted(set(PROXY_INBOUND_PORTS) | {status_port} | set(user_inbound_excludes)))
    plan = RedirectPlan(
        mode=mode,
        proxy_uid=uid,
        proxy_gid=gid,
        inbound_ports=inbound_ports,
        inbound_exclude_ports=inbound_excludes,
        outbound_include_cidrs=include_cidrs,
        outbound_exclude_cidrs=exclude_cidrs,
        outbound_include_ports=include_out_ports,
        outbound_exclude_ports=exclude_out_ports,
        exclude_interfaces=interfaces,
        capture_dns=dns,
        status_port=status_port,
    )
    resolved = {
        INTERCEPTION_MODE: mode,
        INCLUDE_OUTBOUND_IP_RANGES: _cidrs_text(include_cidrs),
        EXCLUDE_OUTBOUND_IP_RANGES: _cidrs_text(exclude_cidrs),
        INCLUDE_INBOUND_PORTS: _ports_text(inbound_ports),
        EXCLUDE_INBOUND_PORTS: _ports_text(tuple(user_inbound_excludes)),
        INCLUDE_OUTBOUND_PORTS: _ports_text(include_out_ports),
        EXCLUDE_OUTBOUND_PORTS: _ports_text(exclude_out_ports),
        EXCLUDE_INTERFACES: ",".join(interfaces),
        STATUS_PORT: str(status_port),
        PROXY_UID: str(uid),
        PROXY_GID: str(gid),
        CAPTURE_DNS: "true" if dns else "false",
    }
    return ResolvedTraffic(plan=plan, annotations=resolved)


def plan_from_annotations(
    annotations: Mapping[str, str], defaults: TrafficDefaults | None = None
) -> RedirectPlan:
    """The CNI side: the plan for a pod from its (injector-resolved) annotations."""
    return resolve_traffic(annotations, defaults).plan


# --- Injection status -------------------------------------------------------------------------


@dataclass(frozen=True)
class InjectionStatus:
    """The parsed ``sidecar.istio.io/status`` annotation (Istio's shape, plus our extras)."""

    init_containers: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    image_pull_secrets: tuple[str, ...] = ()
    revision: str = "default"
    templates: tuple[str, ...] = ()
    config_hash: str = ""  # of the config it was rendered with: tells stale pods apart

    def to_json(self) -> str:
        body = {
            "initContainers": list(self.init_containers),
            "containers": list(self.containers),
            "volumes": list(self.volumes),
            "imagePullSecrets": list(self.image_pull_secrets),
            "revision": self.revision,
        }
        if self.templates:
            body["templates"] = list(self.templates)
        if self.config_hash:
            body["configHash"] = self.config_hash
        return json.dumps(body, separators=(",", ":"))


def parse_status(value: str) -> InjectionStatus:
    """Parse the status annotation; raise AnnotationError when it is not the JSON object we write."""
    try:
        body = json.loads(value)
    except ValueError:
        raise AnnotationError(STATUS, value, "not valid JSON") from None
    if not isinstance(body, dict):
        raise AnnotationError(STATUS, value, "not a JSON object")

    def names(key: str) -> tuple[str, ...]:
        items = body.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise AnnotationError(STATUS, value, f"{key} must be a list of names")
        return tuple(items)

    return InjectionStatus(
        init_containers=names("initContainers"),
        containers=names("containers"),
        volumes=names("volumes"),
        image_pull_secrets=names("imagePullSecrets"),
        revision=str(body.get("revision") or "default"),
        templates=names("templates"),
        config_hash=str(body.get("configHash") or ""),
    )


@dataclass(frozen=True)
class RedirectDecision:
    """Whether the CNI plugin should program a pod, and why (stable reason code)."""

    redirect: bool
    reason: str
    message: str


def redirect_decision(annotations: Mapping[str, str]) -> RedirectDecision:
    """The plugin's per-pod gate: only injected, not opted-out, intercepting pods are redirected.

    Does not validate the traffic annotations; ``plan_from_annotations`` does.
    """
    if STATUS not in annotations:
        return RedirectDecision(False, "NotInjected", f"pod has no {STATUS} annotation")
    inject = annotations.get(INJECT)
    if inject is not None and inject.strip().lower() in ("false", "n", "no", "off", "0"):
        return RedirectDecision(False, "InjectionDisabled", f"{INJECT}={inject}")
    mode = annotations.get(INTERCEPTION_MODE, MODE_REDIRECT).strip().upper()
    if mode == MODE_NONE:
        return RedirectDecision(False, "InterceptionNone", f"{INTERCEPTION_MODE}=NONE")
    return RedirectDecision(True, "Injected", "pod is injected; redirecting its traffic")
