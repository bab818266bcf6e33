"""RedirectPlan -> nftables ruleset (pure), and programming it in ONE netlink batch.

The ruleset follows Istio's REDIRECT-mode iptables rules, translated to one ``inet`` table so
IPv4 and IPv6 share it. Rules are plain data (``nfnl.Expr`` lists), so the same ruleset is
encoded by our struct encoder (hot path) or by pyroute2 (reference), and CHECK compares the
kernel's dump with it.

Table ``inet mesh_cni``::

  chain prerouting  nat hook prerouting  priority -100: iifname X return; tcp -> jump inbound
  chain inbound     proxy/excluded ports return; (all | listed) ports redirect :15006
  chain output      nat hook output priority -100: oifname X return; tcp -> jump outbound;
                    udp 53 from proxy uid/gid return; udp 53 redirect :15053 (DNS capture)
  chain outbound    excluded ports; 127.0.0.6 passthrough; proxy uid/gid loopback handling;
                    tcp 53 -> :15053; 127.0.0.1; excluded CIDRs; included ports; included CIDRs
"""

from __future__ import annotations

import _socket
import struct

from cni import nfnl
from cni.nfnl import Expr

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (hot path)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypedDict

    from cni.annotations import Cidr, RedirectPlan

    class ChainState(TypedDict):
        """One chain as CHECK compares it: (hook, priority, type, policy) or None, and its rules."""

        hook: tuple[int, int, str, int] | None
        rules: list[list[tuple[str, dict[str, object]]]]

    #: A table as plain data, from our ruleset or from a kernel dump: {chain: ChainState}.
    TableState = dict[str, ChainState]

TABLE = "mesh_cni"
FAMILY = nfnl.NFPROTO_INET
NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_OUT = 3
NAT_PRIORITY = -100  # dstnat / Istio's nat table position
NFT_RETURN = -5
NFT_JUMP = -3
CMP_EQ, CMP_NEQ = 0, 1
META_IIFNAME, META_OIFNAME, META_SKUID, META_SKGID, META_NFPROTO, META_L4PROTO = 6, 7, 10, 11, 15, 16
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
IPPROTO_TCP, IPPROTO_UDP = 6, 17
NF_NAT_RANGE_PROTO_SPECIFIED = 2
REG1 = 1
REG_VERDICT = 0
IFNAMSIZ = 16
DNS_PORT = 53

V4_LOOPBACK = (4, bytes([127, 0, 0, 1]), 32)
V6_LOOPBACK = (6, bytes(15) + b"\x01", 128)

#: (chain name, hook) where hook is (hook number, priority, type) for base chains.
Chain = tuple[str, "tuple[int, int, str] | None"]
#: (chains, [(chain, exprs)]) — everything ADD programs, in order.
Ruleset = tuple[tuple[Chain, ...], tuple[tuple[str, tuple[Expr, ...]], ...]]
#: A network as (IP version, packed address, prefix length): no ipaddress import on the hot path.
Net = tuple[int, bytes, int]

# --- Expression builders ----------------------------------------------------------------------


def _meta(key: int) -> Expr:
    return ("meta", (("dreg", REG1), ("key", key)))


def _cmp(op: int, data: bytes) -> Expr:
    return ("cmp", (("sreg", REG1), ("op", op), ("data", data)))


def l4proto(proto: int) -> list[Expr]:
    return [_meta(META_L4PROTO), _cmp(CMP_EQ, bytes([proto]))]


def dport(port: int, op: int = CMP_EQ) -> list[Expr]:
    """Destination port of TCP or UDP (both keep it at transport offset 2); needs l4proto first."""
    return [("payload", (("dreg", REG1), ("base", PAYLOAD_TRANSPORT), ("offset", 2), ("len", 2))),
            _cmp(op, port.to_bytes(2, "big"))]


def ifname(key: int, name: str, op: int = CMP_EQ) -> list[Expr]:
    return [_meta(key), _cmp(op, name.encode().ljust(IFNAMSIZ, b"\0"))]


def owner(key: int, ident: int, op: int = CMP_EQ) -> list[Expr]:
    return [_meta(key), _cmp(op, struct.pack("=I", ident))]


