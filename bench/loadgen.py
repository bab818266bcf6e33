"""Load generator and echo server for bench_dataplane, run inside a pod's netns (stdlib + uvloop).

``serve PORT``: a minimal keep-alive HTTP/1.1 server answering every request ``200 ok``.
``open HOST PORT RATE SECONDS MODE``: open loop at a fixed RATE; request i is due at
``start + i/RATE`` and its latency counts from that due time, so a slow proxy cannot hide behind
back-pressure (no coordinated omission). MODE ``keepalive`` (a pool of persistent connections)
or ``newconn`` (one connection per request). Prints JSON: latencies in microseconds, errors.
``closed HOST PORT CONCURRENCY SECONDS``: as fast as possible over keep-alive connections;
prints requests/s.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n"
REQUEST_CLOSE = b"GET /bench HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
POOL = 64


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


async def open_loop(host: str, port: int, rate: float, seconds: float, mode: str) -> dict:
    total = int(rate * seconds)
    latencies: list[int] = []
    errors = 0
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    if mode == "keepalive":
        for _ in range(POOL):
            idle.put_nowait(await asyncio.open_connection(host, port))

    async def one(due: float) -> None:
        nonlocal errors
        try:
            if mode == "keepalive":
                reader, writer = await idle.get()
                writer.write(REQUEST)
                await _read_response(reader)
                idle.put_nowait((reader, writer))
            else:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(REQUEST_CLOSE)
                await _read_response(reader)
                writer.close()
            latencies.append(int((time.perf_counter() - due) * 1e6))
        except (OSError, asyncio.IncompleteReadError):
            errors += 1

    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(due)))
    await asyncio.gather(*tasks)
    return {"latencies_us": latencies, "errors": errors}


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
    command, *args = sys.argv[1:]
    if command == "serve":
        asyncio.run(serve(int(args[0])))
    elif command == "open":
        host, port, rate, seconds, mode = args
        print(json.dumps(asyncio.run(open_loop(host, int(port), float(rate), float(seconds), mode))))
    else:
        host, port, concurrency, seconds = args
        print(json.dumps(asyncio.run(closed_loop(host, int(port), int(concurrency), float(seconds)))))


if __name__ == "__main__":
    main()
