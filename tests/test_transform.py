"""Unit tests of :mod:`openimages_od.pipeline.transform` (one image's CPU work, given ``ImageConfig``)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from pipeline_helpers import b64md5, box, image_row, photo

from openimages_od.config import ImageConfig
from openimages_od.pipeline.example import decode_example
from openimages_od.pipeline.fetch import Fetched
from openimages_od.pipeline.transform import process_image, transform_image
from openimages_od.pipeline.verify import Rejected


def _row(image_id: str, **kw) -> dict:
    return {**image_row(image_id, **kw), "source_id": 1, "shard": 0}


def _fetched(data: bytes, source: str = "original") -> Fetched:
    return Fetched(data=data, source=source, url=f"http://x/{source}.jpg", final_url="", attempts=1)


def test_process_image_resizes_and_records_boxes_in_output_pixels():
    data = photo(800, 400, seed=3)
    row = _row("000a1", boxes=[box(1, 0.1, 0.5, 0.2, 0.6)], original_md5=b64md5(data))
    ic = ImageConfig(max_side=200, quality=85)
    record, entry = process_image(_fetched(data), row, ic)
    ex = decode_example(record)
    out = bytes(ex["image/encoded"][0])
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == (200, 100)
    assert (entry.width, entry.height, entry.status, entry.kept_original) == (200, 100, "ok", False)
    assert entry.bytes == len(data) and entry.source == "original"
    assert list(ex["image/object/bbox/xmin"]) == pytest.approx([0.1])
    assert list(ex["image/object/bbox/ymax"]) == pytest.approx([0.6])


def test_transform_image_cache_entry_matches_the_record():
    data = photo(300, 200, seed=1)
    row = _row("000b2", boxes=[box(2, 0.0, 1.0, 0.0, 1.0)], original_md5=b64md5(data))
    record, entry, cached = transform_image(_fetched(data), row, ImageConfig(max_side=1024))
    ex = decode_example(record)
    assert cached.data == bytes(ex["image/encoded"][0])
    assert cached.kept_original and cached.data == data  # small upright JPEG: bytes kept
    assert (cached.width, cached.height) == (entry.width, entry.height) == (300, 200)


def test_md5_checked_only_for_originals_and_only_when_asked():
    data = photo(64, 64, seed=2)
    row = _row("000c3", original_md5=b64md5(b"something else"))
    with pytest.raises(Rejected) as exc:
        process_image(_fetched(data), row, ImageConfig())
    assert exc.value.reason == "md5_mismatch"
    process_image(_fetched(data, "thumbnail"), row, ImageConfig())  # thumbnails have no MD5
    process_image(_fetched(data), row, ImageConfig(verify_md5=False))