def addr(net: Net, *, source: bool = False, op: int = CMP_EQ) -> list[Expr]:
    """ip/ip6 saddr|daddr in net; the nfproto match keeps each family to its own rules."""
    version, packed, prefix = net
    if version == 4:
        proto, offset, length = nfnl.NFPROTO_IPV4, (12 if source else 16), 4
    else:
        proto, offset, length = nfnl.NFPROTO_IPV6, (8 if source else 24), 16
    exprs = [_meta(META_NFPROTO), _cmp(CMP_EQ, bytes([proto])),
             ("payload", (("dreg", REG1), ("base", PAYLOAD_NETWORK), ("offset", offset), ("len", length)))]
    if prefix < length * 8:
        mask = ((1 << (length * 8)) - 1) ^ ((1 << (length * 8 - prefix)) - 1)
        mask_bytes = mask.to_bytes(length, "big")
        exprs.append(("bitwise", (("sreg", REG1), ("dreg", REG1), ("len", length), ("op", 0),
                                  ("mask", mask_bytes), ("xor", bytes(length)))))
        packed = bytes(a & b for a, b in zip(packed, mask_bytes, strict=True))
    exprs.append(_cmp(op, packed))
    return exprs


def ret() -> list[Expr]:
    return [("immediate", (("dreg", REG_VERDICT), ("data", ("verdict", NFT_RETURN, None))))]


def jump(chain: str) -> list[Expr]:
    return [("immediate", (("dreg", REG_VERDICT), ("data", ("verdict", NFT_JUMP, chain))))]


def redirect(port: int) -> list[Expr]:
    return [("immediate", (("dreg", REG1), ("data", port.to_bytes(2, "big")))),
            ("redir", (("reg_proto_min", REG1), ("reg_proto_max", REG1),
                       ("flags", NF_NAT_RANGE_PROTO_SPECIFIED)))]


# --- Plan -> ruleset --------------------------------------------------------------------------


def net_of(network: Cidr) -> Net:
    """A ``cni.annotations.Cidr`` (from the shared plan) as a Net tuple."""
    return (network.version, network.packed, network.prefixlen)


def passthrough_nets() -> tuple[Net, Net]:
    """The proxy's inbound passthrough sources (the shared vocabulary's) as host Nets. Imported
    here, not at module level: DEL/CHECK import this module without the vocabulary."""
    from cni.annotations import INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6

    return ((4, _socket.inet_pton(_socket.AF_INET, INBOUND_PASSTHROUGH_V4), 32),
            (6, _socket.inet_pton(_socket.AF_INET6, INBOUND_PASSTHROUGH_V6), 128))


def _contains(net: Net, host: Net) -> bool:
    version, packed, prefix = net
    if version != host[0]:
        return False
    bits = len(packed) * 8
    value, probe = int.from_bytes(packed, "big"), int.from_bytes(host[1], "big")
    return (value >> (bits - prefix)) == (probe >> (bits - prefix)) if prefix else True


