"""The one definition of the pod annotations shared by the injector and the CNI plugin.

The injector validates these annotations, resolves defaults and writes the resolved values back
onto the pod; the CNI plugin reads them and turns them into a redirect plan. Both import this
module, so the injector rejects exactly what the plugin would reject. Standard library only: it
is on the CNI hot path, which runs as a fresh process per pod start.
"""

from __future__ import annotations

import _socket

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (CNI hot path)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

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

# The injector's own (the plugin never reads them).
TEMPLATES = "inject.istio.io/templates"
NATIVE_SIDECAR = "sidecar.istio.io/nativeSidecar"
REWRITE_PROBES = "sidecar.istio.io/rewriteAppHTTPProbers"
PROXY_IMAGE = "sidecar.istio.io/proxyImage"
PROXY_CPU = "sidecar.istio.io/proxyCPU"
PROXY_MEMORY = "sidecar.istio.io/proxyMemory"
PROXY_CPU_LIMIT = "sidecar.istio.io/proxyCPULimit"
PROXY_MEMORY_LIMIT = "sidecar.istio.io/proxyMemoryLimit"
PROXY_CONFIG = "proxy.istio.io/config"
LOG_LEVEL = "sidecar.istio.io/logLevel"
COMPONENT_LOG_LEVEL = "sidecar.istio.io/componentLogLevel"
PROMETHEUS_MERGE = "prometheus.istio.io/merge-metrics"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
CANONICAL_NAME = "service.istio.io/canonical-name"  # label
CANONICAL_REVISION = "service.istio.io/canonical-revision"  # label
PROM_SCRAPE = "prometheus.io/scrape"
PROM_PORT = "prometheus.io/port"
PROM_PATH = "prometheus.io/path"

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

# --- Container names and limits ----------------------------------------------------------------

PROXY_CONTAINER = "istio-proxy"
#: The CNI-mode init container that proves the redirect works (the plugin must have run).
VALIDATION_CONTAINER = "istio-validation"
#: The init-container-mode container that programs the redirect itself.
INIT_CONTAINER = "istio-init"
#: Init containers whose presence in the status annotation means "redirect this pod".
CAPTURE_CONTAINERS: tuple[str, ...] = (VALIDATION_CONTAINER, INIT_CONTAINER)

#: Per annotation: the injector rejects more; the plugin's batch is atomic up to these.
MAX_CIDRS = 256
MAX_PORTS = 1024
MAX_INTERFACES = 64

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


class ReasonCode:
    """Every stable reason code, injector and plugin alike: logs, metrics labels and reports show
    the value. Add, never rename. Plain strings, not an ``enum`` (~3 ms on the CNI hot path);
    ``injector.result.ReasonCode`` is the same set as a StrEnum."""

    # inject
    INJECTED = "Injected"
    ALREADY_INJECTED = "AlreadyInjected"
    ALWAYS_INJECT_SELECTOR = "AlwaysInjectSelector"
    POLICY_ENABLED = "PolicyEnabled"
    POD_OPTED_IN = "PodOptedIn"
    # skip (webhook-level selection: what the API server selectors would have filtered out)
    NAMESPACE_NOT_SELECTED = "NamespaceNotSelected"
    REVISION_MISMATCH = "RevisionMismatch"
    # skip (in-code policy)
    HOST_NETWORK = "HostNetwork"
    SYSTEM_NAMESPACE = "SystemNamespace"
    POD_OPTED_OUT = "PodOptedOut"
    NEVER_INJECT_SELECTOR = "NeverInjectSelector"
    POLICY_DISABLED = "PolicyDisabled"
    # warnings (injection proceeds or skips with the default)
    INVALID_INJECT_VALUE = "InvalidInjectValue"
    UNRESOLVED_PROBE_PORT = "UnresolvedProbePort"  # a probe names a port no container declares
    # reject
    INVALID_TRAFFIC_ANNOTATION = "InvalidTrafficAnnotation"
    PROXY_UID_CONFLICT = "ProxyUIDConflict"
    INVALID_ANNOTATION = "InvalidAnnotation"
    UNKNOWN_TEMPLATE = "UnknownTemplate"
    MALFORMED_OBJECT = "MalformedObject"  # the input is not shaped like a Kubernetes object (CLI/dry-run)
    PATCH_TOO_LARGE = "PatchTooLarge"  # the injected pod would exceed the patch size limit
    # passthrough
    UNSUPPORTED_KIND = "UnsupportedKind"
    # admission level (the webhook answers without calling the core, or the core failed)
    INTERNAL_ERROR = "InternalError"
    NOT_POD = "NotPod"
    NOT_CREATE = "NotCreate"
    SUBRESOURCE = "Subresource"
    REQUEST_TOO_LARGE = "RequestTooLarge"
    TIMEOUT = "Timeout"
    # the plugin's redirect decision
    EXCLUDED_NAMESPACE = "ExcludedNamespace"  # the pod's namespace is in the plugin's exclude list
    OWN_POD = "OwnPod"  # the pod is the CNI's own node agent (name prefix): never redirected
    NOT_INJECTED = "NotInjected"  # no status annotation: the injector did not inject the pod
    NO_CAPTURE = "NoCapture"  # injected without a validation/init container (capture none, NONE mode)
    INVALID_STATUS = "InvalidStatus"  # the status annotation is not what the injector writes
    REDIRECT = "Redirect"  # injected with a validation/init container: program the redirect


