"""TF Serving's REST shape: ``POST /v1/models/{name}:predict`` and ``GET /v1/models/{name}``."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from openimages_od.serving.errors import ApiError
from openimages_od.serving.model import ExportedModel
from openimages_od.serving.request import decode_base64, read_json
from openimages_od.serving.state import STATE, ServeState

__all__ = ["handle_tfs_predict", "handle_tfs_status"]


def _model_for(state: ServeState, name: str) -> ExportedModel:
    model, _ = state.require_ready()
    if name not in (model.name, "default"):
        raise ApiError(
            404, "model_not_found", f"no model named {name[:80]!r} (this server serves {model.name!r})"
        )
    return model


def _instances(payload: Any, max_instances: int) -> list[Any]:
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_request", 'expected {"instances": [...]}')
    sig = payload.get("signature_name", "serving_default")
    if sig != "serving_default":
        raise ApiError(
            400, "bad_request", "only signature_name 'serving_default' (image_bytes) is served over REST"
        )
    if "instances" in payload:
        items = payload["instances"]
    elif "inputs" in payload:
        inputs = payload["inputs"]
        items = inputs.get("image_bytes") if isinstance(inputs, dict) else inputs
    else:
        raise ApiError(400, "bad_request", "expected 'instances' (or 'inputs')")
    if not isinstance(items, list) or not items:
        raise ApiError(400, "bad_request", "'instances' must be a non-empty list")
    if len(items) > max_instances:
        raise ApiError(400, "bad_request", f"at most {max_instances} instances per request")
    return items


def _decode_instances(items: list[Any], max_bytes: int) -> list[bytes]:
    blobs = []
    for i, inst in enumerate(items):
        if isinstance(inst, dict) and "image_bytes" in inst:
            inst = inst["image_bytes"]
        if not (isinstance(inst, dict) and isinstance(inst.get("b64"), str)):
            raise ApiError(
                400,
                "bad_request",
                f'instance {i}: expected {{"b64": ...}} or {{"image_bytes": {{"b64": ...}}}}',
            )
        blobs.append(decode_base64(inst["b64"], f"instance {i}", max_bytes=max_bytes))
    return blobs


async def handle_tfs_predict(request: web.Request) -> web.StreamResponse:
    """TF Serving REST ``:predict`` (row format ``instances`` or columnar ``inputs``)."""
    state = request.app[STATE]
    _model_for(state, request.match_info["name"])
    _, batcher = state.require_ready()
    if request.content_type.lower() not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "send application/json")
    items = _instances(await read_json(state, request), state.serve.max_instances)
    blobs = await state.pools.image.run(_decode_instances, items, state.max_body_bytes)
    tickets = [batcher.ticket() for _ in blobs]
    try:
        imgs = [await state.inspect(b) for b in blobs]
        raws = await asyncio.gather(*(state.predict(batcher, im, t) for im, t in zip(imgs, tickets)))
    finally:
        for t in tickets:
            t.close()
    return web.json_response({"predictions": [r.to_tf_serving() for r in raws]})


async def handle_tfs_status(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    model = _model_for(state, request.match_info["name"])
    return web.json_response(
        {
            "model_version_status": [
                {
                    "version": str(model.info.get("step", 1)),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }
    )
