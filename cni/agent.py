"""The resident node agent: serves plugin invocations with everything already imported.

A fresh plugin process pays Python start-up plus imports on every pod start; the agent pays
them once. When the conflist names ``agentSocket``, the plugin forwards its environment and
stdin over that Unix socket and prints the agent's answer; the agent runs exactly the same
``cni.plugin.run`` (each request in its own thread: netns switches are per thread). When no
agent answers, or it declines a netns it cannot see, the plugin does the work itself, so the
agent is a speed-up, never a dependency. It answers as soon as the kernel has acknowledged the
batch and closes the netlink socket afterwards: that close waits out the kernel's reclamation of
a deleted table (a grace period), which would otherwise be most of a DEL.

Wire format: one JSON object each way, the request ended by shutdown(SHUT_WR):
``{"env": {...}, "stdin": "<config text>"}`` -> ``{"code": 0, "stdout": "..."}``.
Only root may connect (socket mode 0600 and SO_PEERCRED checked).
"""

from __future__ import annotations

import _socket

from cni import fastjson

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (hot path)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

FORWARDED_ENV = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
SO_PEERCRED = 17


def _agent_socket(stdin: bytes) -> str | None:
    try:
        config = fastjson.loads(stdin)
    except ValueError:
        return None
    path = config.get("agentSocket") if isinstance(config, dict) else None
    return path if isinstance(path, str) and path else None


#: A request is the env plus stdin (at most spec.MAX_STDIN_BYTES) escaped as JSON (<= 6x).
MAX_MESSAGE_BYTES = 6 * (1 << 20) + 65536


def _recv_all(sock: _socket.socket, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ValueError(f"message over {limit} bytes")
        chunks.append(chunk)


def forward(env: Mapping[str, str], stdin: bytes, timeout: float = 10.0) -> tuple[int, str] | None:
    """The agent's (exit code, stdout) for this invocation, or None when no agent answered."""
    path = _agent_socket(stdin)
    if path is None:
        return None
    request = fastjson.dumps({"env": {k: env[k] for k in FORWARDED_ENV if k in env},
                              "stdin": stdin.decode("utf-8", "replace")}).encode()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(_socket.SHUT_WR)
        reply = fastjson.loads(_recv_all(sock))
        if (isinstance(reply, dict) and isinstance(reply.get("code"), int)
                and isinstance(reply.get("stdout"), str)):
            return reply["code"], reply["stdout"]
        return None
    except (OSError, ValueError):
        return None  # no agent (or it broke mid-way): the plugin runs the request itself; ADD is idempotent
    finally:
        sock.close()


def _background_closer() -> Callable[[object], None]:
    """A put() that closes netlink sockets on a thread of their own, so replies never wait.

    Closing an nfnetlink socket waits for the kernel to reclaim what the last commits deleted (a
    grace period after DEL). One thread closes them in order; a burst of DELs costs one flush.
    """
    import queue
    import threading

    pending: queue.SimpleQueue = queue.SimpleQueue()

    def close_forever() -> None:
        while True:
            pending.get().close()

    threading.Thread(target=close_forever, name="nfnl-closer", daemon=True).start()
    return pending.put


def serve(path: str, *, ready: object | None = None) -> None:
    """Serve forever on a Unix socket at ``path`` (replacing a stale one)."""
    import contextlib
    import os
    import socketserver

    # Warm everything the plugin may need.
    from cni import annotations, netns, nfnl, nftables, plugin  # noqa: F401

    nftables.release_socket = _background_closer()  # answer at the kernel's ACK, close after

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn: _socket.socket = self.request
            import struct

            uid = struct.unpack("=iII", conn.getsockopt(_socket.SOL_SOCKET, SO_PEERCRED, 12))[1]
            if uid != 0:
                return
            try:
                request = fastjson.loads(_recv_all(conn))
                env = {str(k): str(v) for k, v in request["env"].items()}  # type: ignore[index,union-attr]
                stdin = str(request["stdin"]).encode()  # type: ignore[index]
            except (ValueError, KeyError, TypeError, AttributeError):
                return  # the plugin falls back to doing the work itself
            netns_path = env.get("CNI_NETNS")
            if netns_path and not os.path.exists(netns_path):
                # Not visible from here (e.g. the DaemonSet lacks the runtime's netns mount, or the
                # netns is gone): decline, and the plugin, which sees the host's paths, decides.
                return
            code, out = plugin.run(env, stdin)
            conn.sendall(fastjson.dumps({"code": code, "stdout": out}).encode())

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old_umask = os.umask(0o177)
    try:
        server = Server(path, Handler)
    finally:
        os.umask(old_umask)
    if ready is not None:
        ready.set()  # type: ignore[attr-defined]
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    from cni.cli import argument_parser

    parser = argument_parser("mesh-cni agent", __doc__)
    parser.add_argument("--socket", default="/var/run/mesh-cni/agent.sock",
                        help="Unix socket to serve on; put the same path in the conflist's agentSocket")
    args = parser.parse_args(argv)
    try:
        serve(args.socket)
    except KeyboardInterrupt:
        return 0
    return 0