#: Constant name -> code, in declaration order (what ``injector.result.ReasonCode`` is built from).
REASON_CODES: dict[str, str] = {k: v for k, v in vars(ReasonCode).items() if k.isupper()}


# --- Light records: dataclass-like, without importing dataclasses/inspect (~10 ms per plugin run) ---


class _Record:
    """An immutable record with keyword construction, equality, hashing and a readable repr.

    Subclasses list their fields with defaults in ``_defaults``; ``__slots__`` follows from it.
    """

    __slots__ = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values.pop(name) if name in values else self._defaults[name])
        if values:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(sorted(values))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace()")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: Any) -> Any:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)


class Cidr:
    """An IPv4/IPv6 network with host bits masked; parsed with ``_socket`` instead of ``ipaddress``.

    ``packed`` is the network address in network byte order, as netlink wants it.
    """

    __slots__ = ("packed", "prefixlen", "version")

    def __init__(self, text: str) -> None:
        address, slash, prefix = text.strip().partition("/")
        family = _socket.AF_INET6 if ":" in address else _socket.AF_INET
        try:
            raw = _socket.inet_pton(family, address)
        except OSError:
            raise ValueError(f"{address!r} is not an IP address") from None
        bits = len(raw) * 8
        if slash and not (prefix.isascii() and prefix.isdigit() and int(prefix) <= bits):
            raise ValueError(f"{prefix!r} is not a prefix length for {address}")
        length = int(prefix) if slash else bits
        mask = ((1 << length) - 1) << (bits - length)
        self.packed = (int.from_bytes(raw, "big") & mask).to_bytes(len(raw), "big")
        self.prefixlen = length
        self.version = 6 if family == _socket.AF_INET6 else 4

    def __str__(self) -> str:
        family = _socket.AF_INET6 if self.version == 6 else _socket.AF_INET
        return f"{_socket.inet_ntop(family, self.packed)}/{self.prefixlen}"

    def __repr__(self) -> str:
        return f"Cidr({str(self)!r})"

    def _key(self) -> tuple[int, bytes, int]:
        return (self.version, self.packed, self.prefixlen)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cidr) and self._key() == other._key()

    def __lt__(self, other: Cidr) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())


# --- Value parsers: one per kind of value -----------------------------------------------------


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_uint(
    annotation: str, value: str, *, low: int = 0, high: int = 2**32 - 1, item: str | None = None,
    noun: str = "",
) -> int:
    """The one number parser: ASCII digits only, within ``low..high`` (``item`` is one entry of
    a list ``value``; ``noun`` names the kind of number in the error).

    ``str.isdigit()`` alone accepts ``²`` (which ``int()`` then refuses) and Arabic-Indic digits
    (which ``int()`` accepts): neither is a number a Kubernetes user means.
    """
    text = (value if item is None else item).strip()
    if not (text.isascii() and text.isdigit()):
        raise AnnotationError(annotation, value, f"{text!r} is not a {noun + ' ' if noun else ''}number")
    if len(text) > 20:  # beyond every bound used here; keeps int() of a huge string out
        raise AnnotationError(annotation, value, f"{noun or 'number'} {text[:20]}... is outside {low}-{high}")
    number = int(text)
    if not low <= number <= high:
        raise AnnotationError(annotation, value, f"{noun or 'number'} {number} is outside {low}-{high}")
    return number


