"""``oiod serve``: the aiohttp detection service.

The app factory :func:`create_app` builds an :class:`aiohttp.web.Application`
whose ``cleanup_ctx`` loads the exported model once (off the event loop),
starts the micro-batcher, the guarded fetcher and the work pools, and releases
them at shutdown after in-flight work has drained. State lives under the typed
``STATE`` key (:mod:`openimages_od.serving.state`).

Routes (see :mod:`openimages_od.serving.openapi` for the full document):

* ``POST /v1/detect``: JSON ``{"image": URL | data: URI | base64, "min_score",
  "max_detections", "draw", "format", "output"}``, a bare JSON string (the
  seed's form), ``multipart/form-data`` with an ``image`` file, or a raw
  ``image/*`` body (options as query parameters). With ``draw`` the annotated
  image comes back base64 in the JSON ``image`` field, or as the raw image when
  the request's ``Accept`` asks for ``image/*`` and not JSON.
* ``POST /v1/models/{name}:predict`` and ``GET /v1/models/{name}``: TF Serving's
  REST shape (:mod:`openimages_od.serving.tf_serving`).
* ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``/openapi.json``, ``/``
  (web page) and ``/static/{file}``.

Every error is ``{"error": {"code", "message"}}`` with a 4xx/5xx status,
including aiohttp's own 400/404/405/413 (:mod:`openimages_od.serving.server`
for the ones raised before the app sees the request). Request parsing is in
:mod:`openimages_od.serving.request`; blocking work runs on bounded pools
(:mod:`openimages_od.serving.pools`).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger, AbstractResolver

from openimages_od.config import Config, normalize_root
from openimages_od.errors import ConfigError, OiodError
from openimages_od.serving.batcher import BatcherClosed, MicroBatcher
from openimages_od.serving.errors import ApiError
from openimages_od.serving.model import ExportedModel, to_detections
from openimages_od.serving.pools import Pools
from openimages_od.serving.request import (
    decode_base64,  # noqa: F401
    parse_detect_request,
)
from openimages_od.serving.s3_source import S3ImageSource
from openimages_od.serving.safe_fetch import AddressPolicy, SafeFetcher
from openimages_od.serving.state import STATE, Metrics, ServeState
from openimages_od.serving.tf_serving import handle_tfs_predict, handle_tfs_status

log = logging.getLogger(__name__)
access_log = logging.getLogger("openimages_od.serving.access")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = {"/healthz", "/readyz", "/", "/openapi.json", "/favicon.ico"}
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

__all__ = ["STATE", "Metrics", "ServeState", "create_app", "error_response", "run_serve"]


# --------------------------------------------------------------------------- middlewares

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


# --------------------------------------------------------------------------- handlers


async def _write_output(state: ServeState, url: str, data: bytes) -> None:
    try:
        await state.pools.output.run(state.output_storage.write_bytes, url, data)
    except OSError as exc:
        # The storage layer wraps the OS error; the caller's name clashing with what is there is a 409.
        causes = {exc.errno, getattr(exc.__cause__, "errno", None)}
        if causes & {errno.EISDIR, errno.ENOTDIR, errno.EEXIST}:
            raise ApiError(
                409,
                "output_conflict",
                "output (or a folder on its path) clashes with an existing file or folder",
            ) from None
        log.error("cannot store annotated image at %s: %s", url, exc)
        raise ApiError(500, "output_failed", "could not store the annotated image") from None


async def handle_detect(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    model, batcher = state.require_ready()
    with batcher.ticket() as ticket:  # tells the batcher this request is on its way
        data, opts = await parse_detect_request(request)
        t0 = time.perf_counter()
        img = await state.inspect(data)
        raw = await state.predict(batcher, img, ticket)
    dets = to_detections(raw, model.labels, img.width, img.height, opts.min_score, opts.max_detections)
    body: dict[str, Any] = {
        "width": img.width,
        "height": img.height,
        "num_detections": len(dets),
        "detections": [d.to_json() for d in dets],
        "model": model.describe(),
    }
    if opts.draw or opts.output:
        from openimages_od.serving.draw import draw_detections

        annotated = await state.pools.draw.run(draw_detections, img.data, dets, opts.format)
        mime = "image/png" if opts.format == "png" else "image/jpeg"
        if opts.output:
            await _write_output(state, opts.output, annotated)
            body["output"] = opts.output
        if opts.draw:
            accept = request.headers.get("Accept", "")
            if "image/" in accept and "application/json" not in accept:
                return web.Response(
                    body=annotated, content_type=mime, headers={"X-Num-Detections": str(len(dets))}
                )
            body["image"] = base64.b64encode(annotated).decode()
            body["image_format"] = mime
    body["timing_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return web.json_response(body)


async def handle_healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.ready:
        assert state.model is not None
        return web.json_response({"status": "ready", "model": state.model.describe()})
    reason = "shutting down" if state.shutting_down else "model not loaded"
    return error_response(503, "not_ready", reason)


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    metrics = request.app[STATE].metrics
    for pool in request.app[STATE].pools.all():
        metrics.pool_busy.labels(pool.name).set(pool.running)
    body, ctype = metrics.render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def handle_openapi(request: web.Request) -> web.StreamResponse:
    from openimages_od.serving.openapi import openapi_document

    state = request.app[STATE]
    return web.json_response(
        openapi_document(state.model.name if state.model else "oiod", auth=state.token is not None)
    )


async def handle_index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


_STATIC_FILES = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()} if STATIC_DIR.is_dir() else {}


async def handle_static(request: web.Request) -> web.StreamResponse:
    # A fixed list of files (not a directory mapping): a missing name is a JSON 404, never a path lookup.
    path = _STATIC_FILES.get(request.match_info["name"])
    if path is None:
        raise ApiError(404, "not_found", f"no static file {request.match_info['name'][:100]!r}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- app


def _auth_token(env_name: str | None) -> str | None:
    if not env_name:
        return None
    token = os.environ.get(env_name) or None
    if token is None:
        # Only a conventional upper-case name is repeated: anything else may be the token pasted here.
        shown = (
            env_name if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}", env_name) else "(a variable; name not shown)"
        )
        raise ConfigError(
            f"serve.auth_token_env names {shown}, which is not set or empty; "
            f"set it or remove serve.auth_token_env to run without auth"
        )
    return token


def _serving_storage(storage: Any, timeout_s: float, attempts: int, pool: int) -> Any:
    """A copy of ``storage`` whose S3 clients give up quickly: with ``attempts`` tries of at most
    ``timeout_s / attempts`` each, a write to a stalling endpoint ends near the deadline instead of
    holding an ``output`` thread for minutes of retries after the caller got its 504."""
    from openimages_od.storage import Storage

    per_try = max(1.0, timeout_s / attempts)

    def tight(o: Any) -> Any:
        return o.model_copy(
            update={
                "connect_timeout_s": min(o.connect_timeout_s, 5.0, per_try),
                "read_timeout_s": min(o.read_timeout_s, per_try),
                "max_attempts": min(o.max_attempts, attempts),
                "max_pool_connections": pool,
            }
        )

    return Storage(
        s3=tight(storage.s3_default),
        bucket_options={b: tight(o) for b, o in storage.bucket_options.items()},
        gcs=storage.gcs_default,
        gcs_bucket_options=storage.gcs_bucket_options,
    )


def create_app(
    cfg: Config,
    model: ExportedModel | None = None,
    *,
    resolver: AbstractResolver | None = None,
    storage: Any = None,
) -> web.Application:
    """Build the service.

    Args:
        cfg: the configuration (``serve`` section, ``output.s3`` for s3 access).
        model: an already loaded model (tests, ``detect``); None loads ``cfg.serve_model`` at start-up.
        resolver: DNS resolver the SSRF guard wraps (tests inject one); None = the system resolver.
        storage: storage layer for s3 model/image/output access; None = ``storage_from_config(cfg)``.

    Returns:
        The application; its ``cleanup_ctx`` loads the model and starts the batcher.

    Raises:
        ConfigError: ``serve.auth_token_env`` names an unset variable, or ``allow_networks`` is invalid.
    """
    from openimages_od.storage_setup import storage_from_config

    sc = cfg.serve
    token = _auth_token(sc.auth_token_env)
    storage = storage or storage_from_config(cfg)
    pools = Pools(sc.fetch_workers, sc.cpu_workers, sc.output_workers, sc.fetch_timeout_s, sc.work_timeout_s)
    state = ServeState(
        cfg=cfg,
        metrics=Metrics(),
        model_url=cfg.serve_model,
        pools=pools,
        token=token,
        storage=storage,
        output_storage=_serving_storage(storage, sc.work_timeout_s, 2, sc.output_workers),
    )
    # handler_args reach aiohttp's connection handler: its keep-alive timer also runs before the
    # first request and closes a connection whose headers have not arrived (slow-loris clients).
    app = web.Application(
        client_max_size=state.max_body_bytes,
        middlewares=[connection_middleware, metrics_middleware, error_middleware, auth_middleware],
        handler_args={
            "keepalive_timeout": sc.header_timeout_s,
            "lingering_time": 2.0,
            "max_line_size": 8190,
            "max_field_size": 8190,
            "max_headers": 64,
        },
    )
    app[STATE] = state

    async def model_ctx(app: web.Application) -> Any:
        st = app[STATE]
        own = model is None
        loop = asyncio.get_running_loop()
        if own:
            log.info("loading model from %s", st.model_url)
            st.model = await loop.run_in_executor(None, lambda: ExportedModel.load(st.model_url, st.storage))
        else:
            st.model = model
        m = st.model
        assert m is not None
        max_batch, wait = (sc.max_batch, sc.max_wait_ms) if sc.batching else (1, 0.0)
        st.batcher = MicroBatcher(
            m.predict, max_batch=max_batch, max_wait_ms=wait, on_batch=st.metrics.observe_batch
        )
        await st.batcher.start()
        st.fetcher = SafeFetcher(
            AddressPolicy(sc.allow_networks),
            max_bytes=st.max_body_bytes,
            timeout_s=sc.fetch_timeout_s,
            max_redirects=sc.max_redirects,
            base_resolver=resolver,
        )
        st.s3 = S3ImageSource(
            sc.allowed_image_prefixes, st.storage, st.max_body_bytes, sc.fetch_timeout_s, st.pools.fetch
        )
        st.metrics.model_loaded.set(1)
        yield
        st.shutting_down = True
        st.metrics.model_loaded.set(0)
        await st.batcher.close()  # finishes queued work first
        await st.fetcher.close()
        await st.s3.close()
        st.pools.close()
        if own:
            m.close()
        st.model = None

    async def on_shutdown(app: web.Application) -> None:
        # Readiness drops at once so load balancers stop sending new requests while we drain.
        app[STATE].shutting_down = True

    app.cleanup_ctx.append(model_ctx)
    app.on_shutdown.append(on_shutdown)
    r = app.router
    r.add_get("/", handle_index)
    r.add_get("/static/{name}", handle_static)
    r.add_get("/healthz", handle_healthz)
    r.add_get("/readyz", handle_readyz)
    r.add_get("/metrics", handle_metrics)
    r.add_get("/openapi.json", handle_openapi)
    r.add_post("/v1/detect", handle_detect)
    r.add_post(r"/v1/models/{name:[A-Za-z0-9_.\-]+}:predict", handle_tfs_predict)
    r.add_get(r"/v1/models/{name:[A-Za-z0-9_.\-]+}", handle_tfs_status)
    return app


def _setup_access_log(enabled: bool) -> None:
    access_log.propagate = False
    access_log.handlers.clear()
    if enabled:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(h)
        access_log.setLevel(logging.INFO)
    else:
        access_log.setLevel(logging.CRITICAL)


def make_runner(app: web.Application, shutdown_timeout_s: float = 30.0, access: bool = True) -> web.AppRunner:
    """The runner ``run_serve`` and the tests' service thread use."""
    return web.AppRunner(
        app,
        access_log=access_log if access else None,
        access_log_class=JsonAccessLogger,
        shutdown_timeout=shutdown_timeout_s,
        handle_signals=False,
    )


