"""``oiod serve``: the aiohttp detection service.

The app factory :func:`create_app` builds an :class:`aiohttp.web.Application`
whose ``cleanup_ctx`` loads the exported model once (off the event loop),
starts the micro-batcher and the guarded fetcher, and releases them at
shutdown after in-flight work has drained. State lives under typed
``web.AppKey`` keys.

Routes (see :mod:`openimages_od.serving.openapi` for the full document):

* ``POST /v1/detect``: JSON ``{"image": URL | data: URI | base64, "min_score",
  "max_detections", "draw", "format", "output"}``, a bare JSON string (the
  seed's form), ``multipart/form-data`` with an ``image`` file, or a raw
  ``image/*`` body (options as query parameters). With ``draw`` the annotated
  image comes back base64 in the JSON ``image`` field, or as the raw image when
  the request's ``Accept`` asks for ``image/*`` and not JSON.
* ``POST /v1/models/{name}:predict`` and ``GET /v1/models/{name}``: TF Serving's
  REST shape.
* ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``/openapi.json``, ``/``
  (web page).

Every error is ``{"error": {"code", "message"}}`` with a 4xx/5xx status,
including aiohttp's own 404/405/413.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger, AbstractResolver
from aiohttp.http_exceptions import HttpProcessingError

from openimages_od.config import Config, ServeConfig, join_url, normalize_root
from openimages_od.errors import ConfigError, OiodError
from openimages_od.serving.batcher import BatcherClosed, MicroBatcher
from openimages_od.serving.errors import ApiError
from openimages_od.serving.model import ExportedModel, ImageInput, RawOutput, inspect_image, to_detections
from openimages_od.serving.safe_fetch import AddressPolicy, SafeFetcher

log = logging.getLogger(__name__)
access_log = logging.getLogger("openimages_od.serving.access")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = {"/healthz", "/readyz", "/", "/openapi.json", "/favicon.ico"}
MAX_DETECTIONS_LIMIT = 1000

__all__ = ["create_app", "run_serve", "STATE", "ServeState", "Metrics"]


# --------------------------------------------------------------------------- state


class Metrics:
    """Prometheus metrics in their own registry (so several apps/tests never collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("oiod_http_requests_total", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("oiod_http_request_duration_seconds", "Request latency by route.", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("oiod_batch_size", "Images per model call.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.inference = Histogram("oiod_model_call_seconds", "Duration of one model call (a batch).",
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                   registry=self.registry)
        self.inflight = Gauge("oiod_http_requests_in_flight", "Requests being handled.", registry=self.registry)
        self.model_loaded = Gauge("oiod_model_loaded", "1 when the model is loaded and the service ready.",
                                  registry=self.registry)

    def observe_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.inference.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class ServeState:
    """Everything the handlers share; created by :func:`create_app`, filled at start-up."""

    cfg: Config
    metrics: Metrics
    model_url: str
    model: Optional[ExportedModel] = None
    batcher: Optional[MicroBatcher] = None
    fetcher: Optional[SafeFetcher] = None
    storage: Any = None
    token: Optional[str] = None
    shutting_down: bool = False
    started: float = field(default_factory=time.time)

    @property
    def serve(self) -> ServeConfig:
        return self.cfg.serve

    @property
    def ready(self) -> bool:
        return self.model is not None and self.batcher is not None and not self.shutting_down


STATE = web.AppKey("oiod_state", ServeState)


# --------------------------------------------------------------------------- middlewares

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout",
                 413: "payload_too_large", 415: "unsupported_media_type", 422: "unprocessable",
                 429: "too_many_requests", 500: "internal", 503: "unavailable", 504: "timeout"}


def error_response(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> web.Response:
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
async def metrics_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
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
        resp.headers["X-Request-ID"] = rid if re.fullmatch(r"[\w.-]{1,64}", rid) else uuid.uuid4().hex
        return resp
    finally:
        state.metrics.inflight.dec()
        state.metrics.requests.labels(route, request.method, str(status)).inc()
        state.metrics.latency.labels(route).observe(time.perf_counter() - t0)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Turn every failure (ours and aiohttp's) into the JSON error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate", "Retry-After")}
        message = exc.reason or "error"
        if exc.status == 413:
            message = f"request body is larger than {request.app[STATE].serve.max_body_mb:g} MB"
        elif exc.status == 404:
            message = f"no route {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        return error_response(exc.status, _STATUS_CODES.get(exc.status, "http_error"), message, headers)
    except BatcherClosed:
        return error_response(503, "shutting_down", "the service is shutting down", {"Retry-After": "1"})
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - last resort; the traceback goes to the log, not the client
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error")


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """Bearer-token check when ``serve.auth_token_env`` is set (health, page and API doc exempt)."""
    token = request.app[STATE].token
    if token is None or request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
        return await handler(request)
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")
    return await handler(request)


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request: no headers (so no tokens) and no bodies."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:  # noqa: A002
        self.logger.info(json.dumps({
            "ts": round(__import__("time").time(), 3), "remote": request.remote, "method": request.method,
            "path": request.path, "status": response.status, "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2), "request_id": response.headers.get("X-Request-ID"),
            "user_agent": request.headers.get("User-Agent", "")[:200],
        }, separators=(",", ":")))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


# --------------------------------------------------------------------------- helpers


def _state(request: web.Request) -> ServeState:
    return request.app[STATE]


def _require_ready(state: ServeState) -> tuple[ExportedModel, MicroBatcher]:
    if state.shutting_down:
        raise ApiError(503, "shutting_down", "the service is shutting down")
    if state.model is None or state.batcher is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    return state.model, state.batcher


_B64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]*={0,2}\s*$")


def decode_base64(s: str, what: str = "image") -> bytes:
    """Standard or URL-safe base64 (padding optional); 400 when it is not base64."""
    s = s.strip()
    if not s or not _B64_RE.match(s):
        raise ApiError(400, "bad_image", f"{what} is neither an http(s)/s3 URL, a data: URI nor base64")
    s = re.sub(r"\s+", "", s).replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_image", f"{what} is not valid base64") from None


async def resolve_image_source(state: ServeState, source: str) -> bytes:
    """Bytes for an ``image`` string: http(s)/s3 URL (guarded fetch), data: URI or base64."""
    s = source.strip()
    low = s[:16].lower()
    if low.startswith(("http://", "https://", "s3://")):
        assert state.fetcher is not None
        data, _ = await state.fetcher.fetch(s)
        return data
    if low.startswith("data:"):
        header, sep, payload = s.partition(",")
        if not sep or ";base64" not in header.lower():
            raise ApiError(400, "bad_image", "data: URIs must be base64 (data:image/png;base64,...)")
        mime = header[5:].split(";")[0].strip().lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise ApiError(415, "unsupported_media_type", f"data: URI type {mime!r} is not an image")
        data = decode_base64(payload)
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s):
        raise ApiError(400, "unsupported_scheme", "only http, https and s3 URLs may be fetched")
    else:
        data = decode_base64(s)
    if len(data) > state.serve.max_body_mb * 1024 * 1024:
        raise ApiError(413, "image_too_large", f"image is larger than {state.serve.max_body_mb:g} MB")
    return data


@dataclass
class DetectOptions:
    min_score: float
    max_detections: int
    draw: bool = False
    format: str = "jpeg"
    output: Optional[str] = None


_OPTION_KEYS = {"image", "min_score", "max_detections", "draw", "format", "output"}


def _parse_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return v.lower() in ("1", "true", "yes", "on")
    raise ApiError(400, "bad_request", f"{key} must be a boolean")


def parse_options(state: ServeState, raw: dict[str, Any]) -> DetectOptions:
    """Validate request options (JSON values or form/query strings)."""
    opts = DetectOptions(min_score=state.serve.min_score, max_detections=state.serve.max_detections)
    if raw.get("min_score") is not None:
        v = raw["min_score"]
        try:
            if isinstance(v, bool):
                raise ValueError
            opts.min_score = float(v)
        except (TypeError, ValueError):
            raise ApiError(400, "bad_request", "min_score must be a number between 0 and 1") from None
        if not 0.0 <= opts.min_score <= 1.0:
            raise ApiError(400, "bad_request", "min_score must be between 0 and 1")
    if raw.get("max_detections") is not None:
        v = raw["max_detections"]
        try:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            opts.max_detections = int(v)
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, "bad_request", "max_detections must be an integer") from None
        if not 1 <= opts.max_detections <= MAX_DETECTIONS_LIMIT:
            raise ApiError(400, "bad_request", f"max_detections must be between 1 and {MAX_DETECTIONS_LIMIT}")
    if raw.get("draw") is not None:
        opts.draw = _parse_bool(raw["draw"], "draw")
    if raw.get("format") is not None:
        fmt = str(raw["format"]).lower()
        if fmt not in ("jpeg", "png"):
            raise ApiError(400, "bad_request", "format must be jpeg or png")
        opts.format = fmt
    if raw.get("output") is not None:
        if not isinstance(raw["output"], str) or not raw["output"].strip():
            raise ApiError(400, "bad_request", "output must be a non-empty string")
        opts.output = _output_url(state, raw["output"].strip())
        if raw.get("format") is None and opts.output.lower().endswith(".png"):
            opts.format = "png"
    return opts


def _output_url(state: ServeState, output: str) -> str:
    """Where ``output`` may be written: only under ``serve.output_dir`` (400 otherwise)."""
    out_dir = state.serve.output_dir
    if not out_dir:
        raise ApiError(400, "output_not_allowed", "this server does not store images (serve.output_dir is not set)")
    root = normalize_root(out_dir)
    rel = output
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", output):
        if not output.startswith(root + "/"):
            raise ApiError(400, "output_not_allowed", "output must be a name under the server's output directory")
        rel = output[len(root) + 1:]
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or len(rel) > 512:
        raise ApiError(400, "output_not_allowed", "output must be a relative name like 'results/img1.jpg'")
    if not re.fullmatch(r"[\w.\-/ ]+", rel):
        raise ApiError(400, "output_not_allowed", "output may contain only letters, digits, '.', '-', '_', '/'")
    return join_url(root, rel)


async def _read_limited(state: ServeState, part: Any) -> bytes:
    limit = int(state.serve.max_body_mb * 1024 * 1024)
    chunks, total = [], 0
    while True:
        chunk = await part.read_chunk(1 << 16)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "payload_too_large", f"upload is larger than {state.serve.max_body_mb:g} MB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_multipart(state: ServeState, request: web.Request) -> tuple[Optional[bytes], dict[str, Any]]:
    """The uploaded ``image`` part (bytes) or its text, and the option fields."""
    reader = await request.multipart()
    fields: dict[str, Any] = {}
    data: Optional[bytes] = None
    async for part in reader:
        name = getattr(part, "name", None)
        if name == "image":
            if part.filename or (part.headers.get("Content-Type", "").lower().startswith(("image/", "application/octet"))):
                data = await _read_limited(state, part)
            else:
                fields["image"] = (await _read_limited(state, part)).decode("utf-8", "replace")
        elif name in _OPTION_KEYS:
            fields[name] = (await _read_limited(state, part)).decode("utf-8", "replace")[:1024]
        else:
            await part.release()
    return data, fields


async def parse_detect_request(request: web.Request) -> tuple[bytes, DetectOptions]:
    """Image bytes and options from any of the accepted request forms."""
    state = _state(request)
    limit = state.serve.max_body_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"request body is larger than {state.serve.max_body_mb:g} MB")
    ctype = request.content_type.lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        body = await request.read()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None
        if isinstance(payload, str):  # the seed's form: the body is just the URL
            payload = {"image": payload}
        if not isinstance(payload, dict):
            raise ApiError(400, "bad_request", "the JSON body must be an object with an 'image' field (or a string)")
        unknown = sorted(set(payload) - _OPTION_KEYS)
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s): {', '.join(unknown)}")
        image = payload.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ApiError(400, "bad_request", "'image' must be a non-empty string (URL, data: URI or base64)")
        opts = parse_options(state, payload)
        return await resolve_image_source(state, image), opts
    if ctype == "multipart/form-data":
        try:
            data, fields = await _read_multipart(state, request)
        except (AssertionError, AttributeError, ValueError, KeyError, UnicodeError, HttpProcessingError):
            raise ApiError(400, "bad_request", "malformed multipart body") from None
        opts = parse_options(state, fields)
        if data is None:
            if not fields.get("image"):
                raise ApiError(400, "bad_request", "the multipart body has no 'image' part")
            data = await resolve_image_source(state, fields["image"])
        return data, opts
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await request.read()
        opts = parse_options(state, {k: v for k, v in request.query.items() if k in _OPTION_KEYS and k != "image"})
        return data, opts
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {ctype or '(none)'} is not accepted; send application/json, "
                   f"multipart/form-data or image/*")


