"""One rtnetlink call: put ::6/128 on the pod's loopback, as Istio's init does for IPv6.

The proxy hands inbound IPv6 connections to the app from ::6 (IPv4: 127.0.0.6, which is in
127.0.0.0/8 and always usable). ::6 is not a loopback address by itself, so it must be added to
``lo`` for the proxy to bind it; the ``saddr ::6 return`` rule then lets that traffic through.
Idempotent (EEXIST is success) and skipped quietly where IPv6 is disabled.
"""

from __future__ import annotations

import _socket
import struct

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
AF_INET6 = 10
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD, IFA_F_PERMANENT = 0x02, 0x80
RT_SCOPE_HOST = 254
LOOPBACK_INDEX = 1  # `lo` is always ifindex 1 in a network namespace


def add_passthrough_v6(sock: _socket.socket | None = None) -> bool:
    """Add ::6/128 to lo in the socket's netns (a new NETLINK_ROUTE socket: the current netns).

    Returns False when IPv6 is unavailable there; raises OSError on other failures.
    """
    from cni.annotations import INBOUND_PASSTHROUGH_V6  # already loaded: only redirected pods get here

    passthrough = _socket.inet_pton(AF_INET6, INBOUND_PASSTHROUGH_V6)
    own = sock is None
    if sock is None:
        sock = _socket.socket(16, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        attrs = b"".join(struct.pack("=HH", 20, kind) + passthrough for kind in (IFA_LOCAL, IFA_ADDRESS))
        body = struct.pack("=BBBBI", AF_INET6, 128, IFA_F_NODAD | IFA_F_PERMANENT, RT_SCOPE_HOST,
                           LOOPBACK_INDEX) + attrs
        sock.send(struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR,
                              NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 1, 0) + body)
        reply = sock.recv(4096)
        error = -struct.unpack_from("=i", reply, 16)[0] if len(reply) >= 20 else 0
        if error in (0, 17):  # ok, EEXIST
            return True
        if error in (97, 13, 1, 95):  # EAFNOSUPPORT, EACCES, EPERM, EOPNOTSUPP: no IPv6 here
            return False
        raise OSError(error, f"adding ::6/128 to lo: errno {error}")
    finally:
        if own:
            sock.close()


def add_passthrough_v6_in(netns_path: str) -> bool:
    from cni import netns

    with netns.entered(netns_path):
        sock = _socket.socket(16, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        return add_passthrough_v6(sock)
    finally:
        sock.close()