def connection_events(state: ServeState) -> Callable[[int, str | None], None]:
    """Metrics callback for the connection guard."""

    def on_change(n: int, reason: str | None) -> None:
        state.metrics.connections.set(n)
        if reason:
            state.metrics.evictions.labels(reason).inc()

    return on_change


def run_serve(cfg: Config) -> int:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain in-flight requests and exit.

    Args:
        cfg: configuration; ``serve.model`` (or ``export.dir``) names the exported model.

    Returns:
        0 after a clean shutdown.
    """
    from openimages_od.config import save_resolved
    from openimages_od.serving.server import connection_limit, serve_until_stopped

    sc = cfg.serve
    app = create_app(cfg)
    if sc.output_dir:
        save_resolved(cfg, normalize_root(sc.output_dir), app[STATE].storage)
    _setup_access_log(sc.access_log)
    limit = connection_limit(sc.max_connections)
    if limit < sc.max_connections:
        log.warning("serve.max_connections lowered to %d to fit the open-file limit", limit)
    log.warning("oiod serve: model %s on http://%s:%d", cfg.serve_model, sc.host, sc.port)
    runner = make_runner(app, sc.shutdown_timeout_s, sc.access_log)
    try:
        asyncio.run(serve_until_stopped(runner, sc.host, sc.port, limit, connection_events(app[STATE])))
    except OSError as exc:
        if exc.errno is not None and "address" in str(exc).lower():
            raise OiodError(f"cannot listen on {sc.host}:{sc.port}: {exc.strerror or exc}") from None
        raise
    return 0
