"""Fixtures for the training tests: a prepare-shaped output folder with real TFRecord shards.

Images come from :mod:`openimages_od.synth` (shapes of 3 classes on textured
backgrounds, real MIDs and hierarchy), stored upright; shards are written with
``tf.io.TFRecordWriter`` using the shard contract's tf.Example keys, each
committed by its ``.stats.json``. When the real pipeline is wired in, the lead
can swap :func:`build_output` for ``oiod plan`` + ``oiod prepare``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from openimages_od.openimages.labelmap import LabelMap
from openimages_od.synth import DEMO_CLASSES, SynthImage, bundled_metadata, generate_dataset

MIDS = [c.mid for c in DEMO_CLASSES]
NAMES = {c.mid: c.name for c in DEMO_CLASSES}


def label_map() -> LabelMap:
    return LabelMap.from_mids(MIDS, NAMES)


def make_example(im: SynthImage, source_id: int, lm: LabelMap):
    """One tf.Example with the shard contract's keys."""
    import tensorflow as tf

    def b(v: list[bytes]):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))

    def f(v: list[float]):
        return tf.train.Feature(float_list=tf.train.FloatList(value=v))

    def i(v: list[int]):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    boxes = [bx for bx in im.boxes if bx["LabelName"] in lm.by_mid]
    feats = {
        "image/encoded": b([im.jpeg]),
        "image/format": b([b"jpeg"]),
        "image/height": i([im.height]),
        "image/width": i([im.width]),
        "image/filename": b([im.image_id.encode()]),
        "image/source_id": b([str(source_id).encode()]),
        "image/key/sha256": b([hashlib.sha256(im.jpeg).hexdigest().encode()]),
        "image/object/bbox/xmin": f([bx["XMin"] for bx in boxes]),
        "image/object/bbox/xmax": f([bx["XMax"] for bx in boxes]),
        "image/object/bbox/ymin": f([bx["YMin"] for bx in boxes]),
        "image/object/bbox/ymax": f([bx["YMax"] for bx in boxes]),
        "image/object/class/label": i([lm.by_mid[bx["LabelName"]].id for bx in boxes]),
        "image/object/class/text": b([bx["LabelName"].encode() for bx in boxes]),
        "image/object/group_of": i([int(bx["IsGroupOf"]) for bx in boxes]),
        "image/object/is_crowd": i([int(bx["IsGroupOf"]) for bx in boxes]),
        "image/object/occluded": i([int(bx["IsOccluded"]) for bx in boxes]),
        "image/object/truncated": i([int(bx["IsTruncated"]) for bx in boxes]),
        "image/object/depiction": i([int(bx["IsDepiction"]) for bx in boxes]),
    }
    if im.labels:
        labels = sorted((m, c) for m, c in im.labels.items() if m in lm.by_mid)
        feats["image/class/label"] = i([lm.by_mid[m].id for m, _ in labels])
        feats["image/class/text"] = b([m.encode() for m, _ in labels])
        feats["image/class/confidence"] = f([float(c) for _, c in labels])
    return tf.train.Example(features=tf.train.Features(feature=feats))


