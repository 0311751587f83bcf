"""``oiod serve``: the aiohttp detection service.

The app factory :func:`create_app` builds an :class:`aiohttp.web.Application`
whose ``cleanup_ctx`` loads the exported model once (off the event loop),
starts the micro-batcher, the guarded fetcher and the work pools, and releases
them at shutdown after in-flight work has drained. State lives under the typed
``STATE`` key (:mod:`openimages_od.serving.state`).

Routes (:mod:`openimages_od.serving.routes`; see :mod:`openimages_od.serving.openapi` for the full
document):

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
for the ones raised before the app sees the request; the middlewares in
:mod:`openimages_od.serving.middleware` for the rest). Request parsing is in
:mod:`openimages_od.serving.request`; blocking work runs on bounded pools
(:mod:`openimages_od.serving.pools`). This module is the app factory and its lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractResolver

from openimages_od.config import Config, normalize_root
from openimages_od.errors import ConfigError, OiodError
from openimages_od.serving.batcher import MicroBatcher
from openimages_od.serving.middleware import (
    JsonAccessLogger,
    auth_middleware,
    connection_middleware,
    error_middleware,
    error_response,
    metrics_middleware,
)
from openimages_od.serving.model import ExportedModel
from openimages_od.serving.pools import Pools
from openimages_od.serving.routes import add_routes
from openimages_od.serving.s3_source import S3ImageSource
from openimages_od.serving.safe_fetch import AddressPolicy, SafeFetcher
from openimages_od.serving.state import STATE, Metrics, ServeState

log = logging.getLogger(__name__)
access_log = logging.getLogger("openimages_od.serving.access")

__all__ = [
    "STATE",
    "Metrics",
    "ServeState",
    "connection_events",
    "create_app",
    "error_response",
    "make_runner",
    "run_serve",
]


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
    add_routes(app.router)
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
