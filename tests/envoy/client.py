"""Raw clients run inside a netns: JSON requests on stdin, one JSON result per request out.

Raw sockets, so request targets go out byte for byte (no client-side normalisation of ``..``,
``%2e`` or ``//``). Request kinds:
- ``{"http": [host, port], "method": "GET", "target": "/x", "body": ""}`` ->
  ``{"status": 200, "body": "..."}`` or ``{"error": "refused" | "closed" | "..."}``;
- ``{"tcp": [host, port], "send": "hello"}`` -> ``{"echo": "..."}`` or ``{"error": ...}``.
"""

from __future__ import annotations

import json
import socket
import sys


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def _read_response(sock: socket.socket) -> bytes:
    """Until EOF or the end of a Content-Length body (Envoy waits for the client to close)."""
    data = bytearray()
    while True:
        head, sep, rest = bytes(data).partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(rest) >= int(value):
                    return bytes(data)
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def one(req: dict) -> dict:
    timeout = float(req.get("timeout", 5))
    try:
        if "tcp" in req:
            host, port = req["tcp"]
            payload = req.get("send", "hello").encode()
            with _connect(host, port, timeout) as sock:
                sock.sendall(payload)
                data = bytearray()
                while len(data) < len(payload) and (chunk := sock.recv(65536)):
                    data += chunk
            return {"echo": bytes(data).decode("latin-1")} if data else {"error": "closed"}
        host, port = req["http"]
        body = req.get("body", "").encode()
        head = (
            f"{req.get('method', 'GET')} {req['target']} HTTP/1.1\r\nHost: {req.get('host', 'app')}\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        with _connect(host, port, timeout) as sock:
            sock.sendall(head + body)
            data = _read_response(sock)
        if not data:
            return {"error": "closed"}
        status_line, _, rest = data.partition(b"\r\n")
        parts = status_line.split(b" ")
        head, _, payload = rest.partition(b"\r\n\r\n")
        result = {"status": int(parts[1]), "body": payload.decode("latin-1")}
        if req.get("headers"):
            pairs = (line.partition(b":") for line in head.split(b"\r\n") if line)
            result["headers"] = {k.strip().lower().decode(): v.strip().decode("latin-1") for k, _, v in pairs}
        return result
    except ConnectionRefusedError:
        return {"error": "refused"}
    except ConnectionResetError:
        return {"error": "reset"}
    except (OSError, ValueError, IndexError) as err:
        return {"error": f"{type(err).__name__}: {err}"}


if __name__ == "__main__":
    for item in json.load(sys.stdin):
        print(json.dumps(one(item)), flush=True)
