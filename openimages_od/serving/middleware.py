"""The request pipeline of ``oiod serve`` around every handler: guards, errors, metrics, access log.

Middlewares, outermost first (the order :func:`openimages_od.serving.app.create_app` installs):

* :func:`connection_middleware` marks the connection busy for the connection guard
  (:mod:`openimages_od.serving.server`), so idle connections are the ones shed when full;
* :func:`metrics_middleware` counts and times each request by route and echoes or assigns
  ``X-Request-ID``;
* :func:`error_middleware` turns every failure, ours and aiohttp's, into the one error shape
  ``{"error": {"code", "message"}}`` (:func:`error_response`);
* :func:`auth_middleware` checks the bearer token when ``serve.auth_token_env`` is set.

:class:`JsonAccessLogger` writes one JSON line per request, without headers or bodies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from openimages_od.serving.batcher import BatcherClosed
from openimages_od.serving.errors import ApiError
from openimages_od.serving.state import STATE

__all__ = [
    "PUBLIC_PATHS",
    "Handler",
    "JsonAccessLogger",
    "auth_middleware",
    "connection_middleware",
    "error_middleware",
    "error_response",
    "metrics_middleware",
]

log = logging.getLogger(__name__)

PUBLIC_PATHS = {"/healthz", "/readyz", "/", "/openapi.json", "/favicon.ico"}
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one error shape: ``{"error": {"code", "message"}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None) if route is not None else None
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    return resource.canonical


@web.middleware
async def connection_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection guard (when serving through one) that this connection is busy."""
    proto = request.protocol
    started = getattr(proto, "request_started", None)
    if started is None:
        return await handler(request)
    started()
    try:
        return await handler(request)
    finally:
        proto.request_finished()  # type: ignore[attr-defined]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request; echo or assign ``X-Request-ID``."""
    state = request.app[STATE]
    route = _route_name(request)
    t0 = time.perf_counter()
    state.metrics.inflight.inc()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        rid = request.headers.get("X-Request-ID", "")
        ok = 0 < len(rid) <= 64 and set(rid) <= _REQUEST_ID_CHARS
        resp.headers["X-Request-ID"] = rid if ok else uuid.uuid4().hex
        return resp
    finally:
        state.metrics.inflight.dec()
        state.metrics.requests.labels(route, request.method, str(status)).inc()
        state.metrics.latency.labels(route).observe(time.perf_counter() - t0)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure (ours and aiohttp's) into the JSON error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}
        return error_response(exc.status, exc.code, exc.message, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate", "Retry-After")}
        message = exc.reason or "error"
        if exc.status == 413:
            message = f"request body is larger than {request.app[STATE].serve.max_body_mb:g} MB"
        elif exc.status == 404:
            message = f"no route {request.path[:200]}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path[:200]}"
        return error_response(exc.status, _STATUS_CODES.get(exc.status, "http_error"), message, headers)
    except BatcherClosed:
        return error_response(503, "shutting_down", "the service is shutting down", {"Retry-After": "1"})
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:  # the client went away mid-request: nobody to answer, nothing to log
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path[:200])
        return error_response(500, "internal", "internal server error")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer-token check when ``serve.auth_token_env`` is set (health, page and API doc exempt)."""
    token = request.app[STATE].token
    if token is None or request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
        return await handler(request)
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.partition(" ")
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as the bytes they were.
    given_b = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_b, token.encode("utf-8")):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")
    return await handler(request)


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request: no headers (so no tokens) and no bodies."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            json.dumps(
                {
                    "ts": round(__import__("time").time(), 3),
                    "remote": request.remote,
                    "method": request.method,
                    "path": request.path[:300],
                    "status": response.status,
                    "bytes": response.body_length,
                    "duration_ms": round(time * 1000, 2),
                    "request_id": response.headers.get("X-Request-ID"),
                    "user_agent": request.headers.get("User-Agent", "")[:200],
                },
                separators=(",", ":"),
            )
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
