"""Load generator and echo server for bench_dataplane, run inside a pod's netns (stdlib + uvloop).

``serve PORT``: a minimal keep-alive HTTP/1.1 server answering every request ``200 ok``.
``open HOST PORT RATE SECONDS MODE``: open loop at a fixed RATE (after 0.5 s not counted, at the same
rate: the new interpreter's own warm-up); request i is due at
``start + i/RATE`` and its latency counts from that due time, so a slow proxy cannot hide behind
back-pressure (no coordinated omission). MODE:
- ``keepalive``: a pool of persistent connections, the most recently used one taken first, as
  HTTP clients' pools do (urllib3's is a LIFO queue; Go's Transport reuses its newest idle
  connection), so at 1,000 requests/s one or two connections carry the load;
- ``spread``: the same pool taken in FIFO order, every request on the connection idle longest
  (its state cold in every cache): a worst case, not what common clients do;
- ``newconn``: one connection per request.
Prints JSON: latencies in microseconds, how late each request was written after its due time
(the generator's own jitter), errors.
``mix RATE SECONDS MODE`` with a JSON list of targets ``{"netns", "host", "port"}`` on stdin:
the same open loop, request i going to target i mod N (in an order shuffled per cycle), so a
stall of this shared machine hits every target alike; sockets for a target are made inside its
netns (null: ours). Prints JSON: per target, latencies, lateness and errors.
``closed HOST PORT CONCURRENCY SECONDS``: as fast as possible over keep-alive connections;
prints requests/s.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable

REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n"
REQUEST_CLOSE = b"GET /bench HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
POOL = 64
#: Seconds of requests at the run's rate before the measured ones (see ``_run``).
WARMUP_S = 0.5


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(RESPONSE)
            if b"connection: close" in head.lower():
                await writer.drain()
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve_one, None, port, backlog=1024)  # every family
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)


Connect = Callable[[], "asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]"]


def _connector(host: str, port: int, netns: str | None) -> Connect:
    """Opens connections to host:port from inside ``netns`` (a socket stays in its netns)."""
    if netns is None:
        return lambda: asyncio.ensure_future(asyncio.open_connection(host, port))
    from cni.netns import setns

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(netns, os.O_RDONLY)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        setns(there)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        finally:
            setns(home)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    return lambda: asyncio.ensure_future(connect())


class _Target:
    """One destination of the open loop and what it measured."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.LifoQueue()
        self.latencies: list[int] = []
        self.late: list[int] = []  # how long after its due time each request was written (our jitter)
        self.errors = 0

    def result(self) -> dict:
        return {"latencies_us": self.latencies, "late_us": self.late, "errors": self.errors}


async def _one(target: _Target, due: float, mode: str, record: bool = True) -> None:
    """One request on ``target``'s connections; its timings go to ``target`` when ``record``
    (a warm-up request's to a collector that is dropped)."""
    sink = target if record else _Target(target.connect)
    try:
        if mode != "newconn":
            reader, writer = await target.idle.get()
            sink.late.append(int((time.perf_counter() - due) * 1e6))
            writer.write(REQUEST)
            await _read_response(reader)
            target.idle.put_nowait((reader, writer))
        else:
            sink.late.append(int((time.perf_counter() - due) * 1e6))
            reader, writer = await target.connect()
            writer.write(REQUEST_CLOSE)
            await _read_response(reader)
            writer.close()
        sink.latencies.append(int((time.perf_counter() - due) * 1e6))
    except (OSError, asyncio.IncompleteReadError):
        sink.errors += 1


async def _run(targets: list[_Target], rate: float, seconds: float, mode: str) -> None:
    """Request i is due at start + i/rate and goes to the i-th target of the current cycle.

    The first ``WARMUP_S`` seconds of requests run at the same rate on the same connections but
    are not counted: each run is a new interpreter, and its first requests measured its own
    warm-up (code paths, allocator, the connections' first use), not the path under test."""
    if mode != "newconn":
        for target in targets:
            if mode == "spread":
                target.idle = asyncio.Queue()
            for _ in range(POOL):
                target.idle.put_nowait(await target.connect())
    warmup = int(rate * WARMUP_S)
    total = warmup + int(rate * seconds)
    rng = random.Random(13)
    order: list[_Target] = []
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(total):
        if not order:
            order = targets[:]
            rng.shuffle(order)
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(_one(order.pop(), due, mode, record=i >= warmup)))
    await asyncio.gather(*tasks)


async def open_loop(host: str, port: int, rate: float, seconds: float, mode: str) -> dict:
    target = _Target(_connector(host, port, None))
    await _run([target], rate, seconds, mode)
    return target.result()


async def mix(spec: list[dict], rate: float, seconds: float, mode: str) -> list[dict]:
    targets = [_Target(_connector(t["host"], int(t["port"]), t.get("netns"))) for t in spec]
    await _run(targets, rate, seconds, mode)
    return [t.result() for t in targets]


async def closed_loop(host: str, port: int, concurrency: int, seconds: float) -> dict:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < deadline:
            writer.write(REQUEST)
            await _read_response(reader)
            done += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"rps": done / (time.perf_counter() - start)}


def main() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # No cyclic GC pauses in the client or the server (they would show up as our own tail
    # latency); nothing here makes reference cycles worth collecting.
    gc.freeze()
    gc.disable()
    command, *args = sys.argv[1:]
    if command == "serve":
        asyncio.run(serve(int(args[0])))
    elif command == "open":
        host, port, rate, seconds, mode = args
        print(json.dumps(asyncio.run(open_loop(host, int(port), float(rate), float(seconds), mode))))
    elif command == "mix":
        rate, seconds, mode = args
        spec = json.load(sys.stdin)
        print(json.dumps(asyncio.run(mix(spec, float(rate), float(seconds), mode))))
    else:
        host, port, concurrency, seconds = args
        print(json.dumps(asyncio.run(closed_loop(host, int(port), int(concurrency), float(seconds)))))


if __name__ == "__main__":
    main()
