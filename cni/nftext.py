"""Our netlink batch as nft-like text, decoded from the exact bytes we send.

For humans and goldens (``mesh-cni redirect --dry-run``, tests/cni/golden): every line comes
from decoding the encoded messages, not from the ruleset data, so an encoding change shows up
as a text diff. Only the expressions ``cni.nftables`` emits are recognised; anything else is
printed raw, so nothing is hidden.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from cni import nfnl

HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}
META_KEYS = {6: "iifname", 7: "oifname", 10: "skuid", 11: "skgid", 15: "nfproto", 16: "l4proto"}
NFPROTO = {2: "ipv4", 10: "ipv6"}
L4PROTO = {6: "tcp", 17: "udp"}
VERDICTS = {-5: "return", -3: "jump", -4: "goto", 0: "drop", 1: "accept"}
#: (nfproto, offset) -> selector
ADDRESS_FIELDS = {(2, 12): "ip saddr", (2, 16): "ip daddr", (10, 8): "ip6 saddr", (10, 24): "ip6 daddr"}

Decoded = tuple[str, dict[str, object]]


def _u32(payload: bytes) -> int:
    return int(struct.unpack(">i", payload[:4])[0])


def _str(payload: bytes) -> str:
    return payload.rstrip(b"\0").decode()


def _op(cmp: dict[str, object]) -> str:
    return "" if cmp.get("op") == 0 else "!= "


def _meta_value(key: str, data: bytes) -> str:
    if key in ("iifname", "oifname"):
        return f'"{_str(data)}"'
    if key in ("skuid", "skgid"):
        return str(struct.unpack("=I", data)[0])
    if key == "nfproto":
        return NFPROTO.get(data[0], str(data[0]))
    if key == "l4proto":
        return L4PROTO.get(data[0], str(data[0]))
    return data.hex()


def _network(data: bytes, mask: bytes | None) -> str:
    address = ipaddress.ip_address(data)
    if mask is None:
        return str(address)
    prefix = bin(int.from_bytes(mask, "big")).count("1")
    return str(ipaddress.ip_network(f"{address}/{prefix}"))


def statements(exprs: Sequence[Decoded]) -> list[str]:
    """Expressions -> nft statements (``meta l4proto tcp``, ``ip daddr 10.0.0.0/8``, ...)."""
    out: list[str] = []
    i, nfproto = 0, 0
    while i < len(exprs):
        name, attrs = exprs[i]
        following = exprs[i + 1] if i + 1 < len(exprs) else ("", {})
        if name == "meta" and following[0] == "cmp":
            key = META_KEYS.get(int(attrs["key"]), f"meta{attrs['key']}")  # type: ignore[call-overload]
            data = following[1]["data"]
            assert isinstance(data, bytes)
            if key == "nfproto":
                nfproto = data[0]  # a family guard of the address match that follows
            else:
                selector = key if key in ("iifname", "oifname") else f"meta {key}"
                out.append(f"{selector} {_op(following[1])}{_meta_value(key, data)}")
            i += 2
            continue
        if name == "payload":
            base, offset = attrs.get("base"), attrs.get("offset")
            rest = exprs[i + 1:]
            mask = None
            if rest and rest[0][0] == "bitwise":
                mask = rest[0][1]["mask"]
                rest = rest[1:]
            if rest and rest[0][0] == "cmp":
                cmp = rest[0][1]
                data = cmp["data"]
                assert isinstance(data, bytes)
                if base == 2 and offset == 2:
                    out.append(f"th dport {_op(cmp)}{int.from_bytes(data, 'big')}")
                elif base == 1 and (nfproto, offset) in ADDRESS_FIELDS:
                    field = ADDRESS_FIELDS[(nfproto, offset)]  # type: ignore[index]
                    out.append(f"{field} {_op(cmp)}{_network(data, mask)}")  # type: ignore[arg-type]
                else:
                    out.append(f"payload base {base} offset {offset} {_op(cmp)}{data.hex()}")
                i += 2 + (mask is not None)
                continue
        if name == "immediate" and attrs.get("dreg") == 0:
            verdict = attrs["data"]
            assert isinstance(verdict, tuple)
            _, code, chain = verdict
            out.append(f"{VERDICTS.get(code, code)}{' ' + chain if chain else ''}")
            i += 1
            continue
        if name == "immediate" and following[0] == "redir":
            port = attrs["data"]
            assert isinstance(port, bytes)
            out.append(f"redirect to :{int.from_bytes(port, 'big')}")
            i += 2
            continue
        out.append(f"{name} {attrs}")  # not something we emit: show it raw
        i += 1
    return out


def render(ops: Sequence[tuple]) -> str:
    """``cni.nftables`` ops (type, flags, payload, ...) as nft-like text, from the payload bytes."""
    lines: list[str] = []
    for msg_type, _flags, payload, *_ in ops:
        attrs = list(nfnl.iter_attrs(payload))
        if msg_type == nfnl.NFT_MSG_NEWTABLE:
            lines.append(f"add table inet {_str(dict(attrs)[nfnl.NFTA_TABLE_NAME])}")
        elif msg_type == nfnl.NFT_MSG_DELTABLE:
            lines.append(f"delete table inet {_str(dict(attrs)[nfnl.NFTA_TABLE_NAME])}")
        elif msg_type == nfnl.NFT_MSG_NEWCHAIN:
            fields = dict(attrs)
            text = f"add chain {_str(fields[nfnl.NFTA_CHAIN_NAME])}"
            if nfnl.NFTA_CHAIN_HOOK in fields:
                hook = dict(nfnl.iter_attrs(fields[nfnl.NFTA_CHAIN_HOOK]))
                number, priority = _u32(hook[nfnl.NFTA_HOOK_HOOKNUM]), _u32(hook[nfnl.NFTA_HOOK_PRIORITY])
                policy = "accept" if _u32(fields[nfnl.NFTA_CHAIN_POLICY]) == 1 else "drop"
                text += (f" {{ type {_str(fields[nfnl.NFTA_CHAIN_TYPE])} hook {HOOKS.get(number, number)} "
                         f"priority {priority}; policy {policy}; }}")
            lines.append(text)
        elif msg_type == nfnl.NFT_MSG_NEWRULE:
            fields = dict(attrs)
            exprs = nfnl.decode_exprs(fields.get(nfnl.NFTA_RULE_EXPRESSIONS, b""))
            lines.append(f"add rule {_str(fields[nfnl.NFTA_RULE_CHAIN])} " + " ".join(statements(exprs)))
        else:
            lines.append(f"message {msg_type} {payload.hex()}")
    return "\n".join(lines) + "\n"