def build_ruleset(plan: RedirectPlan) -> Ruleset:
    """The whole table for a plan (a cni.annotations.RedirectPlan). Pure."""
    p = plan
    uid_gid = [(META_SKUID, p.proxy_uid), (META_SKGID, p.proxy_gid)]
    tcp = l4proto(IPPROTO_TCP)
    rules: list[tuple[str, tuple[Expr, ...]]] = []

    def add(chain: str, *parts: list[Expr]) -> None:
        rules.append((chain, tuple(e for part in parts for e in part)))

    inbound_ports = p.inbound_ports
    inbound_enabled = inbound_ports is None or len(inbound_ports) > 0
    excluded_in = tuple(p.inbound_exclude_ports)
    interfaces = tuple(p.exclude_interfaces)

    # Inbound: PREROUTING -> inbound.
    for name in interfaces:
        add("prerouting", ifname(META_IIFNAME, name), ret())
    if inbound_enabled:
        add("prerouting", tcp, jump("inbound"))
        if inbound_ports is None:
            for port in excluded_in:
                add("inbound", tcp, dport(port), ret())
            add("inbound", tcp, redirect(p.inbound_capture_port))
        else:
            for port in inbound_ports:
                if port not in excluded_in:
                    add("inbound", tcp, dport(port), redirect(p.inbound_capture_port))

    # Outbound: OUTPUT -> outbound (TCP); DNS over UDP directly in output.
    dns = bool(p.capture_dns)
    dns_port = p.dns_capture_port
    for name in interfaces:
        add("output", ifname(META_OIFNAME, name), ret())
    add("output", tcp, jump("outbound"))
    if dns:
        udp = l4proto(IPPROTO_UDP)
        for key, ident in uid_gid:
            add("output", udp, dport(DNS_PORT), owner(key, ident), ret())
        add("output", udp, dport(DNS_PORT), redirect(dns_port))

    for port in p.outbound_exclude_ports:
        add("outbound", tcp, dport(port), ret())
    for passthrough in passthrough_nets():
        add("outbound", ifname(META_OIFNAME, "lo"), addr(passthrough, source=True), ret())
    include = p.outbound_include_cidrs
    include_nets = None if include is None else [net_of(n) for n in include]
    loopback_included = include_nets is not None and any(
        _contains(n, V4_LOOPBACK) or _contains(n, V6_LOOPBACK) for n in include_nets)
    not_dns = dport(DNS_PORT, CMP_NEQ) if dns else []
    for key, ident in uid_gid:
        # The proxy calling its own app through the pod IP/VIP goes back through inbound
        # (also what `mesh-cni validate` relies on to see the redirect as the proxy uid).
        for loop in (V4_LOOPBACK, V6_LOOPBACK):
            add("outbound", ifname(META_OIFNAME, "lo"), not_dns, addr(loop, op=CMP_NEQ),
                owner(key, ident), redirect(p.inbound_capture_port))
        if not loopback_included:
            # The app talking to itself over loopback is not captured.
            add("outbound", ifname(META_OIFNAME, "lo"), not_dns, owner(key, ident, CMP_NEQ), ret())
        # The proxy's own traffic is never captured.
        add("outbound", owner(key, ident), ret())
    if dns:
        add("outbound", tcp, dport(DNS_PORT), redirect(dns_port))
    for loop in (V4_LOOPBACK, V6_LOOPBACK):
        add("outbound", addr(loop), ret())
    for network in p.outbound_exclude_cidrs:
        add("outbound", addr(net_of(network)), ret())
    for port in p.outbound_include_ports:
        add("outbound", tcp, dport(port), redirect(p.outbound_capture_port))
    if include_nets is None:
        add("outbound", tcp, redirect(p.outbound_capture_port))
    else:
        for net in include_nets:
            add("outbound", addr(net), redirect(p.outbound_capture_port))

    chains: tuple[Chain, ...] = (
        ("prerouting", (NF_INET_PRE_ROUTING, NAT_PRIORITY, "nat")),
        ("output", (NF_INET_LOCAL_OUT, NAT_PRIORITY, "nat")),
        ("inbound", None),
        ("outbound", None),
    )
    return chains, tuple(rules)


# --- Batches ----------------------------------------------------------------------------------

#: (nft message type, flags, encoded payload, description, neutral form for other encoders)
Op = tuple[int, int, bytes, str, tuple]


def add_ops(ruleset: Ruleset) -> list[Op]:
    """Create-or-keep the table, delete it (flushing every old rule/chain), create it afresh."""
    chains, rules = ruleset
    table = nfnl.table_payload(TABLE)
    ops: list[Op] = [
        (nfnl.NFT_MSG_NEWTABLE, nfnl.NLM_F_CREATE, table, f"create table inet {TABLE}", ("table", TABLE)),
        (nfnl.NFT_MSG_DELTABLE, 0, table, f"flush table inet {TABLE}", ("table", TABLE)),
        (nfnl.NFT_MSG_NEWTABLE, nfnl.NLM_F_CREATE, table, f"add table inet {TABLE}", ("table", TABLE)),
    ]
    ops += [(nfnl.NFT_MSG_NEWCHAIN, nfnl.NLM_F_CREATE, nfnl.chain_payload(TABLE, name, hook),
             f"add chain {name}", ("chain", TABLE, name, hook)) for name, hook in chains]
    ops += [(nfnl.NFT_MSG_NEWRULE, nfnl.NLM_F_CREATE | nfnl.NLM_F_APPEND,
             nfnl.rule_payload(TABLE, chain, exprs), f"add rule {chain} #{i}", ("rule", TABLE, chain, exprs))
            for i, (chain, exprs) in enumerate(rules)]
    return ops


def delete_ops() -> list[Op]:
    """Delete our table whether or not it exists (create-then-delete in one transaction)."""
    table = nfnl.table_payload(TABLE)
    return [(nfnl.NFT_MSG_NEWTABLE, nfnl.NLM_F_CREATE, table, f"create table inet {TABLE}", ("table", TABLE)),
            (nfnl.NFT_MSG_DELTABLE, 0, table, f"delete table inet {TABLE}", ("table", TABLE))]


def expected_table(ruleset: Ruleset) -> TableState:
    chains, rules = ruleset
    table: TableState = {
        name: {"hook": None if hook is None else (*hook, 1), "rules": []} for name, hook in chains}
    for chain, exprs in rules:
        table[chain]["rules"].append(nfnl.canonical_exprs(exprs))
    return table


