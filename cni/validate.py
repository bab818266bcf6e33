"""``mesh-cni validate``: the unprivileged init container proving the pod's redirect is in place.

It runs as the proxy's uid (1337) with no capabilities, before the proxy starts. By the rules
the plugin programs (Istio's), a connection *from the proxy uid* to a loopback address other
than 127.0.0.1 is redirected to the inbound capture port (the proxy reaching its own app via
the pod IP). So: listen on the inbound and outbound capture ports, connect to a probe address
nobody listens on, and read SO_ORIGINAL_DST on whatever accepts. Landing on the inbound port
with the probe as original destination proves the table is there and working; a refused
connection means no redirect, and we exit non-zero so the pod never runs unmeshed silently.
"""

from __future__ import annotations

import argparse
import select
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80
OK, NOT_REDIRECTED, SETUP_FAILED = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inbound-port", type=int, default=15006, help="inbound capture port")
    parser.add_argument("--outbound-port", type=int, default=15001, help="outbound capture port")
    parser.add_argument("--probe", default="127.0.0.2:15999",
                        help="loopback address:port to connect to, not 127.0.0.1 ")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the probe")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def original_destination(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def probe(inbound_port: int, outbound_port: int, target: tuple[str, int], timeout: float) -> tuple[int, str]:
    """(exit code, message) for one probe connection."""
    listeners: dict[socket.socket, int] = {}
    try:
        for port in (inbound_port, outbound_port):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(("127.0.0.1", port))
            except OSError as error:
                listener.close()
                return SETUP_FAILED, (f"cannot listen on 127.0.0.1:{port}: {error.strerror} "
                                      "(is the proxy already running?)")
            listener.listen(4)
            listeners[listener] = port
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(timeout)
        try:
            client.connect(target)
        except ConnectionRefusedError:
            return NOT_REDIRECTED, (f"traffic is NOT redirected: a connection to {target[0]}:{target[1]} "
                                    f"as uid "
                                    f"{_uid()} was refused instead of landing on the inbound capture port "
                                    f"{inbound_port}; the CNI plugin did not program this pod's "
                                    "network namespace")
        except OSError as error:
            return NOT_REDIRECTED, (f"traffic is NOT redirected: connecting to {target[0]}:{target[1]} "
                                    f"failed: {error}")
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select(list(listeners), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return NOT_REDIRECTED, (f"the probe connection to {target[0]}:{target[1]} "
                                        "reached no capture port")
            conn, _ = ready[0].accept()
            with conn:
                destination = original_destination(conn)
            port = listeners[ready[0]]
            if destination != target:
                continue  # someone else's connection; keep waiting for ours
            if port != inbound_port:
                return NOT_REDIRECTED, (f"the probe landed on port {port}, not the inbound capture port "
                                        f"{inbound_port}: the redirect rules are not the expected ones")
            return OK, (f"redirect in place: {target[0]}:{target[1]} -> 127.0.0.1:{port} "
                        f"(original destination recovered)")
    finally:
        for listener in listeners:
            listener.close()


def _uid() -> int:
    import os

    return os.getuid()


def main(argv: list[str] | None = None) -> int:
    from cni.cli import argument_parser

    parser = argument_parser("mesh-cni validate", __doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    host, _, port_text = args.probe.rpartition(":")
    if not host or not port_text.isdigit() or host == "127.0.0.1" or not host.startswith("127."):
        sys.stderr.write(f"mesh-cni validate: --probe {args.probe!r} must be 127.x.y.z:port, "
                         "not 127.0.0.1\n")
        return SETUP_FAILED
    code, message = probe(args.inbound_port, args.outbound_port, (host, int(port_text)), args.timeout)
    stream = sys.stdout if code == OK else sys.stderr
    if code != OK or not args.quiet:
        stream.write(f"mesh-cni validate: {message}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