def parse_port(annotation: str, value: str, item: str | None = None, *, low: int = 1) -> int:
    """A TCP port number, ``low``..65535 (``item`` is one entry of a list ``value``, for the error)."""
    return parse_uint(annotation, value, low=low, high=65535, item=item, noun="port")


def _bounded_items(annotation: str, value: str, text: str, limit: int, what: str) -> list[str]:
    items = _items(text)
    if len(items) > limit:
        problem = f"{len(items)} {what} exceed the limit of {limit}"
        raise AnnotationError(annotation, value[:64] + "...", problem)
    return items


def parse_ports(annotation: str, value: str, *, allow_all: bool = False) -> tuple[int, ...] | None:
    """Comma-separated ports (at most MAX_PORTS); ``*`` (where allowed) means every port and returns None."""
    text = value.strip()
    if text == ALL:
        if not allow_all:
            raise AnnotationError(annotation, value, "'*' is not allowed here")
        return None
    ports: set[int] = set()
    for item in _bounded_items(annotation, value, text, MAX_PORTS, "ports"):
        if item == ALL:
            raise AnnotationError(annotation, value, "'*' must stand alone")
        ports.add(parse_port(annotation, value, item))
    return tuple(sorted(ports))


def parse_cidrs(annotation: str, value: str, *, allow_all: bool = False) -> tuple[Cidr, ...] | None:
    """Comma-separated IPv4/IPv6 CIDRs, as strictly as Istio reads them (at most MAX_CIDRS):
    every item ``address/prefix``, nothing around it (no spaces, no empty item, no bare
    address, no leading zero in the prefix); host bits are accepted and masked. ``*`` alone
    (where allowed) is None; the empty string is no CIDR.

    Istio's injector refuses the pod on any such item; the plugin reads the same parser, so
    injector and plugin never disagree about a pod.
    """
    if value == ALL:
        if not allow_all:
            raise AnnotationError(annotation, value, "'*' is not allowed here")
        return None
    if not value:
        return ()
    items = value.split(",")
    if len(items) > MAX_CIDRS:
        problem = f"{len(items)} CIDRs exceed the limit of {MAX_CIDRS}"
        raise AnnotationError(annotation, value[:64] + "...", problem)
    networks: set[Cidr] = set()
    for item in items:
        networks.add(_strict_cidr(annotation, value, item))
    return tuple(sorted(networks))


def _strict_cidr(annotation: str, value: str, item: str) -> Cidr:
    """One item of a CIDR list; the error names the item and what is wrong with it."""
    if not item:
        problem = "has an empty item (a comma at an end, or two in a row)"
    elif item == ALL:
        problem = "'*' must stand alone"
    elif item != item.strip() or any(c.isspace() for c in item):
        problem = f"{item!r} contains white space (write the list without spaces)"
    elif "/" not in item:
        try:
            one = Cidr(item).prefixlen
        except ValueError:
            problem = f"{item!r} is not an IP address or CIDR"
        else:
            problem = f"{item!r} has no prefix length (write {item}/{one} for one address)"
    else:
        prefix = item.partition("/")[2]
        if len(prefix) > 1 and prefix.startswith("0"):
            problem = f"{item!r} has a leading zero in its prefix length"
        else:
            try:
                return Cidr(item)
            except ValueError:
                problem = f"{item!r} is not an IP address or CIDR"
    raise AnnotationError(annotation, value, problem)


