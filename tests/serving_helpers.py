"""Test/benchmark helpers for the serving area: a tiny REAL exported model and images.

:func:`make_export` writes an export directory with exactly the contract the
service expects from ``oiod export`` (``saved_model/`` with the
``serving_default`` (``image_bytes``) and ``serving_images`` (``images``)
signatures, ``label_map.pbtxt``, ``model.json``). The model is a deterministic
colour-blob "detector" built from real TF ops: for each of three classes it
finds the pixels that are strongly red, green or blue and returns their
bounding box, so tests can assert on boxes and on what gets drawn. A few
convolutions on a resized copy stand in for a backbone so a call costs
something (and batching has something to amortise).

``make_export(kind="retinanet")`` instead exports an untrained tiny RetinaNet
with the real exporter (``openimages_od.training.export.export_saved_model``),
to check the service against the real signatures.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from openimages_od.openimages.labelmap import LabelMap

# class id -> (mid, name, channel, score); real Open Images MIDs.
BLOB_CLASSES = [
    (1, "/m/0k4j", "Car", 0, 0.95),  # red
    (2, "/m/01g317", "Person", 1, 0.85),  # green
    (3, "/m/0bt9lr", "Dog", 2, 0.75),  # blue
]
RED, GREEN, BLUE = (230, 20, 20), (20, 200, 20), (20, 20, 230)


def _build_module(work_filters: int = 16, work_size: int = 160):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    k1 = tf.constant(rng.normal(0, 0.1, (3, 3, 3, work_filters)).astype("float32"))
    k2 = tf.constant(rng.normal(0, 0.1, (3, 3, work_filters, work_filters)).astype("float32"))
    scores_c = tf.constant([c[4] for c in BLOB_CLASSES], tf.float32)
    ids_c = tf.constant([c[0] for c in BLOB_CLASSES], tf.int32)
    chans = [c[3] for c in BLOB_CLASSES]

    def detect_one(img: tf.Tensor) -> tuple:
        img = tf.cast(img, tf.int32)
        h = tf.shape(img)[0]
        w = tf.shape(img)[1]
        boxes, present = [], []
        for ch in chans:
            others = [c for c in range(3) if c != ch]
            mask = (img[..., ch] > 150) & (img[..., others[0]] < 100) & (img[..., others[1]] < 100)
            rows = tf.reduce_any(mask, axis=1)
            cols = tf.reduce_any(mask, axis=0)
            any_ = tf.reduce_any(rows)
            y0 = tf.argmax(tf.cast(rows, tf.int32), output_type=tf.int32)
            y1 = h - tf.argmax(tf.cast(tf.reverse(rows, [0]), tf.int32), output_type=tf.int32)
            x0 = tf.argmax(tf.cast(cols, tf.int32), output_type=tf.int32)
            x1 = w - tf.argmax(tf.cast(tf.reverse(cols, [0]), tf.int32), output_type=tf.int32)
            hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
            box = tf.stack(
                [
                    tf.cast(y0, tf.float32) / hf,
                    tf.cast(x0, tf.float32) / wf,
                    tf.cast(y1, tf.float32) / hf,
                    tf.cast(x1, tf.float32) / wf,
                ]
            )
            boxes.append(tf.where(any_, box, tf.zeros(4)))
            present.append(any_)
        boxes = tf.stack(boxes)
        present = tf.stack(present)
        # Present detections first (classes are already in score order).
        order = tf.argsort(tf.cast(present, tf.int32), direction="DESCENDING", stable=True)
        scores = tf.where(present, scores_c, 0.0)
        n = tf.reduce_sum(tf.cast(present, tf.int32))
        return (tf.gather(boxes, order), tf.gather(ids_c, order), tf.gather(scores, order), n)

    def backbone(imgs: tf.Tensor) -> tf.Tensor:
        x = tf.image.resize(tf.cast(imgs, tf.float32) / 255.0, (work_size, work_size))
        x = tf.nn.relu(tf.nn.conv2d(x, k1, 2, "SAME"))
        x = tf.nn.relu(tf.nn.conv2d(x, k2, 2, "SAME"))
        return tf.reduce_mean(x, axis=[1, 2, 3])  # [B]

    sig = (
        tf.TensorSpec([3, 4], tf.float32),
        tf.TensorSpec([3], tf.int32),
        tf.TensorSpec([3], tf.float32),
        tf.TensorSpec([], tf.int32),
    )

    class BlobDetector(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def serving_images(self, images: tf.Tensor) -> dict:
            b, c, s, n = tf.map_fn(detect_one, images, fn_output_signature=sig)
            # The "backbone" feeds the scores with weight 0 so it is not pruned as dead code.
            s = s + 0.0 * backbone(images)[:, None]
            return {"detection_boxes": b, "detection_classes": c, "detection_scores": s, "num_detections": n}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serving_bytes(self, image_bytes: tf.Tensor) -> dict:
            def one(data: tf.Tensor) -> tuple:
                img = tf.io.decode_image(data, channels=3, expand_animations=False)
                img.set_shape([None, None, 3])
                b, c, s, n = detect_one(img)
                s = s + 0.0 * backbone(img[None])[0]
                return b, c, s, n

            b, c, s, n = tf.map_fn(one, image_bytes, fn_output_signature=sig)
            return {"detection_boxes": b, "detection_classes": c, "detection_scores": s, "num_detections": n}

    return BlobDetector()


def make_export(dest: str | Path, kind: str = "blobs") -> Path:
    """Write a tiny exported model to ``dest`` (created) and return it.

    Args:
        dest: directory to create.
        kind: ``"blobs"`` (the colour-blob detector above).
    """
    import tensorflow as tf

    if kind == "retinanet":
        # The real exporter (training engineer's), untrained tiny RetinaNet: same contract.
        from openimages_od.config import load_config
        from openimages_od.training.export import export_saved_model

        cfg = load_config(
            None,
            [
                "train.input_size=128",
                "train.backbone=mobilenetv2",
                "train.fpn_filters=16",
                "train.head_num_filters=16",
                "train.head_num_convs=1",
            ],
        )
        lm = LabelMap.from_mids([c[1] for c in BLOB_CLASSES], {c[1]: c[2] for c in BLOB_CLASSES})
        return export_saved_model(cfg, lm, dest, checkpoint=None, step=0)
    if kind != "blobs":
        raise ValueError(f"unknown test model kind {kind!r}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    module = _build_module()
    tf.saved_model.save(
        module,
        str(dest / "saved_model"),
        signatures={"serving_default": module.serving_bytes, "serving_images": module.serving_images},
    )
    lm = LabelMap.from_mids([c[1] for c in BLOB_CLASSES], {c[1]: c[2] for c in BLOB_CLASSES})
    (dest / "label_map.pbtxt").write_text(lm.to_pbtxt())
    (dest / "model.json").write_text(
        json.dumps(
            {
                "name": "oiod",
                "classes": lm.to_json(),
                "input_size": 160,
                "backbone": "blob-detector",
                "config_digest": "test",
                "step": 0,
                "signatures": ["serving_default", "serving_images"],
            },
            indent=2,
        )
    )
    return dest


def blob_image(
    size: tuple[int, int] = (320, 240),
    blobs: dict | None = None,
    fmt: str = "PNG",
    background: tuple[int, int, int] = (128, 128, 128),
) -> bytes:
    """An image with solid coloured rectangles; ``blobs`` maps colour -> (x0, y0, x1, y1) exclusive.

    The default has a red blob at (40, 30)-(120, 100) and a blue one at (200, 120)-(300, 220).
    """
    blobs = blobs if blobs is not None else {RED: (40, 30, 120, 100), BLUE: (200, 120, 300, 220)}
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = background
    for color, (x0, y0, x1, y1) in blobs.items():
        arr[y0:y1, x0:x1] = color
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def huge_png(width: int = 10000, height: int = 10000) -> bytes:
    """A valid solid-colour RGB PNG of ``width`` x ``height`` that compresses to a few hundred KB."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\x10\x80\xf0" * width
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


