"""HTTP plumbing of the webhook: shared state, body reading, and the limits every connection meets.

uvicorn bounds none of what a hostile or broken client controls before the application runs:
header size and count, how long the headers or the body may take, how many connections stay
open, how long a TLS handshake may stall. ``LimitedHttpToolsProtocol`` (uvicorn's httptools
protocol plus those limits) and ``LimitedServer`` (uvicorn's server, listening with a TLS
handshake timeout) close that gap. Each limit answers with a status naming it: 431 for headers,
408 for a request that did not arrive in time; a connection over the cap evicts the oldest one
still sending its headers (a slow client), so an honest caller gets in.

The protocol also answers the hot request itself: a ``POST`` to the inline path (``/inject``)
with a ``Content-Length`` up to the inline limit goes to an ``InlineHandler`` once its body is
complete, with no ASGI task, receive/send messages or middleware, and the status line, headers
and body leave in one write (one TLS record, one send; two cost ~15% of a review's CPU). Every
limit above applies to it unchanged; any other request, a pipelined one included, takes the ASGI
path in order.
"""

from __future__ import annotations

import asyncio
import mmap
import resource
import struct
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import Server

from injector.configwatch import ConfigHolder
from injector.events import EventRecorder
from injector.metrics import InjectorMetrics
from injector.tls import ReloadingCertificate

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024
#: File descriptors kept free below RLIMIT_NOFILE for logs, config reads, API clients, accept.
FD_RESERVE = 64
#: Scope key holding the monotonic time the request's headers were complete.
STARTED_KEY = "mesh_injector.started"
#: Scope key set on a request the protocol answers itself (``InlineHandler``).
INLINE_KEY = "mesh_injector.inline"


@dataclass(frozen=True)
class HttpLimits:
    """Every per-connection and per-request bound; each is a ``serve`` flag."""

    max_header_bytes: int = 32 * 1024  # request line + all headers (Envoy allows 60 KiB, nginx 32 KiB)
    max_headers: int = 100  # Envoy's default header count
    header_timeout: float = 5.0  # from the first byte (or the connection) to the end of the headers
    body_timeout: float = 5.0  # from the end of the headers to the end of the body
    request_deadline: float = 8.0  # admission answer leaves by then (webhook timeoutSeconds: 10)
    keepalive_timeout: float = 30.0  # idle keep-alive connection kept this long
    max_requests_per_connection: int = 10_000  # then "Connection: close" (spreads load over workers)
    max_connections: int = 1000  # per worker; lowered to fit RLIMIT_NOFILE
    tls_handshake_timeout: float = 5.0
    drain_timeout: float = 5.0  # on SIGTERM: keep answering (each with Connection: close) this long

    def connection_cap(self) -> int:
        """``max_connections``, or fewer when the process's file-descriptor limit is lower."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft - FD_RESERVE))


@dataclass
class ServerState:
    """Everything the endpoints share; built by the serve command (or a test)."""

    config: ConfigHolder
    metrics: InjectorMetrics = field(default_factory=InjectorMetrics)
    certificate: ReloadingCertificate | None = None
    events: EventRecorder | None = None
    api: Any = None  # kubernetes ApiClient for /audit, /dry-run auth and Events; None without a cluster
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    tls_reload_interval: float = 1.0
    config_reload_interval: float = 2.0
    limits: HttpLimits = field(default_factory=HttpLimits)
    dry_run: Any = None  # injector.dryrun_runner.DryRunRunner; None: built on first use
    worker: int = 0  # index of this uvicorn worker (0 with one worker)
    workers: int = 1
    answer_memo: int = 512  # replicas answered again without the core (admission.AnswerMemo); 0: off

    def publish_metrics(self) -> None:
        """Set this process's gauges from the loaded state (after start-up and after a fork)."""
        if self.certificate is not None and self.certificate.current is not None:
            self.metrics.cert_expiry.set(self.certificate.current.not_after.timestamp())
        if self.config.current is not None:
            self.metrics.config_last_reload_success.set(0 if self.config.last_error else 1)
            self.metrics.config_info.set(1, self.config.config_hash)

    def __post_init__(self) -> None:
        self.publish_metrics()


class BodyTooLarge(Exception):
    """The request body exceeded the limit (the caller answers 400 naming it)."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, or BodyTooLarge as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def request_started(scope: Scope) -> float:
    """Monotonic time at which this request's headers were complete (now, outside our protocol)."""
    started = scope.get(STARTED_KEY)
    return started if isinstance(started, float) else time.monotonic()


