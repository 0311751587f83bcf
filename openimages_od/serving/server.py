"""The listening side of ``oiod serve``: connection limits, slow clients, aiohttp's own errors.

aiohttp alone answers a malformed request with a plain-text 400 that echoes the
request bytes and logs a traceback per request, keeps a connection that never
finishes its headers for an hour, and accepts connections until the process
runs out of file descriptors. :class:`GuardedSite` (used by ``run_serve`` and
the tests' service thread) closes those holes:

* at most ``max_connections`` open client connections, capped below the
  process's file-descriptor limit; when full, the connection that has been idle
  longest (no request in the app: a client still dribbling its headers, or an
  idle keep-alive) is closed to make room, so a crowd of slow clients cannot
  lock out a health check; when every connection is busy the newcomer gets a
  503 JSON answer;
* the request headers must arrive within ``header_timeout_s`` (aiohttp's
  keep-alive timer, which also runs before the first request, set by
  ``create_app``); bodies have ``body_timeout_s`` in the handlers;
* aiohttp's own 400s (bad request line, oversized header...) are JSON
  ``{"error": ...}`` without request bytes, logged as one line without a traceback.

Anything beyond this (TLS, per-IP rate limits, request buffering) belongs to the
reverse proxy in front; see the README's security section.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

__all__ = ["ConnectionGuard", "GuardedSite", "connection_limit", "serve_until_stopped"]

FD_RESERVE = 128  # descriptors kept for the model, logs, outgoing fetches and storage clients
_BUSY_BODY = json.dumps(
    {"error": {"code": "unavailable", "message": "too many open connections; retry later"}}
)
_BUSY_RESPONSE = (
    f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    f"Connection: close\r\nContent-Length: {len(_BUSY_BODY)}\r\n\r\n{_BUSY_BODY}"
).encode()


def connection_limit(configured: int) -> int:
    """``configured``, lowered so connections plus :data:`FD_RESERVE` fit the soft descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, soft - FD_RESERVE))


class ConnectionGuard:
    """Counts client connections and picks which idle one to close when full.

    Args:
        max_connections: the limit.
        on_change: called with (open connections, reason or None) for metrics.
    """

    def __init__(
        self, max_connections: int, on_change: Callable[[int, str | None], None] | None = None
    ) -> None:
        self.max_connections = max_connections
        self.on_change = on_change
        self.open = 0
        # Idle connections, oldest-idle first; a connection with a request in the app is not in here.
        self._idle: collections.OrderedDict[GuardedRequestHandler, None] = collections.OrderedDict()

    def _notify(self, reason: str | None = None) -> None:
        if self.on_change is not None:
            self.on_change(self.open, reason)

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """Register a new connection; False when it must be refused (everything busy)."""
        while self.open >= self.max_connections and self._idle:
            victim, _ = self._idle.popitem(last=False)
            victim.evict()
            self._notify("idle_evicted")
        if self.open >= self.max_connections:
            self._notify("refused")
            return False
        self.open += 1
        self._idle[conn] = None
        self._notify()
        return True

    def busy(self, conn: GuardedRequestHandler) -> None:
        self._idle.pop(conn, None)

    def idle(self, conn: GuardedRequestHandler) -> None:
        if conn.admitted and not conn.gone:
            self._idle[conn] = None
            self._idle.move_to_end(conn)

    def gone(self, conn: GuardedRequestHandler) -> None:
        self._idle.pop(conn, None)
        self.open -= 1
        self._notify()


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, registered with a :class:`ConnectionGuard`, with JSON parse errors."""

    __slots__ = ("_guard", "admitted", "gone")

    def __init__(self, manager: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self.admitted = False
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._guard.admit(self):
            self.admitted = True
        else:
            transport.write(_BUSY_RESPONSE)  # type: ignore[attr-defined]
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.admitted and not self.gone:
            self.gone = True
            self._guard.gone(self)
        super().connection_lost(exc)

    def evict(self) -> None:
        """Close this (idle) connection to make room for a new one."""
        if self.transport is not None:
            self.transport.close()
        if not self.gone:
            self.gone = True
            self._guard.gone(self)

    def request_started(self) -> None:
        self._guard.busy(self)

    def request_finished(self) -> None:
        self._guard.idle(self)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # Called by aiohttp for requests it could not parse (before any middleware) and for
        # exceptions that escaped the app: one short log line, no traceback, no request bytes echoed.
        if status >= 500:  # an exception escaped the app (a bug): keep its traceback
            log.error("unhandled error on a request from %s", request.remote, exc_info=exc)
        else:
            log.info(
                "rejected a malformed request from %s: %s %s",
                request.remote,
                status,
                type(exc).__name__ if exc else "",
            )
        code = "bad_request" if status == 400 else "internal"
        text = (
            "the request could not be parsed as HTTP (bad request line or headers)"
            if status == 400
            else "internal server error"
            if status >= 500
            else "the request was rejected"
        )
        resp = web.json_response({"error": {"code": code, "message": text}}, status=status)
        resp.force_close()
        return resp


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard` (see module docstring)."""

    __slots__ = ("_bound", "_guard", "_host", "_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *, backlog: int = 1024
    ) -> None:
        # A deep accept queue (the kernel caps it at net.core.somaxconn): with aiohttp's 128, a
        # burst of connections fills it and the kernel drops new SYNs, so a health probe arriving
        # then waits for its client's SYN retransmit (1 s, then 3 s) although the loop is idle.
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._bound = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._bound}"

    @property
    def port(self) -> int:
        return self._bound

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # The handler kwargs aiohttp's Server would use (access log, keep-alive timeout, header limits).
        kwargs = dict(server._kwargs)

        def factory() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, self._guard, loop=loop, **kwargs)

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._bound = self._server.sockets[0].getsockname()[1]


class _QuietLoopErrors:
    """Loop exception handler: one line per distinct message per minute, no traceback flood.

    Running out of descriptors makes asyncio's accept loop report an error every time it
    retries; a flood of identical tracebacks fills disks and hides everything else.
    """

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        msg = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        key = f"{msg}|{type(exc).__name__}"
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval_s:
            return
        self._last[key] = now
        log.error("%s%s (repeats are silenced for %ds)", msg, f": {exc!r}" if exc else "", self.interval_s)


async def serve_until_stopped(
    runner: web.AppRunner,
    host: str,
    port: int,
    max_connections: int,
    on_change: Callable[[int, str | None], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Set up ``runner``, listen on ``host:port`` through a guard, and serve until SIGTERM/SIGINT.

    Then stop accepting, let in-flight requests drain (the runner's shutdown timeout) and clean up.
    """
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_QuietLoopErrors())
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        site = GuardedSite(runner, host, port, ConnectionGuard(max_connections, on_change))
        await site.start()
        await stop.wait()
    finally:
        await runner.cleanup()
