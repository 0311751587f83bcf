"""The routes of ``oiod serve`` and their handlers.

``POST /v1/detect`` (the service's own API), TF Serving's REST shape
(:mod:`openimages_od.serving.tf_serving`), health and readiness, Prometheus metrics, the
OpenAPI document and the web page with its static files. Request parsing is in
:mod:`openimages_od.serving.request`; failures are raised as
:class:`openimages_od.serving.errors.ApiError` and shaped by the error middleware.
"""

from __future__ import annotations

import base64
import errno
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from openimages_od.serving.errors import ApiError
from openimages_od.serving.middleware import error_response
from openimages_od.serving.model import to_detections
from openimages_od.serving.request import parse_detect_request
from openimages_od.serving.state import STATE, ServeState
from openimages_od.serving.tf_serving import handle_tfs_predict, handle_tfs_status

__all__ = ["STATIC_DIR", "add_routes", "handle_detect"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


def add_routes(router: web.UrlDispatcher) -> None:
    """Register every route of the service on ``router``."""
    router.add_get("/", handle_index)
    router.add_get("/static/{name}", handle_static)
    router.add_get("/healthz", handle_healthz)
    router.add_get("/readyz", handle_readyz)
    router.add_get("/metrics", handle_metrics)
    router.add_get("/openapi.json", handle_openapi)
    router.add_post("/v1/detect", handle_detect)
    router.add_post(r"/v1/models/{name:[A-Za-z0-9_.\-]+}:predict", handle_tfs_predict)
    router.add_get(r"/v1/models/{name:[A-Za-z0-9_.\-]+}", handle_tfs_status)


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
