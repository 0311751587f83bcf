"""Parsing ``/v1/detect`` and ``:predict`` requests: bounded, linear-time, every failure a 4xx.

Rules this module keeps (they are what stops one request from freezing the
service, see issue #12):

* sizes are checked before anything is parsed: ``Content-Length`` first, then
  the bytes actually read (aiohttp's ``client_max_size`` and our own counters);
* a body must arrive within ``serve.body_timeout_s`` (408 otherwise);
* no regular expression ever runs over request data of unbounded length, and
  every step is linear in the input: base64 is validated by ``bytes.translate``
  and ``binascii`` in strict mode, JSON by the C decoder with integers and
  floats bounded in length (no 5,000-digit integers) and no NaN/Infinity;
* large JSON bodies (and their base64) are decoded on the ``image`` pool, in
  slices, so the event loop keeps answering while a 20 MB body is decoded;
* anything a client can send that the code does not expect (deep nesting,
  wrong types, bad UTF-8) ends as ``ApiError`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from openimages_od.config import join_url, normalize_root
from openimages_od.serving.errors import ApiError
from openimages_od.serving.state import STATE, ServeState

__all__ = [
    "MAX_DETECTIONS_LIMIT",
    "DetectOptions",
    "decode_base64",
    "loads_json",
    "parse_detect_request",
    "parse_options",
    "read_body",
    "read_json",
    "resolve_image_source",
]

MAX_DETECTIONS_LIMIT = 1000
MAX_URL_CHARS = 8192
OPTION_KEYS = frozenset({"image", "min_score", "max_detections", "draw", "format", "output"})
# Bodies up to this size are parsed inline (microseconds); larger ones on the image pool.
INLINE_PARSE_BYTES = 256 * 1024
_B64_SLICE = 1 << 20  # decode in 1 MiB slices (a multiple of 4) so other threads get the GIL in between
_WHITESPACE = b" \t\r\n\f\v"
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_MAX_NUMBER_CHARS = 40
_OUTPUT_EXTENSIONS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
_OUTPUT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


# --------------------------------------------------------------------------- primitives


def _bounded_int(s: str) -> int:
    if len(s) > _MAX_NUMBER_CHARS:
        raise ValueError("integer too long")
    return int(s)


def _bounded_float(s: str) -> float:
    if len(s) > _MAX_NUMBER_CHARS:
        raise ValueError("number too long")
    v = float(s)
    if not math.isfinite(v):
        raise ValueError("number out of range")
    return v


def _no_constant(s: str) -> Any:
    raise ValueError(f"{s} is not JSON")


def loads_json(body: bytes) -> Any:
    """``json.loads`` that answers 400 for anything malformed, too deep or with oversized numbers."""
    try:
        return json.loads(
            body, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_no_constant
        )
    except RecursionError:
        raise ApiError(400, "bad_json", "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError, so are our number checks
        raise ApiError(
            400,
            "bad_json",
            f"the body is not valid JSON (or has a number longer than {_MAX_NUMBER_CHARS} characters)",
        ) from None


def decode_base64(s: str, what: str = "image", max_bytes: int | None = None) -> bytes:
    """Standard or URL-safe base64 (whitespace anywhere, padding optional) in linear time.

    Raises:
        ApiError: 400 when ``s`` is not base64, 413 when it decodes to more than ``max_bytes``.
    """
    try:
        raw = s.encode("ascii")
    except UnicodeEncodeError:
        raise ApiError(
            400, "bad_image", f"{what} is neither an http(s)/s3 URL, a data: URI nor base64"
        ) from None
    raw = raw.translate(_URLSAFE_TO_STD, _WHITESPACE)
    if max_bytes is not None and len(raw) // 4 * 3 > max_bytes:
        raise ApiError(413, "image_too_large", f"{what} is larger than {max_bytes} bytes")
    body = raw.rstrip(b"=")
    if not body or len(raw) - len(body) > 2 or len(body) % 4 == 1:
        raise ApiError(400, "bad_image", f"{what} is neither an http(s)/s3 URL, a data: URI nor base64")
    body += b"=" * (-len(body) % 4)
    try:
        return b"".join(
            binascii.a2b_base64(body[i : i + _B64_SLICE], strict_mode=True)
            for i in range(0, len(body), _B64_SLICE)
        )
    except (binascii.Error, ValueError):
        raise ApiError(
            400, "bad_image", f"{what} is neither an http(s)/s3 URL, a data: URI nor base64"
        ) from None


def _scheme(s: str) -> str:
    """The URL scheme of ``s`` in lower case ('' when it does not start like ``scheme://``)."""
    head, sep, _ = s[:40].partition("://")
    if sep and head[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in head):
        return head.lower()
    return ""


def decode_inline_image(s: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:`` URI or bare base64 string (URLs are for :func:`resolve_image_source`)."""
    if s[:5].lower() == "data:":
        header, sep, payload = s.partition(",")
        if not sep or len(header) > 200 or ";base64" not in header.lower():
            raise ApiError(400, "bad_image", "data: URIs must be base64 (data:image/png;base64,...)")
        mime = header[5:].split(";")[0].strip().lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise ApiError(415, "unsupported_media_type", f"data: URI type {mime[:60]!r} is not an image")
        return decode_base64(payload, max_bytes=max_bytes)
    return decode_base64(s, max_bytes=max_bytes)


async def resolve_image_source(state: ServeState, source: str) -> bytes:
    """Bytes for an ``image`` string: http(s) URL (guarded fetch), s3/gs URL (allowed prefixes only),
    data: URI or base64."""
    s = source.strip()
    scheme = _scheme(s)
    if scheme and len(s) > MAX_URL_CHARS:  # before any URL parsing
        raise ApiError(400, "bad_url", f"image URLs are at most {MAX_URL_CHARS} characters")
    if scheme in ("http", "https"):
        assert state.fetcher is not None
        data, _ = await state.fetcher.fetch(s)
    elif scheme in ("s3", "gs"):
        assert state.s3 is not None
        data = await state.s3.fetch(s)
    elif scheme:
        raise ApiError(
            400, "unsupported_scheme", "only http, https and (where enabled) s3 and gs URLs may be fetched"
        )
    elif len(s) > INLINE_PARSE_BYTES:
        data = await state.pools.image.run(decode_inline_image, s, state.max_body_bytes)
    else:
        data = decode_inline_image(s, state.max_body_bytes)
    if len(data) > state.max_body_bytes:
        raise ApiError(413, "image_too_large", f"image is larger than {state.serve.max_body_mb:g} MB")
    return data


# --------------------------------------------------------------------------- options


@dataclass
class DetectOptions:
    min_score: float
    max_detections: int
    draw: bool = False
    format: str = "jpeg"
    output: str | None = None


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
            if isinstance(v, bool) or (isinstance(v, str) and len(v) > _MAX_NUMBER_CHARS):
                raise ValueError
            opts.min_score = float(v)
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, "bad_request", "min_score must be a number between 0 and 1") from None
        if not 0.0 <= opts.min_score <= 1.0:
            raise ApiError(400, "bad_request", "min_score must be between 0 and 1")
    if raw.get("max_detections") is not None:
        v = raw["max_detections"]
        try:
            if (
                isinstance(v, bool)
                or (isinstance(v, float) and not v.is_integer())
                or (isinstance(v, str) and len(v) > _MAX_NUMBER_CHARS)
            ):
                raise ValueError
            opts.max_detections = int(v)
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, "bad_request", "max_detections must be an integer") from None
        if not 1 <= opts.max_detections <= MAX_DETECTIONS_LIMIT:
            raise ApiError(400, "bad_request", f"max_detections must be between 1 and {MAX_DETECTIONS_LIMIT}")
    if raw.get("draw") is not None:
        opts.draw = _parse_bool(raw["draw"], "draw")
    if raw.get("format") is not None:
        fmt = raw["format"].lower() if isinstance(raw["format"], str) else None
        if fmt not in ("jpeg", "png"):
            raise ApiError(400, "bad_request", "format must be jpeg or png")
        opts.format = fmt
    if raw.get("output") is not None:
        if not isinstance(raw["output"], str) or not raw["output"].strip():
            raise ApiError(400, "bad_request", "output must be a non-empty string")
        opts.output, ext_format = output_url(state, raw["output"].strip())
        if raw.get("format") is None:
            opts.format = ext_format
        elif opts.format != ext_format:
            raise ApiError(400, "bad_request", f"output's extension does not match format {opts.format}")
    return opts


def output_url(state: ServeState, output: str) -> tuple[str, str]:
    """Where ``output`` may be written, and the image format its extension names.

    Only relative names under ``serve.output_dir`` made of ``[A-Za-z0-9_.-]`` segments that do not
    start with a dot, at most 8 deep, ending in ``.jpg``, ``.jpeg`` or ``.png``: the server's own
    files there (``config.resolved.yaml``, temporary files, which start with a dot) can never be named.
    """
    out_dir = state.serve.output_dir
    if not out_dir:
        raise ApiError(
            400, "output_not_allowed", "this server does not store images (serve.output_dir is not set)"
        )
    root = normalize_root(out_dir)
    rel = output
    if len(rel) > 512:
        raise ApiError(400, "output_not_allowed", "output names are at most 512 characters")
    if _scheme(output):
        if not output.startswith(root + "/"):
            raise ApiError(
                400, "output_not_allowed", "output must be a name under the server's output directory"
            )
        rel = output[len(root) + 1 :]
    parts = rel.split("/")
    if len(parts) > 8 or any(not p or p[0] == "." or not set(p) <= _OUTPUT_CHARS for p in parts):
        raise ApiError(
            400,
            "output_not_allowed",
            "output must be a relative name like 'results/img1.jpg' "
            "(letters, digits, '_', '-', '.'; no part starting with '.')",
        )
    dot = parts[-1].rfind(".")
    fmt = _OUTPUT_EXTENSIONS.get(parts[-1][dot:].lower()) if dot > 0 else None
    if fmt is None:
        raise ApiError(400, "output_not_allowed", "output must end in .jpg, .jpeg or .png")
    return join_url(root, rel), fmt


# --------------------------------------------------------------------------- bodies


async def read_body(state: ServeState, request: web.Request) -> bytes:
    """The whole body, within ``max_body_mb`` (413) and ``body_timeout_s`` (408)."""
    if request.content_length is not None and request.content_length > state.max_body_bytes:
        raise ApiError(
            413, "payload_too_large", f"request body is larger than {state.serve.max_body_mb:g} MB"
        )
    try:
        async with asyncio.timeout(state.serve.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"the request body did not arrive within {state.serve.body_timeout_s:g}s"
        ) from None


async def read_json(state: ServeState, request: web.Request) -> Any:
    """The body parsed as JSON (on the image pool when it is large)."""
    body = await read_body(state, request)
    if len(body) > INLINE_PARSE_BYTES:
        return await state.pools.image.run(loads_json, body)
    return loads_json(body)


async def _read_limited(state: ServeState, part: Any, limit: int) -> bytes:
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


async def _read_multipart(state: ServeState, request: web.Request) -> tuple[bytes | None, dict[str, Any]]:
    """The uploaded ``image`` part (bytes) or its text, and the option fields."""
    reader = await request.multipart()
    fields: dict[str, Any] = {}
    data: bytes | None = None
    limit = state.max_body_bytes
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            # A nested multipart body is no field of this API: skipped, as unknown fields are.
            # (aiohttp types the item Optional, but iteration stops before a None.)
            if part is not None:
                await part.release()
            continue
        name = part.name
        if name == "image":
            ctype = part.headers.get("Content-Type", "").lower()
            if part.filename or ctype.startswith(("image/", "application/octet")):
                data = await _read_limited(state, part, limit)
            else:
                fields["image"] = (await _read_limited(state, part, limit)).decode("utf-8", "replace")
        elif name in OPTION_KEYS:
            fields[name] = (await _read_limited(state, part, 4096)).decode("utf-8", "replace")[:1024]
        else:
            await part.release()
    return data, fields


async def parse_detect_request(request: web.Request) -> tuple[bytes, DetectOptions]:
    """Image bytes and options from any of the accepted request forms."""
    state = request.app[STATE]
    if request.content_length is not None and request.content_length > state.max_body_bytes:
        raise ApiError(
            413, "payload_too_large", f"request body is larger than {state.serve.max_body_mb:g} MB"
        )
    ctype = request.content_type.lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        payload = await read_json(state, request)
        if isinstance(payload, str):  # the seed's form: the body is just the URL
            payload = {"image": payload}
        if not isinstance(payload, dict):
            raise ApiError(
                400, "bad_request", "the JSON body must be an object with an 'image' field (or a string)"
            )
        unknown = sorted(set(payload) - OPTION_KEYS)
        if unknown:
            shown = ", ".join(k[:40] for k in unknown[:5])
            raise ApiError(400, "bad_request", f"unknown field(s): {shown}")
        image = payload.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ApiError(
                400, "bad_request", "'image' must be a non-empty string (URL, data: URI or base64)"
            )
        opts = parse_options(state, payload)
        return await resolve_image_source(state, image), opts
    if ctype == "multipart/form-data":
        try:
            async with asyncio.timeout(state.serve.body_timeout_s):
                data, fields = await _read_multipart(state, request)
        except TimeoutError:
            raise ApiError(
                408,
                "request_timeout",
                f"the request body did not arrive within {state.serve.body_timeout_s:g}s",
            ) from None
        except (AssertionError, AttributeError, ValueError, KeyError, UnicodeError, HttpProcessingError):
            raise ApiError(400, "bad_request", "malformed multipart body") from None
        opts = parse_options(state, fields)
        if data is None:
            if not fields.get("image"):
                raise ApiError(400, "bad_request", "the multipart body has no 'image' part")
            data = await resolve_image_source(state, fields["image"])
        return data, opts
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await read_body(state, request)
        opts = parse_options(
            state, {k: v for k, v in request.query.items() if k in OPTION_KEYS and k != "image"}
        )
        return data, opts
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {ctype[:80] or '(none)'} is not accepted; send application/json, "
        f"multipart/form-data or image/*",
    )