class ServiceThread:
    """The real service (``create_app``) on a free loopback port in a background thread.

    Served the way ``oiod serve`` serves it (the guarded site: connection limit, JSON errors for
    malformed HTTP). For clients that are not asyncio (schemathesis, Selenium, raw sockets). Use as
    a context manager; ``url(path)`` gives full URLs, ``app`` the application.
    """

    def __init__(self, cfg, model=None, resolver=None, storage=None, max_connections=None) -> None:
        from openimages_od.devservices import free_port

        self.cfg = cfg
        self.model = model
        self.resolver = resolver
        self.storage = storage
        self.max_connections = max_connections or cfg.serve.max_connections
        self.port = free_port()
        self.app = None
        self._loop = None
        self._thread = None
        self._stop = None
        self._error: BaseException | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self) -> ServiceThread:
        import asyncio
        import threading

        from openimages_od.serving.app import connection_events, create_app, make_runner
        from openimages_od.serving.server import ConnectionGuard, GuardedSite

        ready = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                self.app = create_app(self.cfg, self.model, resolver=self.resolver, storage=self.storage)
                runner = make_runner(self.app, access=False)
                await runner.setup()
                guard = ConnectionGuard(self.max_connections, connection_events(self.app[STATE_KEY()]))
                await GuardedSite(runner, "127.0.0.1", self.port, guard).start()
            except BaseException as exc:
                self._error = exc
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(main())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="oiod-serve-test")
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("service did not start")
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop and self._thread and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)


