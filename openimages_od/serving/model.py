"""Loading the exported model once and running it; shared by ``oiod serve`` and ``oiod detect``.

The export directory (local path, ``file://``, ``s3://`` or ``gs://``; remote ones are copied to a
local temp dir first because TensorFlow here has no s3 filesystem) holds
``saved_model/``, ``label_map.pbtxt`` and ``model.json``. TensorFlow is
imported only inside :meth:`ExportedModel.load`, so importing this module (and
the CLI) stays cheap.

Batching goes through the ``serving_default`` signature (``image_bytes``, a
``[B]`` string tensor): each image is decoded in the graph at its own size, so
boxes come back normalised to that image with no padding bookkeeping, and
there is no Python-side decode. Measured on the tiny test model this is as
fast per image as decoding and padding to the uint8 signature and it is
correct for mixed sizes by construction.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openimages_od.errors import DataError, OiodError
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.serving.errors import ApiError

log = logging.getLogger(__name__)

__all__ = ["Detection", "ExportedModel", "ImageError", "ImageInput", "inspect_image", "to_detections"]


class ImageError(ApiError):
    """An input image is unusable; ``status`` is the HTTP status the service answers with."""


@dataclass
class ImageInput:
    """Encoded image bytes (JPEG or PNG) ready for the model, with their size."""

    data: bytes
    width: int
    height: int
    format: str


_MODEL_FORMATS = {"JPEG", "PNG"}
_CONVERTIBLE = {"GIF", "BMP", "WEBP", "TIFF", "PPM"}


def inspect_image(data: bytes, max_pixels: int) -> ImageInput:
    """Check an encoded image from its header, before any full decode.

    JPEG and PNG pass through unchanged (the model decodes them); GIF, BMP,
    WebP, TIFF and PPM are converted to PNG with Pillow after the pixel check.

    Raises:
        ImageError: 400 for bytes that are not an image, 413 above ``max_pixels``,
            415 for an image format the service does not take.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(400, "empty_image", "the image is empty")
    try:
        # Image.open reads only the header; Pillow's own bomb check is a backstop (its
        # warning is noise: the limit below is ours).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            fmt = im.format or ""
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    413,
                    "too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                )
            if width < 1 or height < 1:
                raise ImageError(400, "bad_image", "image has no pixels")
            if fmt in _MODEL_FORMATS:
                return ImageInput(data, width, height, fmt)
            if fmt not in _CONVERTIBLE:
                raise ImageError(
                    415,
                    "unsupported_image_type",
                    f"image format {fmt or 'unknown'} is not supported (use JPEG or PNG)",
                )
            im.seek(0)
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "PNG", compress_level=1)
            return ImageInput(buf.getvalue(), width, height, "PNG")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(413, "too_many_pixels", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(400, "bad_image", f"not a decodable image ({type(exc).__name__})") from None


@dataclass
class Detection:
    """One detection in pixel and normalised coordinates."""

    class_id: int
    label: str
    mid: str
    score: float
    box: dict[str, float]
    box_normalized: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mid": self.mid,
            "class_id": self.class_id,
            "score": round(self.score, 6),
            "box": self.box,
            "box_normalized": self.box_normalized,
        }


@dataclass
class RawOutput:
    """The model's outputs for one image (numpy, unfiltered)."""

    boxes: np.ndarray  # [N, 4] ymin, xmin, ymax, xmax normalised
    classes: np.ndarray  # [N]
    scores: np.ndarray  # [N]
    num: int

    def to_tf_serving(self) -> dict[str, Any]:
        return {
            "detection_boxes": self.boxes.tolist(),
            "detection_classes": self.classes.tolist(),
            "detection_scores": self.scores.tolist(),
            "num_detections": int(self.num),
        }


def to_detections(
    raw: RawOutput, labels: LabelMap, width: int, height: int, min_score: float, max_detections: int
) -> list[Detection]:
    """Filter by score, sort by score (highest first), map ids to labels and scale boxes to pixels."""
    out: list[Detection] = []
    n = min(int(raw.num), len(raw.scores))
    for i in range(n):
        score = float(raw.scores[i])
        if score < min_score:
            continue
        cid = int(raw.classes[i])
        cls = labels.by_id.get(cid)
        y0, x0, y1, x1 = (float(np.clip(v, 0.0, 1.0)) for v in raw.boxes[i])
        out.append(
            Detection(
                class_id=cid,
                label=cls.name if cls else f"class {cid}",
                mid=cls.mid if cls else "",
                score=score,
                box={
                    "x0": round(x0 * width, 2),
                    "y0": round(y0 * height, 2),
                    "x1": round(x1 * width, 2),
                    "y1": round(y1 * height, 2),
                },
                box_normalized={
                    "x0": round(x0, 6),
                    "y0": round(y0, 6),
                    "x1": round(x1, 6),
                    "y1": round(y1, 6),
                },
            )
        )
    out.sort(key=lambda d: -d.score)
    return out[:max_detections]


