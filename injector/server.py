"""The webhook's HTTP shell: a FastAPI app around the injection core.

``create_app(state)`` builds the app; the process wiring (flags, uvicorn, TLS socket) lives in
``injector.commands.serve``. ``POST /inject`` is the hot path: the HTTP protocol answers a
review with a Content-Length up to ``INLINE_BODY_BYTES`` itself through
``InjectEndpoint.answer_inline`` (no ASGI task, one write: ``injector.http``); the rest reach
``InjectEndpoint`` as a plain ASGI endpoint dispatched ahead of FastAPI's middleware and routing
(FastAPI's stack would cost about as much as the injection itself). Both read the body with a
size cap, hand the bytes to ``injector.admission.review`` and answer alike. Every other
endpoint is ordinary FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from injector import admission, dryrun_runner
from injector.events import PendingEvent
from injector.http import (
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    ServerState,
    read_body,
    request_started,
)
from injector.result import Decision

log = logging.getLogger("injector.server")

JSON_TYPES = ("application/json",)
#: Bodies up to this size are decided inline on the event loop (a typical pod takes ~0.2 ms);
#: larger ones on a bounded thread pool, so the request deadline can answer for them in time.
INLINE_BODY_BYTES = 256 * 1024
#: Seconds between hand-overs of the batched admission metrics (injector.metrics) to the files
#: every worker's /metrics reads: a scrape may miss the other workers' last half second.
METRICS_FLUSH_INTERVAL = 0.5


# ---------------------------------------------------------------------------------------------
# structured logs


_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(body, default=str).decode()
        except TypeError:
            return json.dumps(body, default=str, separators=(",", ":"))


_second: tuple[int, str] = (-1, "")  # the last second formatted (strftime is ~1% of a review)


def _timestamp(created: float) -> str:
    global _second
    second, text = _second
    if int(created) != second:
        second = int(created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, text)
    return f"{text}.{int(created * 1000) % 1000:03d}Z"


class RequestLog:
    """One JSON line per admission review, in the same format as ``JsonFormatter``.

    Written straight to the log file descriptor when there is one: building a LogRecord and
    running it through a handler costs ~7x more than the review's own encoding, and the line is
    flushed at once either way. Falls back to ``logging`` for streams without a descriptor.
    Between ``hold()`` and ``release()`` (the reviews one turn of the event loop answered) lines
    are collected and written together, in writes of at most ``PIPE_BUF`` bytes that end at a
    line's end: one system call for many lines (each was ~2% of a review's CPU), and a line
    never interleaves with another worker's on a shared pipe.
    """

    logger = logging.getLogger("injector.requests")
    #: POSIX's atomic pipe write size (Linux: 4096).
    ATOMIC = 4096

    def __init__(self) -> None:
        self.raw: Any = None  # unbuffered binary file on the log descriptor
        self._held: list[bytes] | None = None

    def hold(self) -> None:
        self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if not held:
            return
        chunk: list[bytes] = []
        size = 0
        for line in held:
            if chunk and size + len(line) > self.ATOMIC:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        try:
            self.raw.write(data)
        except OSError:
            self.logger.warning("request log lines lost: %s", data[:200].decode(errors="replace"))

    def attach(self, stream: Any) -> None:
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.raw = None
            return
        self.raw = open(fd, "wb", buffering=0, closefd=False)  # noqa: SIM115 - lives as long as the process

    def info(self, msg: str, fields: dict[str, Any]) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if self.raw is None:
            self.logger.info(msg, extra=fields)
            return
        line = {"time": _timestamp(time.time()), "level": "info", "logger": self.logger.name, "msg": msg,
                **fields}
        try:
            data = orjson.dumps(line, default=str) + b"\n"
            if self._held is not None:
                self._held.append(data)
            else:
                self.raw.write(data)
        except (OSError, TypeError):
            self.logger.info(msg, extra=fields)


request_log = RequestLog()


def configure_logging(level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    request_log.attach(stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# ---------------------------------------------------------------------------------------------
# the admission hot path


def _media_type(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key == b"content-type":
            return value.split(b";", 1)[0].strip().lower().decode("latin-1")
    return ""


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


Accounted = list[tuple[admission.Outcome, float]]


class InjectEndpoint:
    """``POST /inject``: a raw ASGI app, and ``answer_inline`` for the HTTP protocol's fast path.

    ``injector.http.LimitedHttpToolsProtocol`` answers a POST /inject whose declared body fits
    ``INLINE_BODY_BYTES`` itself, calling ``answer_inline`` with the complete body (no ASGI task,
    one write for the whole response); every other request to /inject comes through ASGI. Both
    produce the same answers through the same checks.
    """

    def __init__(self, state: ServerState) -> None:
        self.state = state
        # Large reviews only; a review that outlives its deadline keeps its thread until it
        # ends (the core's own limits bound that), so the pool stays small.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mesh-injector-review")
        # Used on the event loop thread only (``_decide``); large reviews on the pool go without.
        self.memo = admission.AnswerMemo(state.answer_memo) if state.answer_memo > 0 else None
        self._unsettled: list[tuple[int, Accounted]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.state.metrics
        metrics.istio_requests.inc()
        if scope["method"] != "POST":
            body = admission.error_body("use POST with an AdmissionReview", 405)
            metrics.requests.inc("inject", "405")
            metrics.istio_failure.inc()
            await send({"type": "http.response.start", "status": 405,
                        "headers": [(b"content-type", b"application/json"), (b"allow", b"POST"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        accounted: Accounted = []
        try:
            status, payload = await self._answer(scope, receive, accounted)
        except Exception as exc:  # last line of defence: an answer, never a 500
            log.exception("admission request failed")
            status, payload = 400, admission.error_body(f"cannot process this request: {type(exc).__name__}")
        await _respond(send, status, payload)
        self.bookkeeping(status, accounted)

    def answer_inline(self, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes, Accounted]:
        """(status, JSON body, what to account) for a POST whose whole body is ``body``.

        The caller writes the answer, then calls ``bookkeeping``. Never raises.
        """
        self.state.metrics.istio_requests.inc()
        accounted: Accounted = []
        try:
            refused = self._refused(headers)
            status, payload = refused if refused is not None else self._decide(body, accounted)
        except Exception as exc:  # last line of defence: an answer, never a 500
            log.exception("admission request failed")
            status, payload = 400, admission.error_body(f"cannot process this request: {type(exc).__name__}")
        return status, payload, accounted

    def bookkeeping(self, status: int, accounted: Accounted) -> None:
        """Metrics, the log line and Events, after the answer is on its way: the API server (and
        the pod create waiting on it) should not wait for them. Done for all the reviews one
        turn of the event loop answered together, at the start of the next turn (before it
        reads anything more), so their log lines leave in one write."""
        self._unsettled.append((status, accounted))
        if len(self._unsettled) > 1:
            return
        try:
            asyncio.get_running_loop().call_soon(self._settle)
        except RuntimeError:  # no event loop (called directly): now
            self._settle()

    def _settle(self) -> None:
        unsettled, self._unsettled = self._unsettled, []
        request_log.hold()
        try:
            for status, accounted in unsettled:
                self._keep_books(status, accounted)
        finally:
            request_log.release()

    def _keep_books(self, status: int, accounted: Accounted) -> None:
        metrics = self.state.metrics
        try:
            metrics.requests.inc("inject", str(status))
            if status != 200:
                metrics.istio_failure.inc()
            for outcome, elapsed in accounted:
                self._account(outcome, elapsed)
        except Exception:  # bookkeeping must never break the connection of an answered request
            log.exception("admission bookkeeping failed")

    def _refused(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes] | None:
        """The answer to a request its headers already disqualify (media type, declared size)."""
        media = _media_type(headers)
        if media not in JSON_TYPES:
            return 415, admission.error_body(
                f"unsupported Content-Type {media or '(none)'!r}: send application/json", 415
            )
        declared = _content_length(headers)
        limit = self.state.max_body_bytes
        if declared is not None and declared > limit:
            return 400, admission.error_body(
                f"request body of {declared} bytes exceeds the limit of {limit} bytes"
            )
        return None

    def _decide(self, body: bytes, accounted: Accounted) -> tuple[int, bytes]:
        """Review a body of at most ``INLINE_BODY_BYTES`` here, on the event loop thread."""
        started = time.perf_counter()
        try:
            payload, outcome = admission.review(body, config=self.state.config.current, memo=self.memo)
        except admission.BadReview as exc:
            return self._bad_review(exc)
        except Exception as exc:  # a bug in our own envelope handling: answer, do not crash
            return self._review_failed(exc)
        accounted.append((outcome, time.perf_counter() - started))
        return 200, payload

    @staticmethod
    def _bad_review(exc: admission.BadReview) -> tuple[int, bytes]:
        request_log.info("bad admission request", {"error": str(exc), "status": 400})
        return 400, admission.error_body(str(exc))

    @staticmethod
    def _review_failed(exc: Exception) -> tuple[int, bytes]:
        log.exception("admission review failed")
        return 400, admission.error_body(f"cannot process this AdmissionReview: {type(exc).__name__}")

    async def _answer(self, scope: Scope, receive: Receive, accounted: Accounted) -> tuple[int, bytes]:
        state = self.state
        deadline = request_started(scope) + state.limits.request_deadline
        refused = self._refused(scope["headers"])
        if refused is not None:
            return refused
        try:
            body = await read_body(receive, state.max_body_bytes)
        except BodyTooLarge:
            limit = state.max_body_bytes
            return 400, admission.error_body(f"request body exceeds the limit of {limit} bytes")
        if len(body) <= INLINE_BODY_BYTES:
            return self._decide(body, accounted)
        started = time.perf_counter()
        try:
            payload, outcome = await self._review_with_deadline(body, deadline)
        except admission.BadReview as exc:
            return self._bad_review(exc)
        except Exception as exc:
            return self._review_failed(exc)
        accounted.append((outcome, time.perf_counter() - started))
        return 200, payload

    async def _review_with_deadline(self, body: bytes, deadline: float) -> tuple[bytes, admission.Outcome]:
        """Decide on the pool; at the deadline, answer ``Timeout`` instead (the work is abandoned)."""
        limit = self.state.limits.request_deadline
        api_version, request = admission.parse_review(body)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            config = self.state.config.current
            future = asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: admission.review_request(api_version, request, config=config))
            try:
                return await asyncio.wait_for(future, remaining)
            except TimeoutError:
                pass
        self.state.metrics.timeouts.inc()
        log.warning("admission review passed its deadline",
                    extra={"uid": request["uid"], "deadline_s": limit})
        return admission.timed_out(api_version, request, limit)

    def _account(self, outcome: admission.Outcome, elapsed: float) -> None:
        state = self.state
        metrics = state.metrics
        metrics.latency.observe(elapsed)
        decision = outcome.decision
        if decision == Decision.INJECT:
            metrics.injections.inc(outcome.reason)
            metrics.istio_success.inc()
        elif decision == Decision.SKIP:
            metrics.skips.inc(outcome.reason)
            metrics.istio_skip.inc()
        elif decision == Decision.REJECT:
            metrics.rejections.inc(outcome.reason)
            metrics.istio_failure.inc()
        else:
            metrics.passthrough.inc(outcome.reason)
        for warning in outcome.warnings:
            metrics.warnings.inc(warning.code.value)
        if outcome.memo:
            metrics.answer_memo.inc(outcome.memo)
        request_log.info(
            "admission",
            {
                "uid": outcome.uid, "namespace": outcome.namespace, "pod": outcome.name,
                "operation": outcome.operation, "dry_run": outcome.dry_run, "decision": decision,
                "reason": outcome.reason, "patched": outcome.patched,
                "latency_ms": round(elapsed * 1000, 3),
                **({"memo": outcome.memo} if outcome.memo else {}),
                **({"detail": outcome.message} if decision == Decision.REJECT else {}),
                **({"warnings": [w.code.value for w in outcome.warnings]} if outcome.warnings else {}),
            },
        )
        if state.events is not None and outcome.pod is not None and not outcome.dry_run:
            if decision == Decision.REJECT:
                state.events.record(PendingEvent(outcome.namespace, outcome.pod, "Warning",
                                                 f"InjectionRejected{outcome.reason}"[:128],
                                                 f"pod refused by mesh-injector: {outcome.message}"))
            for warning in outcome.warnings:
                state.events.record(PendingEvent(outcome.namespace, outcome.pod, "Warning",
                                                 warning.code.value,
                                                 f"mesh-injector ({decision}): {warning.message}"))


# ---------------------------------------------------------------------------------------------
# background work


async def _poll_forever(interval: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except Exception:  # a poller must outlive any one failure
            log.exception("%s poll failed", what)


def _pollers(state: ServerState) -> list[Callable[[], Awaitable[None]]]:
    async def tls_step() -> None:
        cert = state.certificate
        assert cert is not None
        # Runs on the event loop thread on purpose: the listening context is never seen
        # half-updated by a handshake (handshakes run on this thread too). It takes ~1 ms.
        try:
            changed = cert.load()
        except Exception:
            state.metrics.cert_reloads.inc("failure")
            raise
        if changed:
            state.metrics.cert_reloads.inc("success")
            assert cert.current is not None
            state.metrics.cert_expiry.set(cert.current.not_after.timestamp())
        elif cert.last_error is not None:
            state.metrics.cert_reloads.inc("failure")

    async def config_step() -> None:
        await asyncio.to_thread(state.config.poll)

    async def flush_step() -> None:
        state.metrics.flush()  # the batched admission metrics, where the other workers see them

    out = [lambda: _poll_forever(METRICS_FLUSH_INTERVAL, flush_step, "metrics")]
    if state.certificate is not None:
        out.append(lambda: _poll_forever(state.tls_reload_interval, tls_step, "certificate"))
    if state.config.config_dir is not None:
        out.append(lambda: _poll_forever(state.config_reload_interval, config_step, "config"))
    return out


# ---------------------------------------------------------------------------------------------
# the app


def readiness(state: ServerState) -> tuple[bool, dict[str, Any]]:
    cert = state.certificate
    cert_ok = cert is None or cert.current is not None
    config_ok = state.config.current is not None
    detail: dict[str, Any] = {
        "ready": cert_ok and config_ok,
        "worker": {"index": state.worker, "of": state.workers, "pid": os.getpid()},
        "config": {
            "loaded": config_ok,
            "hash": state.config.config_hash or None,
            "dir": str(state.config.config_dir) if state.config.config_dir else None,
            "lastError": state.config.last_error,
        },
    }
    if cert is not None:
        detail["certificate"] = {
            "loaded": cert_ok,
            "subject": cert.current.subject if cert.current else None,
            "notAfter": cert.current.not_after.isoformat() if cert.current else None,
            "lastError": cert.last_error,
        }
    return cert_ok and config_ok, detail


class WebhookApp(FastAPI):
    """FastAPI, except that ``/inject`` is dispatched before FastAPI's middleware and routing.

    That stack costs about as much as the injection of a typical pod; the admission endpoint
    needs none of it (it does its own body handling and never raises).
    """

    inject_endpoint: InjectEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/inject":
            await self.inject_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(state: ServerState) -> WebhookApp:
    """The webhook application. Background pollers run for the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Everything imported so far lives as long as the process: keep the cyclic GC from
        # re-scanning it on every full collection (the admission path allocates a lot).
        gc.freeze()
        tasks = [asyncio.create_task(make()) for make in _pollers(state)]
        if state.events is not None:
            state.events.start()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if state.events is not None:
                await asyncio.to_thread(state.events.stop)
            state.metrics.flush()

    app = WebhookApp(
        title="mesh-injector",
        summary="Istio-compatible sidecar injection webhook",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.injector = state
    if state.dry_run is None:
        state.dry_run = dryrun_runner.DryRunRunner(dryrun_runner.DryRunProcessLimits())
    app.inject_endpoint = InjectEndpoint(state)
    # Also routed (same endpoint) so that mounting the app elsewhere keeps /inject working.
    app.router.routes.insert(0, Route("/inject", endpoint=app.inject_endpoint, methods=["POST", "GET"]))

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        """Liveness: the process serves requests."""
        state.metrics.requests.inc("healthz", "200")
        return "ok\n"

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: a certificate and a configuration are loaded; reports the last reload errors."""
        ready, detail = readiness(state)
        code = 200 if ready else 503
        state.metrics.requests.inc("readyz", str(code))
        return JSONResponse(detail, status_code=code)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus exposition (OpenMetrics when the scraper asks for it), summed over workers."""
        state.metrics.requests.inc("metrics", "200")
        state.metrics.flush()  # this worker's; the others flush every METRICS_FLUSH_INTERVAL
        body, content_type = await asyncio.to_thread(state.metrics.exposition, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    @app.post("/dry-run")
    async def dry_run(request: Request) -> Response:
        """Run the core on a Pod/workload/List (YAML or JSON) and show decision, reasons, patch, result.

        Authenticated; runs in a child process with its own limits (injector.dryrun_runner)."""
        status, payload, media = await dryrun_runner.handle(request, state)
        state.metrics.requests.inc("dry-run", str(status))
        return Response(payload, status_code=status, media_type=media)

    @app.get("/audit")
    async def audit(request: Request, namespace: str | None = None) -> Response:
        """Report every pod's injection state; needs a bearer token allowed to list pods."""
        from injector import audit as audit_mod

        response = await audit_mod.handle(request, state, namespace)
        state.metrics.requests.inc("audit", str(response.status_code))
        return response

    return app
