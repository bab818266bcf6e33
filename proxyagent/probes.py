"""The app's original probes, run from inside the pod (the kubelet probes the agent instead).

The injector moved each httpGet/tcpSocket/gRPC probe to ``/app-health/<container>/<kind>`` on
the status port and wrote the original to ``ISTIO_KUBE_APP_PROBERS``; these run it as the
kubelet would: HTTP 200-399 passes, a TCP connect passes, a gRPC health check passes when the
service answers SERVING.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

DEFAULT_TIMEOUT = 1.0
#: Bounds a hostile or broken app cannot push us past.
MAX_TIMEOUT = 60.0
_MAX_FRAME = 1 << 16


#: Probes leave from the inbound passthrough address: the redirect returns early for it, so a
#: probe reaches the app itself and never Envoy's inbound listener (which would accept the
#: connection for a dead app). Istio's agent does the same.
PASSTHROUGH_V4, PASSTHROUGH_V6 = "127.0.0.6", "::6"


def source_for(host: str) -> tuple[str, int] | None:
    """The passthrough source address for a literal IP ``host``; None for names."""
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return (PASSTHROUGH_V6, 0)
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET, host)
        return (PASSTHROUGH_V4, 0)
    except OSError:
        return None


class ProbeError(Exception):
    """The probe failed; the message says how (it goes into the status port's response body)."""


def parse_probers(text: str | None) -> dict[str, dict[str, Any]]:
    """ISTIO_KUBE_APP_PROBERS: path -> original probe; entries of the wrong shape are dropped."""
    if not text:
        return {}
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    return {k: v for k, v in body.items() if isinstance(k, str) and isinstance(v, dict)}


def _timeout(probe: Mapping[str, Any]) -> float:
    value = probe.get("timeoutSeconds", DEFAULT_TIMEOUT)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return DEFAULT_TIMEOUT
    return min(float(value), MAX_TIMEOUT)


def _port(action: Mapping[str, Any]) -> int:
    port = action.get("port")
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProbeError(f"probe port {port!r} is not a port number")
    return port


def run_probe(probe: Mapping[str, Any], default_host: str) -> str:
    """Run one probe; returns a short success text or raises ProbeError."""
    timeout = _timeout(probe)
    if isinstance(probe.get("httpGet"), dict):
        return _http_get(probe["httpGet"], default_host, timeout)
    if isinstance(probe.get("tcpSocket"), dict):
        action = probe["tcpSocket"]
        host = action.get("host") or default_host
        try:
            socket.create_connection(
                (host, _port(action)), timeout=timeout, source_address=source_for(host)
            ).close()
        except OSError as err:
            raise ProbeError(f"tcp connect {host}:{action.get('port')}: {err}") from None
        return "tcp connect ok"
    if isinstance(probe.get("grpc"), dict):
        action = probe["grpc"]
        service = str(action.get("service") or "")
        return grpc_health(default_host, _port(action), service, timeout, source=source_for(default_host))
    raise ProbeError("no httpGet, tcpSocket or grpc handler")


def _http_get(action: Mapping[str, Any], default_host: str, timeout: float) -> str:
    host = action.get("host") or default_host
    port = _port(action)
    path = action.get("path") or "/"
    if not isinstance(path, str) or not path.startswith("/"):
        path = "/" + str(path)
    import http.client  # not on the agent's start path (it execs Envoy first)

    conn: http.client.HTTPConnection
    if str(action.get("scheme", "HTTP")).upper() == "HTTPS":
        import ssl  # only apps with HTTPS probes pay for it

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the kubelet does not verify probe certificates either
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context, source_address=source_for(host)
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=source_for(host))
    headers = {"User-Agent": "kube-probe/mesh-proxy-agent"}
    for item in action.get("httpHeaders") or ():
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            headers[item["name"]] = str(item.get("value", ""))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read(_MAX_FRAME)
    except (OSError, http.client.HTTPException) as err:
        raise ProbeError(f"GET {host}:{port}{path}: {err}") from None
    finally:
        conn.close()
    if not 200 <= response.status < 400:
        raise ProbeError(f"GET {host}:{port}{path}: HTTP {response.status}")
    return f"HTTP {response.status}"


# --- gRPC health checking over cleartext HTTP/2, without a gRPC library ----------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY = 0, 1, 3, 4, 6, 7
_END_STREAM, _END_HEADERS, _ACK, _PADDED = 0x1, 0x4, 0x1, 0x8
_SERVING = 1


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes((kind, flags)) + struct.pack("!I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """HPACK 'literal header field without indexing, new name', no Huffman coding (RFC 7541 6.2.2)."""
    out = bytearray()
    for text in (name.encode(), value.encode()):
        if len(text) >= 127:
            raise ProbeError("gRPC header too long")
        out += bytes((len(text),)) + text
    return b"\x00" + bytes(out)


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProbeError("gRPC server closed the connection")
        data += chunk
    return bytes(data)


def _serving_status(message: bytes) -> int:
    """HealthCheckResponse.status (field 1, varint) from its protobuf encoding; 0 when absent."""
    i = 0
    while i < len(message):
        key = message[i]
        i += 1
        if key == 0x08:
            value, shift = 0, 0
            while i < len(message):
                byte = message[i]
                i += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    return value
            return 0
        return 0  # an unknown field first: not a response we understand
    return 0


def grpc_health(
    host: str, port: int, service: str, timeout: float, *, source: tuple[str, int] | None = None
) -> str:
    """grpc.health.v1.Health/Check over h2c; passes when the answer is SERVING."""
    encoded = service.encode()
    if len(encoded) > 127:
        raise ProbeError("gRPC service name longer than 127 bytes")
    request = (b"\x0a" + bytes((len(encoded),)) + encoded) if encoded else b""
    message = b"\x00" + struct.pack("!I", len(request)) + request
    headers = b"".join(
        _literal(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    try:
        sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
    except OSError as err:
        raise ProbeError(f"gRPC connect {host}:{port}: {err}") from None
    try:
        sock.sendall(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, b"")
            + _frame(_HEADERS, _END_HEADERS, 1, headers)
            + _frame(_DATA, _END_STREAM, 1, message)
        )
        body = bytearray()
        for _ in range(64):  # frames; a health answer takes a handful
            head = _read_exact(sock, 9)
            length = int.from_bytes(head[:3], "big")
            kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if length > _MAX_FRAME:
                raise ProbeError("gRPC frame too large")
            payload = _read_exact(sock, length)
            if kind == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
            elif kind == _PING and not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY or (kind == _RST and stream == 1):
                raise ProbeError("gRPC server reset the health check")
            elif kind == _DATA and stream == 1:
                if flags & _PADDED and payload:
                    payload = payload[1 : len(payload) - payload[0]]
                body += payload
                if len(body) >= 5 and len(body) >= 5 + int.from_bytes(body[1:5], "big"):
                    status = _serving_status(bytes(body[5 : 5 + int.from_bytes(body[1:5], "big")]))
                    if status == _SERVING:
                        return "SERVING"
                    raise ProbeError(f"gRPC health status {status} (not SERVING)")
            elif kind == _HEADERS and stream == 1 and flags & _END_STREAM:
                raise ProbeError("gRPC health check failed (no response message)")
        raise ProbeError("gRPC health check: no answer")
    except OSError as err:
        raise ProbeError(f"gRPC {host}:{port}: {err}") from None
    finally:
        sock.close()
