"""The generated Open Images-format dataset used by the demo, tests and benchmarks."""

from __future__ import annotations

import base64
import csv
import hashlib
import io

from PIL import Image

from openimages_od.synth import DEMO_CLASSES, FILES, generate_dataset, upright_boxes


def test_layout_and_headers(tmp_path):
    ds = generate_dataset(tmp_path / "d", 20, seed=3)
    with open(ds.root / FILES["classes"]) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["LabelName", "DisplayName"] and len(rows) == 602
    with open(ds.metadata("train", "boxes")) as fh:
        assert len(next(csv.reader(fh))) == 21
    with open(ds.metadata("validation", "boxes")) as fh:
        assert len(next(csv.reader(fh))) == 13
    with open(ds.metadata("train", "images")) as fh:
        index = list(csv.DictReader(fh))
    assert len(index) == len(ds.split_images("train")) == 16
    for row in index:
        data = (ds.bucket_dir / "train" / f"{row['ImageID']}.jpg").read_bytes()
        assert base64.b64decode(row["OriginalMD5"]) == hashlib.md5(data).digest()
        assert int(row["OriginalSize"]) == len(data)


def test_deterministic(tmp_path):
    a = generate_dataset(tmp_path / "a", 10, seed=5)
    b = generate_dataset(tmp_path / "b", 10, seed=5)
    assert [i.jpeg for i in a.images] == [i.jpeg for i in b.images]
    assert (a.root / FILES["boxes"]["train"]).read_bytes() == (b.root / FILES["boxes"]["train"]).read_bytes()


def test_rotation_undoes_storage_and_boxes_hit_shapes(tmp_path):
    ds = generate_dataset(tmp_path / "d", 60, seed=7, rotation_rate=0.5, group_of_rate=0.0)
    rotated = [im for im in ds.images if im.rotation]
    assert {im.rotation for im in rotated} >= {90, 180} or len(rotated) >= 10
    colors = {c.mid: c.color for c in DEMO_CLASSES}
    checked = 0
    for im in ds.images:
        img = Image.open(io.BytesIO(im.jpeg)).convert("RGB")
        img = img.rotate(im.rotation, expand=True) if im.rotation else img
        for b in upright_boxes(im):
            cx = (b["XMin"] * 0.4 + b["XMax"] * 0.6) * img.width  # off the window's centre bar
            cy = (b["YMin"] * 0.3 + b["YMax"] * 0.7) * img.height  # inside circle, triangle and rect
            px = img.getpixel((int(cx), int(cy)))
            assert sum(abs(p - q) for p, q in zip(px, colors[b["LabelName"]])) < 110, (
                im.image_id,
                im.rotation,
            )
            checked += 1
    assert checked > 60