class ConnectionShares:
    """Open-connection counts of every worker, in memory the supervisor shared before forking.

    Workers accepting on one socket do not share connections evenly: whichever is idle when a
    burst arrives takes it all (the API server opens its keep-alive connections in bursts). A
    worker holding more than its share (total / workers, plus one) ends its next response with
    ``Connection: close``; the client reconnects and an idler worker is likelier to accept.
    """

    SLOT = struct.Struct("=q")

    #: At most one rebalancing close per worker this often (a burst of closes would re-deal
    #: all connections at random instead of moving a few).
    INTERVAL = 0.05
    #: The counts are compared at most this often (not at every request).
    CHECK_INTERVAL = 0.01

    def __init__(self, memory: Any, index: int, workers: int) -> None:
        self.memory, self.index, self.workers = memory, index, workers
        self.closing = 0  # connections this worker told to close and that are not gone yet
        self.next_check = 0.0

    @classmethod
    def create(cls, workers: int) -> Any:
        """Anonymous shared memory for ``workers`` counters (call before forking)."""
        return mmap.mmap(-1, cls.SLOT.size * workers)

    def add(self, delta: int) -> None:
        offset = self.index * self.SLOT.size
        (value,) = self.SLOT.unpack_from(self.memory, offset)
        self.SLOT.pack_into(self.memory, offset, value + delta)

    def reset(self) -> None:
        """A worker (re)starts with no connections (the supervisor, before forking it)."""
        self.SLOT.pack_into(self.memory, self.index * self.SLOT.size, 0)

    def should_close(self) -> bool:
        """True (and counted) when this worker should hand one connection back to the kernel."""
        now = time.monotonic()
        if now < self.next_check:
            return False
        counts = [self.SLOT.unpack_from(self.memory, i * self.SLOT.size)[0] for i in range(self.workers)]
        if counts[self.index] - self.closing <= sum(counts) / self.workers + 1:
            self.next_check = now + self.CHECK_INTERVAL
            return False
        self.closing += 1
        self.next_check = now + self.INTERVAL
        return True