def write_split(
    out: Path, split: str, images: list[SynthImage], lm: LabelMap, num_shards: int, commit: bool = True
) -> list[Path]:
    """Write ``num_shards`` shards for ``split`` under ``out/tfrecords/{split}/`` (committed by default)."""
    import tensorflow as tf

    d = out / "tfrecords" / split
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    ordered = sorted(images, key=lambda im: im.image_id)
    for s in range(num_shards):
        part = ordered[s::num_shards]
        stem = d / f"{split}-{s:05d}-of-{num_shards:05d}"
        with tf.io.TFRecordWriter(str(stem) + ".tfrecord") as w:
            for im in part:
                w.write(make_example(im, ordered.index(im) + 1, lm).SerializeToString())
        if commit:
            data = Path(str(stem) + ".tfrecord").read_bytes()
            (Path(str(stem) + ".stats.json")).write_text(
                json.dumps(
                    {
                        "images": len(part),
                        "ok": len(part),
                        "records": len(part),
                        "tfrecord_bytes": len(data),
                        "tfrecord_sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
            )
        paths.append(Path(str(stem) + ".tfrecord"))
    return paths


def write_lockfile(out: Path, lm: LabelMap) -> dict:
    """``dataset.json`` for the committed shards under ``out`` (what prepare writes), so train/evaluate read them."""
    from openimages_od.layout import combine

    splits = {}
    for d in sorted(p for p in (out / "tfrecords").iterdir() if p.is_dir()):
        shards = []
        for stats_path in sorted(d.glob("*.stats.json")):
            st = json.loads(stats_path.read_text())
            name = stats_path.name.removesuffix(".stats.json")
            shards.append(
                {
                    "name": name,
                    "tfrecord": f"tfrecords/{d.name}/{name}.tfrecord",
                    "records": st["records"],
                    "bytes": st["tfrecord_bytes"],
                    "sha256": st["tfrecord_sha256"],
                }
            )
        if shards:
            splits[d.name] = {
                "num_shards": len(shards),
                "records": sum(s["records"] for s in shards),
                "shards": shards,
            }
    doc = {
        "format": 1,
        "plan_digest": None,
        "label_map_digest": lm.digest,
        "num_classes": len(lm),
        "image_settings": {},
        "splits": splits,
    }
    doc["digest"] = combine(
        "dataset", None, lm.digest, [[k, s["sha256"]] for k, v in splits.items() for s in v["shards"]]
    )
    (out / "dataset.json").write_text(json.dumps(doc, indent=2))
    return doc


def build_output(
    out: Path,
    *,
    num_images: int = 48,
    val_fraction: float = 0.25,
    num_shards: int = 2,
    min_side: int = 96,
    max_side: int = 160,
    seed: int = 0,
    group_of_rate: float = 0.15,
    work: Path | None = None,
) -> Path:
    """A prepare-shaped output folder: label map, metadata/hierarchy, train + validation shards."""
    work = work or out.parent / (out.name + "-synth")
    ds = generate_dataset(
        work,
        num_images,
        splits={"train": 1 - val_fraction, "validation": val_fraction},
        min_side=min_side,
        max_side=max_side,
        rotation_rate=0.0,
        group_of_rate=group_of_rate,
        seed=seed,
    )
    lm = label_map()
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_map.pbtxt").write_text(lm.to_pbtxt())
    (out / "label_map.csv").write_text(lm.to_csv())
    (out / "metadata").mkdir(exist_ok=True)
    shutil.copyfile(bundled_metadata()[1], out / "metadata" / "bbox_labels_600_hierarchy.json")
    write_split(out, "train", ds.split_images("train"), lm, num_shards)
    write_split(out, "validation", ds.split_images("validation"), lm, 1)
    write_lockfile(out, lm)
    return out


def tiny_overrides(output_url: str, model_dir: str | None = None, steps: int = 4) -> list[str]:
    """Config overrides for a fast CPU run: 128 px, batch 2, MobileNetV2 with a small FPN/head."""
    out = [
        f"output.url={output_url}",
        "train.backbone=mobilenetv2",
        "train.input_size=128",
        "train.batch_size=2",
        f"train.steps={steps}",
        "train.fpn_filters=16",
        "train.head_num_filters=16",
        "train.head_num_convs=1",
        "train.checkpoint_every=2",
        "train.summary_every=2",
        "train.learning_rate.warmup_steps=0",
        "train.learning_rate.initial=0.01",
        "train.shuffle_buffer=16",
        "evaluate.batch_size=4",
        "evaluate.num_images_to_log=2",
        "export.max_detections=20",
    ]
    if model_dir:
        out.append(f"train.model_dir={model_dir}")
    return out
