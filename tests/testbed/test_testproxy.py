"""The test proxy (Envoy's stand-in on the node) forwards redirected traffic and reports it.

Checked in a network namespace of our own with an nftables redirect like the one the CNI plugin
installs (outbound TCP to 8080 -> 15001 unless the sender is uid 1337), on loopback only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_root

pytestmark = pytest.mark.root

PROXY = Path(__file__).resolve().parent / "testproxy.py"

_ECHO = """
import socket, threading
srv = socket.create_server(("127.0.0.1", 8080))
print("listening", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(b"echo:" + data)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

# Imports first (this interpreter's stdlib may live where uid 1337 cannot read), then drop to
# the proxy's UID and run the proxy as a script.
_AS_PROXY_UID = (
    "import contextlib, encodings.idna, http.client, http.server, json, os, signal, socket, socketserver; "
    "import sys, threading, time; "
    "path = sys.argv[1]; code = compile(open(path).read(), path, 'exec'); "
    "os.setgroups([]); os.setgid(1337); os.setuid(1337); "
    "sys.argv = [path, 'proxy', 'sidecar']; exec(code, {'__name__': '__main__', '__file__': path})"
)

_CLIENT = """
import http.client, json, socket
out = {}
with socket.create_connection(("127.0.0.1", 8080), timeout=5) as s:
    s.sendall(b"hi"); s.shutdown(socket.SHUT_WR)
    out["reply"] = s.recv(100).decode()
for path in ("/healthz/ready", "/app-health/app/readyz", "/app-health/app/livez", "/app-health/x/readyz"):
    port = 15021 if path.startswith("/healthz") else 15020
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    out[path] = c.getresponse().status
print(json.dumps(out))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    require(shutil.which("nft") is not None, "needs nft (Debian nftables) to install the test redirect")
    name = f"tbproxy-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        rules = (
            "table ip redirect_test {\n chain out {\n  type nat hook output priority -100;\n"
            "  tcp dport 8080 meta skuid != 1337 redirect to :15001\n }\n}\n"
        )
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=rules, text=True, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _start(netns: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, *argv],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first, "process exited before it was ready"
    return proc


def test_redirected_connection_is_forwarded_and_logged_with_original_destination(netns: str) -> None:
    probers = {
        "/app-health/app/readyz": {"tcpSocket": {"port": 8080}},
        "/app-health/app/livez": {"httpGet": {"path": "/", "port": 9999}, "timeoutSeconds": 1},
    }
    echo = _start(netns, [sys.executable, "-c", _ECHO])
    proxy = _start(
        netns,
        [sys.executable, "-c", _AS_PROXY_UID, str(PROXY)],
        env={"ISTIO_KUBE_APP_PROBERS": json.dumps(probers)},
    )
    try:
        client = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", _CLIENT],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        result = json.loads(client.stdout)
        assert result["reply"] == "echo:hi"
        assert result["/healthz/ready"] == 200
        assert result["/app-health/app/readyz"] == 200  # the app's TCP port answers
        assert result["/app-health/app/livez"] == 503  # nothing on 9999
        assert result["/app-health/x/readyz"] == 404
        proxy.terminate()
        assert proxy.stdout is not None
        lines = [json.loads(line) for line in proxy.stdout.read().splitlines() if line.startswith("{")]
        connections = [e for e in lines if e["event"] == "connection"]
        # Exactly one: the client's. The proxy's own upstream connection (uid 1337) is not redirected.
        assert len(connections) == 1, lines
        assert connections[0]["listener"] == "outbound"
        assert connections[0]["original_dst"] == "127.0.0.1:8080"
        assert connections[0]["uid"] == 1337
    finally:
        for proc in (proxy, echo):
            proc.kill()
            proc.wait(timeout=10)


def test_direct_connection_to_the_listener_is_refused_as_a_loop(netns: str) -> None:
    proxy = _start(netns, [sys.executable, "-c", _AS_PROXY_UID, str(PROXY)])
    try:
        code = (
            "import socket; s = socket.create_connection(('127.0.0.1', 15001), timeout=5); "
            "print(repr(s.recv(10)))"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert out.strip() == "b''"  # closed without forwarding anywhere
        time.sleep(0.2)
        proxy.terminate()
        assert proxy.stdout is not None
        events = [
            json.loads(line)["event"] for line in proxy.stdout.read().splitlines() if line.startswith("{")
        ]
        assert "loop" in events and "connection" not in events
    finally:
        proxy.kill()
        proxy.wait(timeout=10)
