"""Where ``POST /dry-run`` runs: in a forked child process, never on the admission path.

A dry-run body may hold thousands of objects; parsing and injecting them on the worker's event
loop (or a thread of it, under the GIL) stalled every ``/inject`` for as long. Each dry-run
forks a child instead: it inherits the running configuration exactly (copy-on-write), runs at a
lower CPU priority (``nice`` 10) under its own memory and CPU-time rlimits, writes its answer to
a pipe and exits. The worker only waits on that pipe. A child over its wall-clock limit is
killed; at most ``concurrency`` children per worker run at once, further requests get 429.

The endpoint requires authentication like ``/audit``: a bearer token (TokenReview) whose user
may ``create pods`` in the namespace asked for (SubjectAccessReview), which is what the same
user learns from ``kubectl create --dry-run=server``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# Imported here, in the worker, so that each forked child starts with it loaded.
from injector import auth, dryrun
from injector.http import BodyTooLarge, read_body

if TYPE_CHECKING:
    from fastapi import Request

    from injector.http import ServerState

log = logging.getLogger("injector.dryrun")

JSON_MEDIA = "application/json"
MiB = 1024 * 1024


@dataclass(frozen=True)
class DryRunProcessLimits:
    """Bounds of one dry-run request; each is a ``serve`` flag."""

    max_body_bytes: int = 2 * MiB  # = injector.dryrun.DryRunLimits' document limit
    timeout: float = 20.0  # wall clock of the child; its CPU rlimit is the same number of seconds
    max_memory_bytes: int = 256 * MiB  # address space the child may add (the pod is limited to 512Mi)
    max_output_bytes: int = 64 * MiB
    concurrency: int = 1  # children per worker process
    auth: bool = True  # TokenReview + SubjectAccessReview (create pods); off only for local use


def _error(message: str) -> bytes:
    return json.dumps({"error": message}, ensure_ascii=False, indent=2).encode() + b"\n"


def compute(body: bytes, content_type: str, params: Mapping[str, str], config: Any,
            limits: DryRunProcessLimits | None = None) -> tuple[int, bytes, str]:
    """The whole dry-run answer (status, body, media type) from the request's bytes. Pure.

    ``injector.dryrun`` applies its document limits; its byte and time limits follow this
    runner's flags, which are enforced first (so the refusal names the flag).
    """
    from dataclasses import replace

    own = dryrun.DEFAULT_LIMITS
    if limits is not None:
        documents = replace(own.documents, yaml=replace(own.documents.yaml, max_bytes=limits.max_body_bytes))
        own = replace(own, documents=documents, max_seconds=limits.timeout + 1)
    return dryrun.respond(body, content_type, config, params=params, limits=own)


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(write_fd: int, body: bytes, content_type: str, params: Mapping[str, str], config: Any,
           limits: DryRunProcessLimits) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        logging.disable(logging.CRITICAL)  # a handler lock held by another thread at fork time
        os.nice(10)
        budget = _vm_size() + limits.max_memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
        seconds = max(1, int(limits.timeout + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
        try:
            status, payload, media = compute(body, content_type, params, config, limits)
        except MemoryError:
            status, media = 400, JSON_MEDIA
            payload = _error(f"the dry-run exceeded its memory limit of {limits.max_memory_bytes // MiB} MiB "
                             "(serve --dry-run-max-memory)")
        out = f"{status} {media}\n".encode() + payload
        view = memoryview(out)
        while view:
            view = view[os.write(write_fd, view):]
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _read_all(fd: int, limit: int) -> bytes | None:
    """Everything from the pipe, or None once more than ``limit`` bytes arrived."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


class DryRunRunner:
    """Forks one child per dry-run, at most ``limits.concurrency`` at a time."""

    WARM_UP = b'{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "warm-up"}, ' \
              b'"spec": {"containers": [{"name": "app", "image": "app"}]}}'

    def __init__(self, limits: DryRunProcessLimits) -> None:
        self.limits = limits
        self.running = 0

    def warm(self, config: Any) -> None:
        """One dry-run in the worker itself, before serving: its lazy imports and memo are then
        inherited by every child instead of costing each of them ~0.2 s."""
        compute(self.WARM_UP, JSON_MEDIA, {}, config)

    async def run(self, body: bytes, content_type: str, params: Mapping[str, str],
                  config: Any) -> tuple[int, bytes, str]:
        limits = self.limits
        if self.running >= limits.concurrency:
            return 429, _error(f"{self.running} dry-run(s) already running in this worker (limit "
                               "--dry-run-concurrency): retry shortly"), JSON_MEDIA
        self.running += 1
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(write_fd, body, content_type, params, config, limits)
            os.close(write_fd)
            reading = loop.run_in_executor(None, _read_all, read_fd, limits.max_output_bytes + 4096)
            try:
                data = await asyncio.wait_for(reading, limits.timeout)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                await loop.run_in_executor(None, os.waitpid, pid, 0)
                return 400, _error(f"the dry-run did not finish within {limits.timeout:g} s (limit "
                                   "--dry-run-timeout); send fewer or smaller objects"), JSON_MEDIA
            if data is None:
                os.kill(pid, signal.SIGKILL)
            _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        finally:
            self.running -= 1
            os.close(read_fd)
        if data is None:
            return 400, _error(f"the dry-run answer exceeds {limits.max_output_bytes // MiB} MiB (limit "
                               "--dry-run-max-output)"), JSON_MEDIA
        head, sep, payload = data.partition(b"\n")
        if not sep:
            return 400, _error(_died(status, limits)), JSON_MEDIA
        code, _, media = head.decode().partition(" ")
        return int(code), payload, media


def _died(status: int, limits: DryRunProcessLimits) -> str:
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL):
        return (f"the dry-run used more than {limits.timeout:g} s of CPU (limit --dry-run-timeout); "
                "send fewer or smaller objects")
    return (f"the dry-run failed (exit status {status}), most likely over its memory limit of "
            f"{limits.max_memory_bytes // MiB} MiB (serve --dry-run-max-memory)")


async def handle(request: Request, state: ServerState) -> tuple[int, bytes, str]:
    """``POST /dry-run``: authenticate, read the body under its limit, run it in a child."""
    limits: DryRunProcessLimits = state.dry_run.limits
    namespace = request.query_params.get("namespace")
    if limits.auth:
        if state.api is None:
            return 503, _error("this server has no Kubernetes API access to authenticate /dry-run callers "
                               "(start it with --kubeconfig or in a pod)"), JSON_MEDIA
        try:
            token = auth.bearer_token(request.headers)
            await asyncio.to_thread(auth.authorize, state.api, token, verb="create", resource="pods",
                                    namespace=namespace)
        except auth.Denied as exc:
            return exc.status, _error(str(exc)), JSON_MEDIA
        except Exception as exc:
            return 502, _error(f"Kubernetes API request failed: {type(exc).__name__}: {exc}"), JSON_MEDIA
    try:
        body = await read_body(request.receive, limits.max_body_bytes)
    except BodyTooLarge:
        return 413, _error(f"request body exceeds the limit of {limits.max_body_bytes} bytes "
                           "(serve --dry-run-max-body-bytes)"), JSON_MEDIA
    params = dict(request.query_params)
    return await state.dry_run.run(body, request.headers.get("content-type", ""), params,
                                   state.config.current)
