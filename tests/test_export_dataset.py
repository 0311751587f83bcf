"""``oiod export-dataset`` (issue 16): committed shards -> COCO, YOLO, Pascal VOC.

One small output is prepared for the module (the real planner and prepare on the session's
embedded Ray, images from a local HTTP server, a generated Open Images-layout dataset with
group-of boxes and rotated photos). Every export is read back with the format's own reader where
one is installable (pycocotools for COCO) or parsed (VOC XML with ``xml.etree``, YOLO txt and
``data.yaml`` with PyYAML) and compared with the shards, decoded independently of the exporter.
"""

from __future__ import annotations

import io
import json
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from openimages_od.config import Config, dump_config, load_config
from openimages_od.convert import FORMATS
from openimages_od.convert.export import EXPORT_MANIFEST, export_dataset
from openimages_od.convert.reader import iter_shard
from openimages_od.dataset import dataset_shards
from openimages_od.devservices import ImageServer
from openimages_od.errors import DataError, UsageError
from openimages_od.layout import Layout
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.pipeline.example import decode_example
from openimages_od.pipeline.tfrecord import iter_records
from openimages_od.storage import Storage
from openimages_od.storage_setup import storage_from_config
from openimages_od.synth import SynthClass, generate_dataset

VEHICLE, APPLE, DOG, CAT = "/m/07yv9", "/m/014j1m", "/m/0bt9lr", "/m/01yrx"
CLASSES = (
    SynthClass(VEHICLE, "Vehicle", "rect", (30, 90, 220)),
    SynthClass(APPLE, "Apple", "circle", (200, 30, 30)),
    SynthClass(DOG, "Dog", "triangle", (140, 90, 40)),
    SynthClass(CAT, "Cat", "circle", (40, 200, 60)),
)
SPLITS = ("train", "validation")
TOL = 1e-6


def _cfg(ds: Any, out_url: str) -> Config:
    base = load_config(
        None,
        [
            f"output.url={out_url}",
            "ray.num_actors=2",
            "ray.num_cpus_per_actor=0.5",
            "ray.progress=false",
            "ray.actor_start_timeout_s=60",
            "source.images.order=[original]",
            "image.max_side=96",
            "source.images.http.max_retries=1",
            "shards.images_per_shard=5",
            'selection.classes=["Apple", "Dog", "Cat"]',
        ],
    )
    d = base.model_dump(mode="json")
    d["source"] = {**d["source"], **ds.source_config()}
    return Config.model_validate(d)