def parse_interfaces(annotation: str, value: str) -> tuple[str, ...]:
    """Comma-separated Linux interface names (at most MAX_INTERFACES; 1-15 bytes, no '/',
    whitespace or ':')."""
    names: list[str] = []
    for item in _bounded_items(annotation, value, value, MAX_INTERFACES, "interfaces"):
        if len(item.encode()) > 15 or any(c in item for c in "/: \t") or item in (".", ".."):
            raise AnnotationError(annotation, value, f"{item!r} is not a valid interface name")
        if item not in names:
            names.append(item)
    return tuple(sorted(names))


TRUE_WORDS: tuple[str, ...] = ("true", "y", "yes", "on", "1")
FALSE_WORDS: tuple[str, ...] = ("false", "n", "no", "off", "0")


def bool_or_none(value: object, *, numeric: bool = True) -> bool | None:
    """True/False for Istio's accepted spellings (any case, surrounding space), else None.

    ``numeric=False`` refuses 1/0, as Istio's ``sidecar.istio.io/inject`` does (YAML 1.1 words only).
    """
    text = str(value).strip().lower()
    if text in TRUE_WORDS and (numeric or text != "1"):
        return True
    if text in FALSE_WORDS and (numeric or text != "0"):
        return False
    return None


def parse_bool(annotation: str, value: str) -> bool:
    """Kubernetes-style booleans as Istio accepts them (true/false, y/n, yes/no, on/off, 1/0)."""
    parsed = bool_or_none(value)
    if parsed is None:
        raise AnnotationError(annotation, value, "expected true or false")
    return parsed


def parse_id(annotation: str, value: str) -> int:
    """A Linux uid/gid (2**32-1 is the kernel's "no id")."""
    return parse_uint(annotation, value, high=2**32 - 2, noun="uid/gid")


def parse_mode(annotation: str, value: str) -> str:
    text = value.strip().upper()
    if text == MODE_TPROXY:
        raise AnnotationError(annotation, value, "TPROXY interception is not supported; use REDIRECT or NONE")
    if text not in (MODE_REDIRECT, MODE_NONE):
        raise AnnotationError(annotation, value, "expected REDIRECT or NONE")
    return text


# --- The redirect plan ------------------------------------------------------------------------


class TrafficDefaults(_Record):
    """Mesh-wide defaults, used where a pod does not set the annotation (values.global.proxy)."""

    interception_mode: str
    include_outbound_ip_ranges: str
    exclude_outbound_ip_ranges: str
    include_inbound_ports: str
    exclude_inbound_ports: str
    include_outbound_ports: str
    exclude_outbound_ports: str
    exclude_interfaces: str
    status_port: int
    proxy_uid: int
    proxy_gid: int
    capture_dns: bool
    _defaults = {
        "interception_mode": MODE_REDIRECT,
        "include_outbound_ip_ranges": ALL,
        "exclude_outbound_ip_ranges": "",
        "include_inbound_ports": ALL,
        "exclude_inbound_ports": "",
        "include_outbound_ports": "",
        "exclude_outbound_ports": "",
        "exclude_interfaces": "",
        "status_port": STATUS_PORT_DEFAULT,
        "proxy_uid": PROXY_UID_DEFAULT,
        "proxy_gid": PROXY_UID_DEFAULT,
        "capture_dns": False,
    }
    __slots__ = tuple(_defaults)


class RedirectPlan(_Record):
    """What to redirect inside one pod's network namespace (Istio REDIRECT semantics).

    ``inbound_ports``/``outbound_include_cidrs`` of None mean "all"; an empty tuple means "none".
    """

    mode: str
    proxy_uid: int
    proxy_gid: int
    outbound_capture_port: int
    inbound_capture_port: int
    inbound_ports: tuple[int, ...] | None
    inbound_exclude_ports: tuple[int, ...]
    outbound_include_cidrs: tuple[Cidr, ...] | None
    outbound_exclude_cidrs: tuple[Cidr, ...]
    outbound_include_ports: tuple[int, ...]
    outbound_exclude_ports: tuple[int, ...]
    exclude_interfaces: tuple[str, ...]
    capture_dns: bool
    dns_capture_port: int
    status_port: int
    _defaults = {
        "mode": MODE_REDIRECT,
        "proxy_uid": PROXY_UID_DEFAULT,
        "proxy_gid": PROXY_UID_DEFAULT,
        "outbound_capture_port": OUTBOUND_CAPTURE_PORT,
        "inbound_capture_port": INBOUND_CAPTURE_PORT,
        "inbound_ports": None,
        "inbound_exclude_ports": PROXY_INBOUND_PORTS,
        "outbound_include_cidrs": None,
        "outbound_exclude_cidrs": (),
        "outbound_include_ports": (),
        "outbound_exclude_ports": (),
        "exclude_interfaces": (),
        "capture_dns": False,
        "dns_capture_port": DNS_CAPTURE_PORT,
        "status_port": STATUS_PORT_DEFAULT,
    }
    __slots__ = tuple(_defaults)

    @property
    def redirects(self) -> bool:
        return self.mode == MODE_REDIRECT


