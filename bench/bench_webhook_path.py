"""CPU per review of the webhook's own HTTP path, in process: what the server spends around the core.

The server's real protocol class (``injector.http``, the limits, connection shares and metrics of
``serve``) is fed the typical review of ``bench_server.py`` over a transport that only collects
what is written, on the event loop ``serve`` uses, in interleaved rounds of:

- ``review``: ``admission.review`` alone (the core plus the AdmissionReview envelope);
- ``fast``: the protocol's fast path (``serve --fast-path``, the default);
- ``asgi``: every request through ASGI (``serve --no-fast-path``);
- ``memo``: the fast path answering a replica of a pod it answered before (``serve``'s default
  answer memo; ``fast`` and ``asgi`` run with ``--answer-memo 0``, so they measure the core).

TLS, the kernel and the client are left out (``bench_scale.py`` measures them with ``wrk``); so
is other load: CPU time of this one thread, medians over rounds. Every answer is checked to be
the same bytes on both paths.

    .venv/bin/python bench/bench_webhook_path.py [--reviews 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_server as bs  # noqa: E402


class _Transport(asyncio.Transport):
    """Collects writes; what uvicorn's protocol asks of a TLS transport."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 9443), "peername": ("127.0.0.1", 40000),
                "sslcontext": True}.get(name, default)


def _server(fast: bool, memo: int = 0) -> tuple[Any, Any]:
    """(protocol factory, admission config) wired as ``serve`` wires one worker."""
    import uvicorn
    from uvicorn.server import ServerState as UvicornState

    from injector.configwatch import ConfigHolder
    from injector.http import ConnectionShares, HttpLimits, ServerState, protocol_class
    from injector.metrics import InjectorMetrics
    from injector.server import INLINE_BODY_BYTES, create_app

    metrics = InjectorMetrics()
    config = ConfigHolder(None, metrics)
    config.load_initial()
    state = ServerState(config=config, metrics=metrics, answer_memo=memo)
    app = create_app(state)
    limits = HttpLimits()
    shares = ConnectionShares(ConnectionShares.create(2), 0, 2)
    protocol = protocol_class(limits, metrics, shares, inline=app.inject_endpoint if fast else None,
                              inline_max_bytes=INLINE_BODY_BYTES)
    uv = uvicorn.Config(app, http=protocol, ws="none", lifespan="off", access_log=False, log_config=None,
                        server_header=False)
    uv.load()
    uv_state = UvicornState()

    def make() -> Any:
        return uv.http_protocol_class(config=uv, server_state=uv_state, app_state={})

    return make, config


async def _drive(make: Any, request: bytes, count: int) -> tuple[float, bytes]:
    """CPU seconds for ``count`` requests on one kept-alive connection, and the last answer."""
    transport = _Transport()
    protocol = make()
    protocol.connection_made(transport)
    started = time.thread_time()
    for _ in range(count):
        transport.out.clear()
        protocol.data_received(request)
        await asyncio.sleep(0)  # a turn of the loop: the bookkeeping (and the ASGI task) run
        while not transport.out or not protocol.cycle.response_complete:
            await asyncio.sleep(0)
    elapsed = time.thread_time() - started
    answer = b"".join(transport.out)
    protocol.connection_lost(None)
    return elapsed, answer.split(b"\r\n\r\n", 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=2000, help="reviews per round and path")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    from injector import admission
    from injector.server import configure_logging

    # The request log goes to a file, as in bench_scale.py: its writes are part of the cost.
    log = tempfile.TemporaryFile("w")  # noqa: SIM115 - lives as long as the run
    configure_logging("info", log)
    body = json.dumps(bs.typical_review()).encode()
    request = (b"POST /inject?timeout=10s HTTP/1.1\r\nHost: webhook.istio-system.svc:443\r\n"
               b"Content-Type: application/json\r\nAccept: application/json, */*\r\n"
               b"User-Agent: kube-apiserver-admission\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    paths = {"fast": _server(True), "asgi": _server(False), "memo": _server(True, memo=512)}
    config = paths["fast"][1].current
    times: dict[str, list[float]] = {"review": [], "fast": [], "asgi": [], "memo": []}
    answers: dict[str, bytes] = {}
    for name in ("fast", "asgi", "memo"):  # warm-up: every memo filled
        loop.run_until_complete(_drive(paths[name][0], request, 300))
    for _ in range(300):
        admission.review(body, config=config)
    for round_ in range(args.rounds):
        order = ["review", "fast", "asgi", "memo"]
        if round_ % 2:
            order.reverse()
        for name in order:
            if name == "review":
                started = time.thread_time()
                for _ in range(args.reviews):
                    answers[name] = admission.review(body, config=config)[0]
                elapsed = time.thread_time() - started
            else:
                drive = _drive(paths[name][0], request, args.reviews)
                elapsed, answers[name] = loop.run_until_complete(drive)
            times[name].append(elapsed * 1e6 / args.reviews)
    same = {name: answers[name] == answers["review"] for name in ("fast", "asgi", "memo")}
    median = {name: statistics.median(found) for name, found in times.items()}
    print(f"CPU per review in process, typical pod, {args.reviews} reviews x {args.rounds} rounds "
          f"(median; load average {os.getloadavg()[0]:.2f}; no TLS, no kernel, no client):")
    for name, label in (("review", "admission.review (core + envelope)"),
                        ("fast", "protocol fast path (--fast-path)"), ("asgi", "ASGI path (--no-fast-path)"),
                        ("memo", "fast path, a replica (answer memo)")):
        spread = f"{min(times[name]):.1f}-{max(times[name]):.1f}"
        print(f"  {label:38s} {median[name]:7.1f} us (rounds {spread})"
              + ("" if name == "review" else
                 (f", HTTP + bookkeeping {median[name] - median['review']:6.1f} us" if name != "memo" else "")
                 + f", same answer: {same[name]}"))
    print(f"  fast / asgi: {median['fast'] / median['asgi']:.3f}; fast path saves "
          f"{median['asgi'] - median['fast']:.1f} us per review before TLS (the ASGI path also writes twice)")
    print(f"  memo / fast: {median['memo'] / median['fast']:.3f}; a replica's review costs "
          f"{median['memo']:.1f} us, of which the memo lookup is all that is left of the core")
    loop.close()
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