@pytest.fixture(scope="module")
def prepared(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """A prepared output (train + validation, several shards each) and its config file."""
    from openimages_od.pipeline.distribute import run_prepare

    tmp = tmp_path_factory.mktemp("export")
    with ImageServer() as srv:
        ds = generate_dataset(
            tmp / "ds",
            24,
            classes=CLASSES,
            base_url=srv.url("").rstrip("/"),
            rotation_rate=0.3,
            min_side=80,
            max_side=140,
            group_of_rate=0.3,
            seed=11,
        )
        for im in ds.images:
            srv.add(f"original/{im.split}/{im.image_id}.jpg", im.jpeg)
        cfg = _cfg(ds, f"file://{tmp}/out")
        assert run_prepare(cfg) == 0
    cfg_file = tmp / "config.yaml"
    cfg_file.write_text(dump_config(cfg))
    return cfg, cfg_file


def _shards(cfg: Config, split: str) -> dict[str, dict[str, Any]]:
    """image_id -> decoded tf.Example, read the way train reads (not through the exporter)."""
    st = storage_from_config(cfg)
    urls, _ = dataset_shards(cfg, st, split)
    out: dict[str, dict[str, Any]] = {}
    for u in urls:
        for rec in iter_records(st.read_bytes(u), u):
            d = decode_example(rec)
            out[d["image/filename"][0].decode()] = d
    return out


def _boxes_px(d: dict[str, Any]) -> list[tuple[int, float, float, float, float]]:
    """(label, xmin, ymin, xmax, ymax) in pixels of the stored image, in record order."""
    w, h = d["image/width"][0], d["image/height"][0]
    return [
        (int(lab), x0 * w, y0 * h, x1 * w, y1 * h)
        for lab, x0, y0, x1, y1 in zip(
            d["image/object/class/label"],
            d["image/object/bbox/xmin"],
            d["image/object/bbox/ymin"],
            d["image/object/bbox/xmax"],
            d["image/object/bbox/ymax"],
        )
    ]


def _close(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and all(abs(p - q) <= TOL for p, q in zip(x[1:], y[1:])) for x, y in zip(a, b)
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- formats


@pytest.mark.integration
def test_coco_loads_in_pycocotools_with_the_shards_boxes(
    prepared: tuple[Config, Path], tmp_path: Path
) -> None:
    from pycocotools.coco import COCO

    cfg, _ = prepared
    out = tmp_path / "coco"
    m = export_dataset(cfg, "coco", out=str(out))
    assert m["up_to_date"] is False and m["splits"] == list(SPLITS)
    lm = LabelMap.from_pbtxt((Path(Layout.from_config(cfg).label_map_pbtxt[7:])).read_text())
    crowd = 0
    for split in SPLITS:
        shards = _shards(cfg, split)
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        n_boxes = sum(len(d["image/object/class/label"]) for d in shards.values())
        assert n_boxes > 0
        assert len(coco.getAnnIds()) == n_boxes == m["split_info"][split]["boxes"]
        assert len(coco.getImgIds()) == len(shards)
        assert sorted(coco.getCatIds()) == [c.id for c in lm.classes]
        assert {c["id"]: (c["name"], c["mid"]) for c in coco.loadCats(coco.getCatIds())} == {
            c.id: (c.name, c.mid) for c in lm.classes
        }
        for img in coco.loadImgs(coco.getImgIds()):
            d = shards[img["oid_image_id"]]
            assert (img["width"], img["height"]) == (d["image/width"][0], d["image/height"][0])
            assert (out / "images" / split / img["file_name"]).read_bytes() == d["image/encoded"][0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            got = [
                (
                    a["category_id"],
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                )
                for a in anns
            ]
            assert _close(got, _boxes_px(d))
            assert [a["iscrowd"] for a in anns] == list(d["image/object/group_of"])
            assert [a["mid"] for a in anns] == [t.decode() for t in d["image/object/class/text"]]
            assert all(abs(a["area"] - a["bbox"][2] * a["bbox"][3]) <= TOL for a in anns)
        crowd += sum(a["iscrowd"] for a in coco.loadAnns(coco.getAnnIds()))
    assert crowd > 0  # the fixture has group-of boxes, so iscrowd is exercised
    assert json.loads((out / EXPORT_MANIFEST).read_text())["dataset_digest"] == m["dataset_digest"]


@pytest.mark.integration
def test_yolo_labels_and_data_yaml_round_trip(prepared: tuple[Config, Path], tmp_path: Path) -> None:
    cfg, _ = prepared
    out = tmp_path / "yolo"
    export_dataset(cfg, "yolo", out=f"file://{out}")
    lm = LabelMap.from_pbtxt((Path(Layout.from_config(cfg).label_map_pbtxt[7:])).read_text())
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["path"] == str(out)
    assert (data["train"], data["val"]) == ("images/train", "images/validation")
    assert data["names"] == {i: c.name for i, c in enumerate(lm.classes)}
    index_to_id = {i: c.id for i, c in enumerate(lm.classes)}
    for split in SPLITS:
        shards = _shards(cfg, split)
        assert {
            p.stem for p in (out / data[{"train": "train", "validation": "val"}[split]]).iterdir()
        } == set(shards)
        assert {p.stem for p in (out / "labels" / split).iterdir()} == set(shards)
        for image_id, d in shards.items():
            assert (out / "images" / split / f"{image_id}.jpg").read_bytes() == d["image/encoded"][0]
            w, h = d["image/width"][0], d["image/height"][0]
            got = []
            for line in (out / "labels" / split / f"{image_id}.txt").read_text().splitlines():
                cls, cx, cy, bw, bh = line.split()
                cx_, cy_, bw_, bh_ = float(cx), float(cy), float(bw), float(bh)
                assert 0 <= cx_ <= 1 and 0 <= cy_ <= 1
                got.append(
                    (
                        index_to_id[int(cls)],
                        (cx_ - bw_ / 2) * w,
                        (cy_ - bh_ / 2) * h,
                        (cx_ + bw_ / 2) * w,
                        (cy_ + bh_ / 2) * h,
                    )
                )
            # normalised coordinates carry 10 significant digits: within 1e-6 of the shards after scaling
            assert _close(got, _boxes_px(d)), image_id


@pytest.mark.integration
def test_voc_xml_round_trips(prepared: tuple[Config, Path], tmp_path: Path) -> None:
    cfg, _ = prepared
    out = tmp_path / "voc"
    export_dataset(cfg, "voc", out=str(out))
    lm = LabelMap.from_pbtxt((Path(Layout.from_config(cfg).label_map_pbtxt[7:])).read_text())
    name_to_id = {c.name: c.id for c in lm.classes}
    for split in SPLITS:
        shards = _shards(cfg, split)
        ids = (out / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert sorted(ids) == sorted(shards) and len(ids) == len(set(ids))
        for image_id in ids:
            d = shards[image_id]
            root = ET.parse(out / "Annotations" / f"{image_id}.xml").getroot()
            fn = root.findtext("filename")
            assert fn == f"{image_id}.jpg"
            assert (out / "JPEGImages" / fn).read_bytes() == d["image/encoded"][0]
            size = root.find("size")
            assert size is not None
            assert (int(size.findtext("width", "")), int(size.findtext("height", ""))) == (
                d["image/width"][0],
                d["image/height"][0],
            )
            assert size.findtext("depth") == "3"
            objs = root.findall("object")
            got = []
            for o in objs:
                bb = o.find("bndbox")
                assert bb is not None
                got.append(
                    (
                        name_to_id[o.findtext("name", "")],
                        *(float(bb.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax")),
                    )
                )
                assert o.findtext("difficult") == "0"
            assert _close(got, _boxes_px(d))
            assert [o.findtext("mid") for o in objs] == [t.decode() for t in d["image/object/class/text"]]
            for key in ("truncated", "occluded"):
                want = [str(v) if v in (0, 1) else None for v in d[f"image/object/{key}"]]
                assert [o.findtext(key) for o in objs] == want


# --------------------------------------------------------------------------- commit protocol


@pytest.mark.integration
def test_rerun_is_idempotent_and_replaces_a_half_written_export(
    prepared: tuple[Config, Path], tmp_path: Path
) -> None:
    cfg, _ = prepared
    out = tmp_path / "yolo"
    export_dataset(cfg, "yolo", out=str(out))
    first = _files(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    again = export_dataset(cfg, "yolo", out=str(out))
    assert again["up_to_date"] is True
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes  # nothing written

    # A crashed run: no manifest, a stray image of another dataset, a label file cut short.
    (out / EXPORT_MANIFEST).unlink()
    (out / "images" / "train" / "stray.jpg").write_bytes(b"not ours")
    victim = next((out / "labels" / "train").iterdir())
    victim.write_text("")
    m = export_dataset(cfg, "yolo", out=str(out))
    assert m["up_to_date"] is False
    assert _files(out) == first  # byte-identical to the first export, stray file gone

    # Another split selection is another export: rewritten, and only that split remains.
    m = export_dataset(cfg, "yolo", ["validation"], out=str(out))
    assert m["splits"] == ["validation"]
    assert not [p for p in (out / "images" / "train").rglob("*") if p.is_file()]  # empty folders may stay
    assert "train" not in yaml.safe_load((out / "data.yaml").read_text())

    # Another format in the same folder replaces the YOLO export rather than mixing with it.
    m = export_dataset(cfg, "coco", ["validation"], out=str(out))
    assert m["format"] == "coco" and not (out / "data.yaml").exists()
    assert not [p for p in (out / "labels").rglob("*") if p.is_file()]
    assert (out / "annotations" / "instances_validation.json").is_file()


@pytest.mark.integration
def test_export_to_s3_equals_the_local_export(
    prepared: tuple[Config, Path], tmp_path: Path, seaweedfs: Any, s3_bucket: str, s3_options: Any
) -> None:
    cfg, _ = prepared
    local = tmp_path / "coco"
    export_dataset(cfg, "coco", ["validation"], out=str(local))
    st = Storage(s3=s3_options)
    root = f"s3://{s3_bucket}/exports/coco"
    m = export_dataset(cfg, "coco", ["validation"], out=root, storage=st)
    assert m["up_to_date"] is False
    remote = {o.url[len(root) + 1 :]: st.read_bytes(o.url) for o in st.list(root + "/")}
    assert remote == _files(local)
    assert export_dataset(cfg, "coco", ["validation"], out=root, storage=st)["up_to_date"] is True


@pytest.mark.integration
def test_reader_yields_what_the_shards_hold(prepared: tuple[Config, Path]) -> None:
    cfg, _ = prepared
    st = storage_from_config(cfg)
    urls, _ = dataset_shards(cfg, st, "train")
    shards = _shards(cfg, "train")
    seen = 0
    for url in urls:
        for s in iter_shard(st, url):
            d = shards[s.image_id]
            assert s.encoded == d["image/encoded"][0] and s.extension == "jpg"
            assert [b.group_of for b in s.boxes] == list(d["image/object/group_of"])
            seen += 1
    assert seen == len(shards)


# --------------------------------------------------------------------------- errors


@pytest.mark.integration
def test_unknown_split_format_and_overlapping_out_are_usage_errors(
    prepared: tuple[Config, Path], tmp_path: Path
) -> None:
    cfg, _ = prepared
    with pytest.raises(UsageError, match=r"unknown split 'test'.*train, validation"):
        export_dataset(cfg, "coco", ["test"], out=str(tmp_path / "x"))
    with pytest.raises(UsageError, match="unknown export format 'tfds'"):
        export_dataset(cfg, "tfds", out=str(tmp_path / "x"))
    root = Layout.from_config(cfg).root
    with pytest.raises(UsageError, match="contains it"):
        export_dataset(cfg, "coco", out=root)
    assert not (tmp_path / "x").exists()


def test_no_committed_shards_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(None, [f"output.url={tmp_path}/empty"])
    with pytest.raises(DataError, match=r"no committed shards.*dataset\.json.*oiod prepare"):
        export_dataset(cfg, "coco", out=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_webdataset_tar_shards_are_refused_by_name(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("000001.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    shard = tmp_path / "train-00000-of-00001.tfrecord"  # a tar under a TFRecord name: told by content
    shard.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"tar \(WebDataset\) shard.*TFRecord shards only"):
        list(iter_shard(Storage(), str(shard)))


def test_corrupt_shard_names_the_url(tmp_path: Path) -> None:
    from openimages_od.pipeline.example import BytesF, IntF, encode_example
    from openimages_od.pipeline.tfrecord import encode_records

    rec = encode_example({"image/filename": BytesF([b"a"]), "image/width": IntF([4])})
    shard = tmp_path / "s.tfrecord"
    shard.write_bytes(encode_records([rec]))
    with pytest.raises(DataError, match=r"s\.tfrecord record 0: record lacks image/filename, image/encoded"):
        list(iter_shard(Storage(), str(shard)))
    shard.write_bytes(encode_records([rec])[:-3])
    with pytest.raises(DataError, match=r"s\.tfrecord: truncated"):
        list(iter_shard(Storage(), str(shard)))


# --------------------------------------------------------------------------- CLI


def test_cli_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from openimages_od.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export-dataset", "--format", "tfds", "--set", f"output.url={tmp_path}/o"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["export-dataset", "--set", f"output.url={tmp_path}/o"])  # --format is required
    assert exc.value.code == 2
    assert main(["export-dataset", "--format", "coco", "--set", f"output.url={tmp_path}/o"]) == 1
    assert "no committed shards" in capsys.readouterr().err
    assert sorted(FORMATS) == ["coco", "voc", "yolo"]


@pytest.mark.integration
def test_cli_exports_and_rejects_an_unknown_split(
    prepared: tuple[Config, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from openimages_od.cli import main

    _, cfg_file = prepared
    out = tmp_path / "voc"
    args = ["export-dataset", "-c", str(cfg_file), "--format", "voc", "--out", str(out)]
    assert main([*args, "--split", "validation"]) == 0
    printed = capsys.readouterr().out
    assert "voc at file://" in printed and "validation:" in printed and "written" in printed
    assert (out / "ImageSets" / "Main" / "validation.txt").is_file()
    assert main([*args, "--split", "validation"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([*args, "--split", "valid"]) == 2
    assert "unknown split 'valid'" in capsys.readouterr().err