class ResolvedTraffic(_Record):
    """A validated plan plus the annotation values that reproduce it, for writing onto the pod."""

    plan: RedirectPlan
    annotations: dict[str, str]
    _defaults = {"plan": None, "annotations": None}
    __slots__ = tuple(_defaults)


def _ports_text(ports: tuple[int, ...] | None) -> str:
    return ALL if ports is None else ",".join(str(p) for p in ports)


def _cidrs_text(cidrs: tuple[Cidr, ...] | None) -> str:
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
    status_port = parse_port(STATUS_PORT, get(STATUS_PORT, str(d.status_port)), low=0)  # 0: none
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

    own = {status_port} if status_port else set()
    inbound_excludes = tuple(sorted(set(PROXY_INBOUND_PORTS) | own | set(user_inbound_excludes)))
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


class InjectionStatus(_Record):
    """The parsed ``sidecar.istio.io/status`` annotation (Istio's shape, plus our extras)."""

    init_containers: tuple[str, ...]
    containers: tuple[str, ...]
    volumes: tuple[str, ...]
    image_pull_secrets: tuple[str, ...]
    revision: str
    templates: tuple[str, ...]
    config_hash: str  # of the config it was rendered with: tells stale pods apart
    _defaults = {
        "init_containers": (),
        "containers": (),
        "volumes": (),
        "image_pull_secrets": (),
        "revision": "default",
        "templates": (),
        "config_hash": "",
    }
    __slots__ = tuple(_defaults)

    def to_json(self) -> str:
        import json  # lazily: the plugin never writes the status

        body: dict[str, Any] = {
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
    import json  # lazily: the plugin's gate only checks that the annotation is present

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


class RedirectDecision(_Record):
    """Whether the CNI plugin should program a pod, and why (stable reason code)."""

    redirect: bool
    reason: str
    message: str
    _defaults = {"redirect": False, "reason": "", "message": ""}
    __slots__ = tuple(_defaults)


def redirect_decision(annotations: Mapping[str, str]) -> RedirectDecision:
    """The plugin's per-pod gate, from what the injector wrote and nothing else: a pod is
    redirected exactly when its status annotation lists a validation or init container.

    Never re-decides from ``sidecar.istio.io/inject`` (the injector already did, label beating
    annotation); a pod injected without one (capture ``none``, interception ``NONE``) is left
    alone. Does not validate the traffic annotations; ``plan_from_annotations`` does.
    """
    raw = annotations.get(STATUS)
    if raw is None:
        return RedirectDecision(redirect=False, reason=ReasonCode.NOT_INJECTED,
                                message=f"pod has no {STATUS} annotation")
    from cni import fastjson  # the C scanner only: ``json`` costs ~6 ms per plugin run

    try:
        body = fastjson.loads(raw)
    except (ValueError, RecursionError):
        body = None
    inits = body.get("initContainers") if isinstance(body, dict) else None
    if not isinstance(inits, list):
        return RedirectDecision(redirect=False, reason=ReasonCode.INVALID_STATUS,
                                message=f"{STATUS} is not the JSON object the injector writes")
    capture = [name for name in inits if name in CAPTURE_CONTAINERS]
    if not capture:
        return RedirectDecision(redirect=False, reason=ReasonCode.NO_CAPTURE,
                                message="injected without a validation or init container: no redirect")
    return RedirectDecision(redirect=True, reason=ReasonCode.REDIRECT,
                            message=f"injected with {capture[0]}; redirecting its traffic")
