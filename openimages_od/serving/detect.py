"""``oiod detect``: run the exported model on local files or URLs, JSON lines on stdout.

Uses the same loading, header checks, label mapping and drawing as the
service. One JSON line per input, in input order; an input that cannot be read
or decoded gets a line with ``error`` and the command exits 1 at the end.
URLs (``http(s)://``, ``s3://``) are read with the storage layer: the person
running the command chose them, so the service's SSRF guard does not apply.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from openimages_od.config import Config, save_resolved
from openimages_od.errors import UsageError
from openimages_od.serving.errors import ApiError
from openimages_od.serving.model import ExportedModel, ImageInput, RawOutput, inspect_image, to_detections

__all__ = ["run_detect"]


def _out_name(src: str, index: int, used: set[str], fmt: str) -> str:
    stem = re.sub(r"[^\w.-]+", "_", Path(src.split("?", 1)[0].rstrip("/")).stem or "image")[:80] or "image"
    name = f"{stem}.{fmt}"
    if name in used:
        name = f"{stem}-{index}.{fmt}"
    used.add(name)
    return name


def run_detect(
    cfg: Config,
    images: Sequence[str],
    out: str | None = None,
    model: ExportedModel | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Detect objects in ``images`` and print one JSON line per image.

    Args:
        cfg: configuration (``serve.model``, ``serve.min_score``, ``serve.max_detections``,
            ``serve.max_pixels``, ``serve.max_batch``).
        images: local paths, ``file://``, ``http(s)://`` or ``s3://`` URLs.
        out: directory (path or s3://) for annotated images; None writes none.
        model: an already loaded model (tests); None loads ``cfg.serve_model``.
        stdout: where the JSON lines go (default ``sys.stdout``).

    Returns:
        0 when every image was processed, 1 when any failed.
    """
    from openimages_od.config import join_url
    from openimages_od.serving.draw import draw_detections
    from openimages_od.storage import StorageError
    from openimages_od.storage_setup import storage_from_config

    if not images:
        raise UsageError("give at least one image path or URL")
    stdout = stdout or sys.stdout
    storage = storage_from_config(cfg)
    sc = cfg.serve
    own = model is None
    model = model or ExportedModel.load(cfg.serve_model, storage)
    out_root = None
    if out:
        from openimages_od.config import normalize_root

        out_root = normalize_root(out)
        save_resolved(cfg, out_root, storage)
    results: list[dict[str, Any] | None] = [None] * len(images)
    ready: list[tuple[int, ImageInput]] = []
    for i, src in enumerate(images):
        try:
            data = storage.read_bytes(src)
            if len(data) > sc.max_body_mb * 1024 * 1024:
                raise ApiError(413, "image_too_large", f"image is larger than {sc.max_body_mb:g} MB")
            ready.append((i, inspect_image(data, sc.max_pixels)))
        except ApiError as exc:
            results[i] = {"image": src, "error": {"code": exc.code, "message": exc.message}}
        except (StorageError, OSError) as exc:
            results[i] = {"image": src, "error": {"code": "read_failed", "message": str(exc)}}
    used: set[str] = set()
    failed = 0
    try:
        for start in range(0, len(ready), sc.max_batch):
            chunk = ready[start : start + sc.max_batch]
            raws: list[RawOutput | Exception]
            try:
                raws = list(model.predict([im.data for _, im in chunk]))
            except Exception:
                # One bad image fails the whole batch: retry one by one so only it is reported.
                raws = []
                for _, im in chunk:
                    try:
                        raws.append(model.predict([im.data])[0])
                    except Exception as exc:
                        raws.append(exc)
            for (i, im), raw in zip(chunk, raws):
                src = images[i]
                if isinstance(raw, Exception):
                    results[i] = {
                        "image": src,
                        "error": {
                            "code": "bad_image",
                            "message": f"the model could not decode it ({type(raw).__name__})",
                        },
                    }
                    continue
                dets = to_detections(raw, model.labels, im.width, im.height, sc.min_score, sc.max_detections)
                rec: dict[str, Any] = {
                    "image": src,
                    "width": im.width,
                    "height": im.height,
                    "num_detections": len(dets),
                    "detections": [d.to_json() for d in dets],
                }
                if out_root:
                    fmt = "png" if im.format == "PNG" else "jpg"
                    url = join_url(out_root, _out_name(src, i, used, fmt))
                    storage.write_bytes(
                        url, draw_detections(im.data, dets, "png" if fmt == "png" else "jpeg")
                    )
                    rec["output"] = url
                results[i] = rec
        for line in results:
            assert line is not None
            if "error" in line:
                failed += 1
            stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
        stdout.flush()
    finally:
        if own:
            model.close()
    if failed:
        print(f"oiod detect: {failed} of {len(images)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0