def STATE_KEY():
    from openimages_od.serving.state import STATE

    return STATE


class FakeS3:
    """A tiny path-style S3 GET endpoint on loopback with scripted faults (for the serving tests).

    ``objects[(bucket, key)]`` is served with 200; ``denied`` keys answer 403 (like S3 without
    read permission), unknown keys 404. Keys starting with ``stall/`` answer 200 with a large
    ``Content-Length`` and then drip one byte every 0.2 s for as long as the client stays
    connected: ``stall_ended`` records, per request, how many seconds the client kept the
    connection; a PUT there never gets an answer (``put_stall_ended`` likewise). ``methods`` counts
    request methods (the service must never HEAD).
    """

    def __init__(self) -> None:
        import collections

        from openimages_od.devservices import free_port

        self.port = free_port()
        self.objects: dict[tuple[str, str], bytes] = {}
        self.denied: set[tuple[str, str]] = set()
        self.methods: collections.Counter[str] = collections.Counter()
        self.stall_ended: list[float] = []
        self.put_stall_ended: list[float] = []
        self._loop = None
        self._thread = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request):
        import asyncio
        import time

        from aiohttp import web

        self.methods[request.method] += 1
        bucket, _, key = request.path.lstrip("/").partition("/")
        if key.startswith("stall/") and request.method == "PUT":  # a write that never gets an answer
            t0 = time.monotonic()
            try:
                await asyncio.sleep(60)
            finally:
                self.put_stall_ended.append(time.monotonic() - t0)
            return web.Response(status=200)
        if key.startswith("stall/"):
            resp = web.StreamResponse(
                status=200, headers={"Content-Type": "image/png", "Content-Length": "100000"}
            )
            await resp.prepare(request)
            t0 = time.monotonic()
            try:
                for _ in range(1000):
                    await resp.write(b"\0")
                    await asyncio.sleep(0.2)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                self.stall_ended.append(time.monotonic() - t0)
            return resp
        if (bucket, key) in self.denied:
            return web.Response(
                status=403, body=b"<Error><Code>AccessDenied</Code></Error>", content_type="application/xml"
            )
        body = self.objects.get((bucket, key))
        if body is None:
            return web.Response(
                status=404, body=b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml"
            )
        return web.Response(body=body, content_type="image/png")

    def __enter__(self) -> FakeS3:
        import asyncio
        import threading

        from aiohttp import web

        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            # handler_cancellation: a client that hangs up stops the dripping handler at once.
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-s3")
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError("fake S3 did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