async def _inspect(state: ServeState, data: bytes) -> ImageInput:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, inspect_image, data, state.serve.max_pixels)


async def _predict(batcher: MicroBatcher, img: ImageInput, ticket: Any = None) -> RawOutput:
    from openimages_od.serving.model import ImageError

    try:
        return await batcher.submit(img.data, ticket)
    except (BatcherClosed, ApiError):
        raise
    except Exception as exc:  # noqa: BLE001 - the model could not read this image
        name = type(exc).__name__
        if name in ("InvalidArgumentError", "UnknownError"):
            raise ImageError(400, "bad_image", "the model could not decode the image") from None
        raise


# --------------------------------------------------------------------------- handlers


async def handle_detect(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    model, batcher = _require_ready(state)
    with batcher.ticket() as ticket:  # tells the batcher this request is on its way
        data, opts = await parse_detect_request(request)
        t0 = time.perf_counter()
        img = await _inspect(state, data)
        raw = await _predict(batcher, img, ticket)
    dets = to_detections(raw, model.labels, img.width, img.height, opts.min_score, opts.max_detections)
    body: dict[str, Any] = {
        "width": img.width, "height": img.height, "num_detections": len(dets),
        "detections": [d.to_json() for d in dets], "model": model.describe(),
    }
    if opts.draw or opts.output:
        from openimages_od.serving.draw import draw_detections

        loop = asyncio.get_running_loop()
        annotated = await loop.run_in_executor(None, draw_detections, img.data, dets, opts.format)
        mime = "image/png" if opts.format == "png" else "image/jpeg"
        if opts.output:
            try:
                await loop.run_in_executor(None, state.storage.write_bytes, opts.output, annotated)
            except OSError as exc:
                log.error("cannot store annotated image at %s: %s", opts.output, exc)
                raise ApiError(500, "output_failed", "could not store the annotated image") from None
            body["output"] = opts.output
        if opts.draw:
            accept = request.headers.get("Accept", "")
            if "image/" in accept and "application/json" not in accept:
                return web.Response(body=annotated, content_type=mime,
                                    headers={"X-Num-Detections": str(len(dets))})
            body["image"] = base64.b64encode(annotated).decode()
            body["image_format"] = mime
    body["timing_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return web.json_response(body)


def _model_for(state: ServeState, name: str) -> ExportedModel:
    model, _ = _require_ready(state)
    if name not in (model.name, "default"):
        raise ApiError(404, "model_not_found", f"no model named {name!r} (this server serves {model.name!r})")
    return model


async def handle_tfs_predict(request: web.Request) -> web.StreamResponse:
    """TF Serving REST ``:predict`` (row format ``instances`` or columnar ``inputs``)."""
    state = _state(request)
    _model_for(state, request.match_info["name"])
    _, batcher = _require_ready(state)
    if request.content_type.lower() not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "send application/json")
    try:
        payload = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_request", "expected {\"instances\": [...]}")
    sig = payload.get("signature_name", "serving_default")
    if sig != "serving_default":
        raise ApiError(400, "bad_request", "only signature_name 'serving_default' (image_bytes) is served over REST")
    if "instances" in payload:
        items = payload["instances"]
    elif "inputs" in payload:
        inputs = payload["inputs"]
        items = inputs.get("image_bytes") if isinstance(inputs, dict) else inputs
    else:
        raise ApiError(400, "bad_request", "expected 'instances' (or 'inputs')")
    if not isinstance(items, list) or not items:
        raise ApiError(400, "bad_request", "'instances' must be a non-empty list")
    if len(items) > state.serve.max_instances:
        raise ApiError(400, "bad_request", f"at most {state.serve.max_instances} instances per request")
    blobs = []
    for i, inst in enumerate(items):
        if isinstance(inst, dict) and "image_bytes" in inst:
            inst = inst["image_bytes"]
        if not (isinstance(inst, dict) and isinstance(inst.get("b64"), str)):
            raise ApiError(400, "bad_request",
                           f"instance {i}: expected {{\"b64\": ...}} or {{\"image_bytes\": {{\"b64\": ...}}}}")
        blobs.append(decode_base64(inst["b64"], f"instance {i}"))
    tickets = [batcher.ticket() for _ in blobs]
    try:
        imgs = [await _inspect(state, b) for b in blobs]
        raws = await asyncio.gather(*(_predict(batcher, im, t) for im, t in zip(imgs, tickets)))
    finally:
        for t in tickets:
            t.close()
    return web.json_response({"predictions": [r.to_tf_serving() for r in raws]})


async def handle_tfs_status(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    model = _model_for(state, request.match_info["name"])
    return web.json_response({"model_version_status": [{
        "version": str(model.info.get("step", 1)), "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]})


async def handle_healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    if state.ready:
        assert state.model is not None
        return web.json_response({"status": "ready", "model": state.model.describe()})
    reason = "shutting down" if state.shutting_down else "model not loaded"
    return error_response(503, "not_ready", reason)


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    body, ctype = _state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def handle_openapi(request: web.Request) -> web.StreamResponse:
    from openimages_od.serving.openapi import openapi_document

    state = _state(request)
    return web.json_response(openapi_document(state.model.name if state.model else "oiod",
                                              auth=state.token is not None))


async def handle_index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- app


def create_app(cfg: Config, model: Optional[ExportedModel] = None, *, resolver: Optional[AbstractResolver] = None,
               storage: Any = None) -> web.Application:
    """Build the service.

    Args:
        cfg: the configuration (``serve`` section, ``output.s3`` for s3 access).
        model: an already loaded model (tests, ``detect``); None loads ``cfg.serve_model`` at start-up.
        resolver: DNS resolver the SSRF guard wraps (tests inject one); None = the system resolver.
        storage: storage layer for s3 model/image/output access; None = ``Storage.from_config(cfg)``.

    Returns:
        The application; its ``cleanup_ctx`` loads the model and starts the batcher.

    Raises:
        ConfigError: ``serve.auth_token_env`` names an unset variable, or ``allow_networks`` is invalid.
    """
    from openimages_od.storage import Storage

    sc = cfg.serve
    token: Optional[str] = None
    if sc.auth_token_env:
        token = os.environ.get(sc.auth_token_env) or None
        if token is None:
            raise ConfigError(f"serve.auth_token_env names {sc.auth_token_env}, which is not set or empty; "
                              f"set it or remove serve.auth_token_env to run without auth")
    state = ServeState(cfg=cfg, metrics=Metrics(), model_url=cfg.serve_model, token=token,
                       storage=storage or Storage.from_config(cfg))
    app = web.Application(client_max_size=int(sc.max_body_mb * 1024 * 1024),
                          middlewares=[metrics_middleware, error_middleware, auth_middleware])
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
        st.batcher = MicroBatcher(m.predict, max_batch=max_batch, max_wait_ms=wait,
                                  on_batch=st.metrics.observe_batch)
        await st.batcher.start()
        st.fetcher = SafeFetcher(AddressPolicy(sc.allow_networks), max_bytes=int(sc.max_body_mb * 1024 * 1024),
                                 timeout_s=sc.fetch_timeout_s, max_redirects=sc.max_redirects,
                                 base_resolver=resolver, storage=st.storage)
        st.metrics.model_loaded.set(1)
        yield
        st.shutting_down = True
        st.metrics.model_loaded.set(0)
        await st.batcher.close()  # finishes queued work first
        await st.fetcher.close()
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
    r.add_static("/static/", STATIC_DIR, show_index=False)
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


def run_serve(cfg: Config) -> int:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain in-flight requests and exit.

    Args:
        cfg: configuration; ``serve.model`` (or ``export.dir``) names the exported model.

    Returns:
        0 after a clean shutdown.
    """
    from openimages_od.config import save_resolved

    sc = cfg.serve
    app = create_app(cfg)
    if sc.output_dir:
        save_resolved(cfg, normalize_root(sc.output_dir), app[STATE].storage)
    _setup_access_log(sc.access_log)
    log.warning("oiod serve: model %s on http://%s:%d", cfg.serve_model, sc.host, sc.port)
    try:
        web.run_app(app, host=sc.host, port=sc.port, access_log=access_log, access_log_class=JsonAccessLogger,
                    shutdown_timeout=sc.shutdown_timeout_s, handle_signals=True, print=None)
    except OSError as exc:
        if exc.errno is not None and "address" in str(exc).lower():
            raise OiodError(f"cannot listen on {sc.host}:{sc.port}: {exc.strerror or exc}") from None
        raise
    return 0