@dataclass
class ExportedModel:
    """A loaded export: the SavedModel's detection function, label map and ``model.json``."""

    source: str
    labels: LabelMap
    info: dict[str, Any]
    _fn: Any = None
    _tmp: str | None = None
    _tf: Any = None
    name: str = "oiod"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, url: str, storage: Any = None, warmup: bool = True) -> ExportedModel:
        """Load an export directory (path, ``file://``, ``s3://`` or ``gs://``).

        Args:
            url: the export directory.
            storage: a :class:`openimages_od.storage.Storage` (for s3/gs options); default plain.
            warmup: run one tiny image through the model so the first request is not slow.

        Raises:
            OiodError: the directory or one of its parts is missing or unreadable.
        """
        from openimages_od.storage import Storage, StorageError, local_path

        storage = storage or Storage()
        tmp: str | None = None
        remote = url.startswith(("s3://", "gs://"))
        root = local_path(url) if not remote else None
        if remote:
            tmp = tempfile.mkdtemp(prefix="oiod-model-")
            prefix = url.rstrip("/") + "/"
            try:
                objs = storage.list(prefix)
            except StorageError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise OiodError(f"cannot list model {url}: {exc}") from exc
            if not objs:
                shutil.rmtree(tmp, ignore_errors=True)
                raise OiodError(f"no exported model at {url} (empty prefix)")
            for o in objs:
                storage.download_file(o.url, Path(tmp) / o.url[len(prefix) :])
            root = Path(tmp)
        if root is None:
            raise OiodError(f"model location {url} must be a local path, file://, s3:// or gs:// URL")
        try:
            for part in ("saved_model", "label_map.pbtxt"):
                if not (root / part).exists():
                    raise OiodError(
                        f"exported model {url} has no {part} (expected saved_model/, "
                        f"label_map.pbtxt and model.json from `oiod export`)"
                    )
            labels = LabelMap.from_pbtxt((root / "label_map.pbtxt").read_text(), f"{url}/label_map.pbtxt")
            info: dict[str, Any] = {}
            if (root / "model.json").exists():
                try:
                    info = json.loads((root / "model.json").read_text())
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{url}/model.json: not valid JSON ({exc.msg} at line {exc.lineno})"
                    ) from None
            tf = _import_tf()
            loaded = tf.saved_model.load(str(root / "saved_model"))
            if "serving_default" not in loaded.signatures:
                raise OiodError(
                    f"{url}/saved_model has no serving_default signature (has {sorted(loaded.signatures)})"
                )
            model = cls(
                source=url,
                labels=labels,
                info=info,
                _fn=loaded.signatures["serving_default"],
                _tmp=tmp,
                _tf=tf,
                name=str(info.get("name") or "oiod"),
            )
            model.extra["loaded"] = loaded  # keep the object graph alive
        except BaseException:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if warmup:
            model.predict([_WARMUP_PNG()])
        log.info("loaded model %s (%d classes)", url, len(labels))
        return model

    def predict(self, images: Sequence[bytes]) -> list[RawOutput]:
        """Run the model on a batch of encoded images (blocking; call it off the event loop)."""
        tf = self._tf
        out = self._fn(image_bytes=tf.constant(list(images), dtype=tf.string))
        boxes = out["detection_boxes"].numpy()
        classes = out["detection_classes"].numpy()
        scores = out["detection_scores"].numpy()
        num = out["num_detections"].numpy()
        return [
            RawOutput(boxes[i], classes[i].astype(np.int64), scores[i], int(num[i]))
            for i in range(len(images))
        ]

    def describe(self) -> dict[str, Any]:
        """Model info for responses and ``GET /v1/models/{name}``."""
        keys = ("backbone", "input_size", "step", "config_digest")
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": len(self.labels),
            **{k: self.info.get(k) for k in keys if k in self.info},
        }

    def close(self) -> None:
        """Release the model and any temp copy."""
        self._fn = None
        self.extra.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _import_tf() -> Any:
    try:
        import tensorflow as tf
    except ModuleNotFoundError as exc:
        raise OiodError("serving needs TensorFlow: pip install 'openimages-od[serve]'") from exc
    # Growth instead of grabbing the whole GPU, so several replicas/processes can share one.
    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # GPUs already initialised in this process; nothing to change
        pass
    return tf


def _WARMUP_PNG() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (127, 127, 127)).save(buf, "PNG")
    return buf.getvalue()