class InlineHandler(Protocol):
    """What answers the protocol's inline requests (``injector.server.InjectEndpoint``)."""

    def answer_inline(self, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes, Any]:
        """(status, JSON body, token for ``bookkeeping``); must not raise."""
        ...

    def bookkeeping(self, status: int, token: Any) -> None:
        """Runs after the answer is written."""
        ...


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that broke a limit."""


def _status_response(status: int, reason: bytes, message: str) -> bytes:
    body = message.encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, time and connection limits (see the module doc)."""

    limits: HttpLimits = HttpLimits()
    metrics: InjectorMetrics | None = None
    shares: ConnectionShares | None = None
    cap: int = 1000
    draining = False  # set on the class when the server drains: every answer closes its connection
    inline: InlineHandler | None = None
    inline_path = b"/inject"
    inline_max_bytes = 0  # the largest Content-Length answered inline

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._on_deadline: Callable[[], None] | None = None
        self._idle = False  # the deadline is the keep-alive one
        self._in_headers = True
        self._phase_since = time.monotonic()
        self._raw_header_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        self._requests = 0
        self._rebalanced = False
        self._refusal: tuple[int, bytes, str, str] | None = None
        self._inline_turn: RequestResponseCycle | None = None  # inline, its turn come, body pending

    # -- timers and refusals

    # One deadline per connection (idle, headers or body), on one timer set lazily: moving the
    # deadline is an assignment, and a timer that fires before it sets itself again for what
    # is left. Setting and cancelling a loop timer per phase cost three timers per request.

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        deadline = self.loop.time() + seconds
        self._deadline, self._on_deadline = deadline, callback
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._deadline_reached)

    def _disarm(self) -> None:
        self._on_deadline = None  # a pending timer fires later and finds nothing due
        self._idle = False

    def _deadline_reached(self) -> None:
        self._timer = None
        callback = self._on_deadline
        if callback is None:
            return
        if self.loop.time() < self._deadline - 0.001:  # moved since the timer was set
            self._timer = self.loop.call_at(self._deadline, self._deadline_reached)
            return
        self._disarm()
        callback()

    def _stop_timer(self) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _count(self, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.refused_connections.inc(limit)

    def _refuse(self, status: int, reason: bytes, message: str, limit: str) -> None:
        """Answer ``status`` naming the limit and drop the connection."""
        self._stop_timer()
        self._count(limit)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's answer, if any, goes nowhere
            cycle.message_event.set()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # On a kept-alive connection the last cycle is the previous request's, answered: this
        # one has no answer yet either.
        if cycle is None or cycle.response_complete or not cycle.response_started:
            transport.write(_status_response(status, reason, message))
        transport.close()
        # A client that does not read cannot hold the descriptor through a TLS shutdown.
        self.loop.call_later(1.0, transport.abort)

    def _drop(self, limit: str) -> None:
        self._stop_timer()
        self._count(limit)
        if self.transport is not None:
            self.transport.abort()

    def _header_timeout(self) -> None:
        if self._raw_header_bytes == 0:  # never sent a byte of this request: just close
            self._drop("header_timeout")
            return
        self._refuse(408, b"Request Timeout",
                     f"request headers not complete within {self.limits.header_timeout:g} s "
                     "(limit --header-timeout)", "header_timeout")

    def _body_timeout(self) -> None:
        self._refuse(408, b"Request Timeout",
                     f"request body not complete within {self.limits.body_timeout:g} s "
                     "(limit --body-timeout)", "body_timeout")

    # -- connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.cap and not self._evict_one():
            self._count("max_connections")
            transport.abort()
            return
        super().connection_made(transport)
        if self.shares is not None:
            self.shares.add(1)
        self._phase_since = time.monotonic()
        self._arm(self.limits.header_timeout, self._header_timeout)

    def _evict_one(self) -> bool:
        """Close the connection that has been sending its headers longest, else the idlest one."""
        sending: list[tuple[float, LimitedHttpToolsProtocol]] = []
        idle: list[tuple[float, LimitedHttpToolsProtocol]] = []
        for conn in self.connections:
            if not isinstance(conn, LimitedHttpToolsProtocol) or conn.transport is None:
                continue
            if conn.cycle is None or conn.cycle.response_complete:
                (sending if conn._raw_header_bytes or conn._requests == 0 else idle).append(
                    (conn._phase_since, conn))
        for group in (sending, idle):
            if group:
                _, victim = min(group, key=lambda item: item[0])
                victim._drop("evicted")
                self.connections.discard(victim)
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.transport is None:  # refused in connection_made
            return
        if self.shares is not None:
            self.shares.add(-1)
            if self._rebalanced:
                self.shares.closing -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._in_headers:
            if self._on_deadline is None:  # first bytes of a request on a kept-alive connection
                self._phase_since = time.monotonic()
                self._arm(self.limits.header_timeout, self._header_timeout)
            self._raw_header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(*self._refusal)
            else:
                self._refuse(400, b"Bad Request", "invalid HTTP request", "malformed")
            return
        if self._in_headers and self._raw_header_bytes > self.limits.max_header_bytes:
            self._refuse(431, b"Request Header Fields Too Large",
                         f"request headers exceed {self.limits.max_header_bytes} bytes "
                         "(limit --max-header-bytes)", "max_header_bytes")

    # -- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        limits = self.limits
        if self._header_count > limits.max_headers:
            self._refusal = (431, b"Request Header Fields Too Large",
                             f"more than {limits.max_headers} request headers (limit --max-headers)",
                             "max_headers")
            raise _Refused
        if self._header_bytes > limits.max_header_bytes:
            self._refusal = (431, b"Request Header Fields Too Large",
                             f"request headers exceed {limits.max_header_bytes} bytes "
                             "(limit --max-header-bytes)", "max_header_bytes")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._raw_header_bytes = 0
        self._disarm()
        self.scope[STARTED_KEY] = time.monotonic()  # type: ignore[literal-required]
        if self.inline is not None and self._inline_fits():
            self.scope[INLINE_KEY] = True  # type: ignore[literal-required]
        super().on_headers_complete()
        self._requests += 1
        limit = self.limits.max_requests_per_connection
        if self.cycle is not None and (self.draining or (limit and self._requests >= limit)):
            self.cycle.keep_alive = False
        elif self.cycle is not None and self.shares is not None and not self._rebalanced \
                and self.shares.should_close():
            self._rebalanced = True
            self.cycle.keep_alive = False
        if self.cycle is not None and self.cycle.more_body:
            self._arm(self.limits.body_timeout, self._body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        # The next bytes on this connection begin the next request's headers: they get the
        # header timeout, even on a kept-alive connection whose first request was honest.
        self._in_headers = True
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and cycle is self._inline_turn:
            self._answer_inline(cycle)

    # -- the inline path

    def _inline_fits(self) -> bool:
        """True for a POST to the inline path with a body of known size up to ``inline_max_bytes``
        (not chunked, no ``Expect``), while the client reads its answers (else back-pressure
        needs the ASGI path, which waits for the writes to drain)."""
        if self.flow.write_paused or self.parser.get_method() != b"POST":
            return False
        if self.url.split(b"?", 1)[0] != self.inline_path:
            return False
        length = -1
        for name, value in self.headers:
            if name == b"content-length":
                if not value.isdigit():
                    return False
                length = int(value)
            elif name in (b"transfer-encoding", b"expect"):
                return False
        return 0 <= length <= self.inline_max_bytes

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Start a request's answer when its turn comes (at once, or after a pipelined one)."""
        if not cycle.scope.get(INLINE_KEY):
            super()._start_asgi_task(cycle, app)
        elif cycle.more_body:
            self._inline_turn = cycle  # answered when the body is complete (on_message_complete)
        else:  # a pipelined request whose body is here: answer outside the previous answer's call
            self.loop.call_soon(self._answer_inline, cycle)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.scope.get(INLINE_KEY):
            # uvicorn pauses reading above 64 KiB until the app asks for the body; an inline
            # body is bounded by its Content-Length and read whole.
            if not cycle.response_complete:
                cycle.body += body
            return
        super().on_body(body)

    def _answer_inline(self, cycle: RequestResponseCycle) -> None:
        """Answer an inline request whose body is complete: one write, then the bookkeeping."""
        self._inline_turn = None
        transport = self.transport
        handler = self.inline
        if handler is None or cycle.disconnected or cycle.response_complete or transport is None \
                or transport.is_closing():
            return
        status, payload, token = handler.answer_inline(cycle.scope["headers"], bytes(cycle.body))
        cycle.body = bytearray()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(payload)).encode(), b"\r\n"]
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", payload]
        cycle.response_started = True
        transport.write(b"".join(head))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            transport.close()
        cycle.on_response()
        handler.bookkeeping(status, token)

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timeout as this connection's deadline (unless the next
        request's headers have begun: their own deadline bounds the connection then)."""
        self._phase_since = time.monotonic()
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:  # pipelined requests start in order
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._on_deadline is None:
            self._arm(self.timeout_keep_alive, self.timeout_keep_alive_handler)
            self._idle = True

    def _unset_keepalive_if_required(self) -> None:
        if self._idle:
            self._disarm()
        super()._unset_keepalive_if_required()

    def idle_for(self, now: float) -> float:
        """Seconds since this connection last did anything (0 while a request is under way)."""
        if self._raw_header_bytes or (self.cycle is not None and not self.cycle.response_complete):
            return 0.0
        return now - self._phase_since