def diff_tables(expected: TableState | None, actual: TableState | None) -> list[str]:
    """Human-readable differences between what ADD programs and what the netns holds."""
    if expected is None and actual is None:
        return []
    if actual is None:
        return [f"table inet {TABLE} is missing"]
    if expected is None:
        return [f"table inet {TABLE} exists but the pod should not be redirected"]
    problems = []
    for name in sorted(set(expected) | set(actual)):
        want, have = expected.get(name), actual.get(name)
        if have is None:
            problems.append(f"chain {name} is missing")
        elif want is None:
            problems.append(f"unexpected chain {name}")
        elif want["hook"] != have["hook"]:
            problems.append(f"chain {name} hook {have['hook']} != {want['hook']}")
        elif want["rules"] != have["rules"]:
            problems.append(f"chain {name}: {len(have['rules'])} rules differ from the "
                            f"{len(want['rules'])} expected")
    return problems


# --- Programming a namespace ------------------------------------------------------------------


def backend_name() -> str:
    """'raw' (struct encoder, default) or 'pyroute2' (reference), from MESH_CNI_NETLINK."""
    import os

    return os.environ.get("MESH_CNI_NETLINK", "raw")


def _close_now(sock: nfnl.NftSocket) -> None:
    sock.close()


#: What happens to a socket once its batch is acknowledged. Closing the last nfnetlink socket of
#: a netns makes the kernel flush the reclamation of what earlier commits deleted, a grace
#: period (~4-16 ms) after a DEL. The batch's effect is complete and visible at the ACK, so the
#: resident agent swaps this for a background closer and answers first. Plain processes close.
release_socket: Callable[[nfnl.NftSocket], None] = _close_now


def run_batch(netns_path: str, ops: Sequence[Op], backend: str | None = None) -> None:
    """Send ops as one transaction inside the netns, with the chosen encoder."""
    backend = backend or backend_name()
    if backend == "pyroute2":
        from cni import nft_pyroute2

        nft_pyroute2.run_batch(netns_path, ops)
        return
    from cni import netns

    sock = netns.nft_socket(netns_path)
    try:
        sock.batch([op[:4] for op in ops])
    finally:
        release_socket(sock)


EEXIST, ENOENT = 17, 2  # errno values, without importing errno on the hot path


def run_add_ops(netns_path: str, ops: Sequence[Op], backend: str | None = None) -> None:
    """Apply ``add_ops`` output, fast in the common case and atomic in every case.

    Replacing a table deletes its base chains, and the kernel then waits for a grace period
    (~4-16 ms here). A new pod's netns has no table of ours, so first try the same rules under an
    exclusive create (~1 ms); only when the table exists (re-ADD) does the full replace run. A
    failed batch applies nothing, so the fallback starts from the same state.
    """
    table_op = ops[2]  # the "add table" after the replace prefix; keeps pyroute2's neutral form
    exclusive = [(nfnl.NFT_MSG_NEWTABLE, nfnl.NLM_F_CREATE | nfnl.NLM_F_EXCL, table_op[2],
                  f"create new table inet {TABLE}", *table_op[4:]), *ops[3:]]
    try:
        run_batch(netns_path, exclusive, backend)
    except nfnl.NetlinkError as error:
        if error.errno != EEXIST:
            raise
        run_batch(netns_path, ops, backend)


def program(netns_path: str, plan: RedirectPlan, backend: str | None = None) -> None:
    """Program the plan into the netns (atomic: on error nothing changed and this raises)."""
    run_add_ops(netns_path, add_ops(build_ruleset(plan)), backend)


def remove(netns_path: str, backend: str | None = None) -> None:
    """Delete our table; a table that is not there (DEL after DEL) is already removed."""
    try:
        run_batch(netns_path, delete_ops()[1:], backend)
    except nfnl.NetlinkError as error:
        if error.errno != ENOENT:
            raise


def read(netns_path: str) -> TableState | None:
    from cni import netns

    with netns.nft_socket(netns_path) as sock:
        return nfnl.read_table(sock, FAMILY, TABLE)


def check(netns_path: str, plan: RedirectPlan | None) -> list[str]:
    """Differences between the netns's table and what ADD would program for ``plan`` (None: none)."""
    expected = None if plan is None else expected_table(build_ruleset(plan))
    return diff_tables(expected, read(netns_path))