def protocol_class(limits: HttpLimits, metrics: InjectorMetrics | None,
                   shares: ConnectionShares | None = None, inline: InlineHandler | None = None,
                   inline_max_bytes: int = 0) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for one server, carrying its limits and the handler of inline requests."""
    return type("WebhookHttpProtocol", (LimitedHttpToolsProtocol,),
                {"limits": limits, "metrics": metrics, "shares": shares, "cap": limits.connection_cap(),
                 "inline": inline, "inline_max_bytes": inline_max_bytes})


class LimitedServer(Server):
    """uvicorn's server listening on given sockets with a TLS handshake timeout."""

    def __init__(self, config: Any, limits: HttpLimits) -> None:
        super().__init__(config)
        self.limits = limits

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(3)
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(config=config, server_state=self.server_state,
                                              app_state=self.lifespan.state, _loop=_loop)

        loop = asyncio.get_running_loop()
        self.servers = []
        for sock in sockets or []:
            kwargs: dict[str, Any] = {"sock": sock, "ssl": config.ssl, "backlog": config.backlog}
            if config.ssl is not None:
                kwargs["ssl_handshake_timeout"] = self.limits.tls_handshake_timeout
            self.servers.append(await loop.create_server(create_protocol, **kwargs))
        self.started = True

    #: During the drain, a connection idle this long is closed: the API server reuses its most
    #: recently used connection first, so a long-idle one is the least likely to carry a request
    #: at the moment it closes (the race every HTTP/1.1 server has when it closes a kept-alive
    #: connection).
    DRAIN_IDLE = 1.0

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        """Drain, then uvicorn's shutdown: stop accepting, answer what arrives on the open
        connections with ``Connection: close`` for up to ``drain_timeout``, closing connections
        as they fall idle, so that a rolling restart drops no request the API server sends."""
        for server in self.servers:
            server.close()
        protocol = self.config.http_protocol_class
        deadline = time.monotonic() + self.limits.drain_timeout
        if issubclass(protocol, LimitedHttpToolsProtocol) and not self.force_exit:
            protocol.draining = True
            while self.server_state.connections and time.monotonic() < deadline and not self.force_exit:
                now = time.monotonic()
                for conn in list(self.server_state.connections):
                    if isinstance(conn, LimitedHttpToolsProtocol) and conn.idle_for(now) >= self.DRAIN_IDLE \
                            and conn.transport is not None and not conn.transport.is_closing():
                        conn.transport.close()
                await asyncio.sleep(0.05)
        await super().shutdown(sockets)
