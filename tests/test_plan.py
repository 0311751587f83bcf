"""``oiod plan`` end to end: every release layout, selection, malformed rows, caps, remote inputs, CLI."""

from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from openimages_od.config import Config
from openimages_od.errors import DataError
from openimages_od.openimages import planio
from openimages_od.openimages.classes import read_hierarchy
from openimages_od.openimages.formats import ATTRIBUTE_COLUMNS, BOX_LAYOUTS, XCLICK_COLUMNS
from openimages_od.openimages.ids import source_id
from openimages_od.openimages.plan import build_plan
from openimages_od.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "openimages"
CLASSES = DATA / "class-descriptions-boxable.csv"
HIERARCHY = DATA / "bbox_labels_600_hierarchy.json"
SAMPLE = DATA / "sample_sysaster_test-annotations-bbox_first2000lines.csv"
VEHICLE, CAR, BOAT, AIRPLANE, PERSON, LAND = (
    "/m/07yv9",
    "/m/0k4j",
    "/m/019jd",
    "/m/0cmf2",
    "/m/01g317",
    "/m/01prls",
)
HAND, FOOT = "/m/0k65p", "/m/031n1"
INDEX_COLS = (
    "ImageID",
    "Subset",
    "OriginalURL",
    "OriginalLandingURL",
    "License",
    "AuthorProfileURL",
    "Author",
    "Title",
    "OriginalSize",
    "OriginalMD5",
    "Thumbnail300KURL",
)


# --------------------------------------------------------------------------- content and release writers


def make_content(seed: int = 7) -> dict:
    """The same Open Images content for every layout: real sample rows + generated vehicle rows."""
    rng = random.Random(seed)
    with open(SAMPLE, newline="") as fh:
        real = list(csv.DictReader(fh))
    vehicles = []
    for _ in range(40):
        iid = f"{rng.getrandbits(64):016x}"
        for _ in range(rng.randint(1, 4)):
            x0, x1 = sorted(round(rng.random(), 6) for _ in range(2))
            y0, y1 = sorted(round(rng.random(), 6) for _ in range(2))
            vehicles.append(
                {
                    "ImageID": iid,
                    "Source": "xclick",
                    "LabelName": rng.choice([CAR, BOAT, AIRPLANE, PERSON, LAND]),
                    "Confidence": "1",
                    "XMin": str(x0),
                    "XMax": str(x1),
                    "YMin": str(y0),
                    "YMax": str(y1),
                    **{a: rng.choice(["0", "1", "-1"]) for a in ATTRIBUTE_COLUMNS},
                }
            )
    splits = {
        "train": real[:1000] + vehicles[: len(vehicles) // 2],
        "validation": real[1000:] + vehicles[len(vehicles) // 2 :],
    }
    images, labels = {}, {}
    for split, rows in splits.items():
        ids = sorted({r["ImageID"] for r in rows})
        images[split] = [
            {
                "ImageID": i,
                "Subset": split,
                "OriginalURL": f"https://farm.example/{i}_o.jpg",
                "OriginalLandingURL": f"https://flickr.example/{i}",
                "License": "cc-by",
                "AuthorProfileURL": "https://flickr.example/u",
                "Author": "A, B",
                "Title": f"photo, {i[:4]}",
                "OriginalSize": str(rng.randint(1000, 10**6)),
                "OriginalMD5": f"md5{i}==",
                "Thumbnail300KURL": f"https://thumb.example/{i}.jpg",
                "Rotation": rng.choice(["0.0", "90.0", "180.0", "270.0", ""]),
            }
            for k, i in enumerate(ids)
            if k % 10 != 3  # some images have no index row
        ]
        labels[split] = [
            {
                "ImageID": i,
                "Source": "verification",
                "LabelName": rng.choice([CAR, HAND, PERSON, VEHICLE, "/m/0dzct"]),
                "Confidence": rng.choice(["0", "1"]),
            }
            for i in ids[::3]
        ]
    return {"boxes": splits, "images": images, "labels": labels}


def _write_csv(
    path: Path, cols: list[str], rows: list[dict], header: bool = True, rename: dict | None = None
) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow([(rename or {}).get(c, c) for c in cols])
    for r in rows:
        w.writerow([r.get(c, "") for c in cols])
    path.write_text(buf.getvalue())


def write_release(root: Path, content: dict, release: str) -> dict:
    """Write ``content`` in one release's layout; returns the ``source`` config section."""
    root.mkdir(parents=True, exist_ok=True)
    classes_text = CLASSES.read_text()
    rename = {"ImageID": "ImageId"} if release == "v7" else None
    if release in ("v6", "v7"):
        name = "oidv7-class-descriptions-boxable.csv" if release == "v7" else "oidv6-class-descriptions.csv"
        cls = root / name
        cls.write_text("LabelName,DisplayName\n" + classes_text)
    else:
        cls = root / "class-descriptions-boxable.csv"
        cls.write_text(classes_text)  # no header before V6
    splits = {}
    for split, rows in content["boxes"].items():
        if release == "v2":
            cols = BOX_LAYOUTS["v2-train"] if split == "train" else BOX_LAYOUTS["v4"]
        elif release in ("v6", "v7") and split == "train":
            cols = BOX_LAYOUTS["v6-train"]
            rows = [{**r, **{c: "0.5" for c in XCLICK_COLUMNS}} for r in rows]
        else:
            cols = BOX_LAYOUTS["v4"]
        boxes = root / f"{split}-annotations-bbox.csv"
        _write_csv(boxes, list(cols), rows, rename=rename)
        idx_cols = list(INDEX_COLS) + ([] if release == "v2" else ["Rotation"])
        images = root / f"{split}-images-boxable.csv"
        _write_csv(images, idx_cols, content["images"][split], rename=rename)
        labels = root / f"{split}-annotations-human-imagelabels-boxable.csv"
        _write_csv(
            labels, ["ImageID", "Source", "LabelName", "Confidence"], content["labels"][split], rename=rename
        )
        splits[split] = {"boxes": str(boxes), "images": str(images), "image_labels": str(labels)}
    src = {"class_descriptions": str(cls), "splits": splits}
    if release != "v2":
        src["hierarchy"] = str(HIERARCHY)
    return src


def make_cfg(source: dict, out: str, **selection) -> Config:
    sel = {"classes": ["Vehicle", "human hand", FOOT], "include_subclasses": True, **selection}
    if "hierarchy" not in source and sel.get("include_subclasses"):
        source = {**source, "hierarchy": str(HIERARCHY)}
    return Config.model_validate(
        {"source": source, "selection": sel, "output": {"url": out}, "shards": {"images_per_shard": 150}}
    )


def read_plan(out: str, storage: Storage | None = None) -> dict[str, pa.Table]:
    st = storage or Storage()
    plan_url = f"{out.rstrip('/')}/plan" if "://" in out else f"file://{out}/plan"
    man = planio.read_manifest(st, plan_url)
    tables = {}
    for split, sm in man.splits.items():
        parts = [planio.read_plan_table(st, f"{plan_url}/{p}") for p in sm.shards]
        t = pa.concat_tables(parts)
        tables[split] = t.sort_by("image_id")
    return tables


def _strip(rows: list[dict], drop_rotation: bool, drop_attrs: bool) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        if drop_rotation:
            r.pop("rotation")
        if drop_attrs:
            r["boxes"] = [{k: v for k, v in b.items() if not k.startswith("is_")} for b in r["boxes"]]
        out.append(r)
    return out


# --------------------------------------------------------------------------- tests


def test_every_release_layout_gives_the_same_plan(tmp_path):
    content = make_content()
    plans = {}
    for release in ("v2", "v4", "v6", "v7"):
        src = write_release(tmp_path / release, content, release)
        build_plan(make_cfg(src, str(tmp_path / f"out-{release}")))
        plans[release] = read_plan(str(tmp_path / f"out-{release}"))
    ref = plans["v6"]
    assert ref["train"].num_rows > 0 and ref["validation"].num_rows > 0
    for release in ("v4", "v7"):
        for split in ref:
            assert plans[release][split].to_pylist() == ref[split].to_pylist(), (release, split)
    # V2 lacks Rotation everywhere and box attributes in train (8 columns): compare the rest.
    for split in ref:
        got = plans["v2"][split].to_pylist()
        assert all(r["rotation"] is None for r in got)
        drop_attrs = split == "train"
        if drop_attrs:
            assert all(b["is_group_of"] == -1 for r in got for b in r["boxes"])
        assert _strip(got, True, drop_attrs) == _strip(ref[split].to_pylist(), True, drop_attrs)
    # The V6 plan keeps the attributes and rotations of the source.
    rows = ref["validation"].to_pylist()
    assert {b["is_occluded"] for r in rows for b in r["boxes"]} <= {-1, 0, 1}
    assert {r["rotation"] for r in rows} <= {None, 0, 90, 180, 270} and any(r["rotation"] == 90 for r in rows)


def _label_map_message_class():
    """A StringIntLabelMap-compatible message built at runtime (object_detection protos are not installed)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="oiod_test_label_map.proto", package="oiodtest", syntax="proto2"
    )
    item = fdp.message_type.add(name="StringIntLabelMapItem")
    F = descriptor_pb2.FieldDescriptorProto
    item.field.add(name="name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    item.field.add(name="id", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    item.field.add(name="display_name", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    lm = fdp.message_type.add(name="StringIntLabelMap")
    lm.field.add(
        name="item",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".oiodtest.StringIntLabelMapItem",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("oiodtest.StringIntLabelMap"))


def test_plan_contents_label_map_and_stats(tmp_path):
    from google.protobuf import text_format

    content = make_content()
    src = write_release(tmp_path / "v6", content, "v6")
    out = tmp_path / "out"
    res = build_plan(make_cfg(src, str(out)))
    hier = read_hierarchy(HIERARCHY.read_text(), "h")
    expected_mids = {VEHICLE, HAND, FOOT, *hier.descendants(VEHICLE)}

    msg = text_format.Parse((out / "label_map.pbtxt").read_text(), _label_map_message_class()())
    lm = {it.name: (it.id, it.display_name) for it in msg.item}
    assert [it.id for it in msg.item] == list(range(1, len(msg.item) + 1))
    assert set(lm) == expected_mids and lm[VEHICLE] == (1, "Vehicle")
    assert [it.name for it in msg.item][:2] == [VEHICLE, "/m/012n7d"]  # Vehicle, then subclasses in CSV order
    assert lm[HAND][1] == "Human hand"
    csv_rows = (out / "label_map.csv").read_text().splitlines()
    assert csv_rows[0] == "1,Vehicle" and len(csv_rows) == len(lm)

    plans = read_plan(str(out))
    stats = res.stats["splits"]
    for split, table in plans.items():
        rows = table.to_pylist()
        n = len(rows)
        sm = res.manifest.splits[split]
        assert sm.num_images == n == stats[split]["images"]
        assert sm.num_shards == planio.num_shards_for(n, 150)
        src_rows = [r for r in content["boxes"][split] if r["LabelName"] in expected_mids]
        assert sum(len(r["boxes"]) for r in rows) == len(src_rows) == stats[split]["boxes"] == sm.num_boxes
        assert {r["image_id"] for r in rows} == {r["ImageID"] for r in src_rows}
        assert [r["source_id"] for r in rows] == [source_id(r["image_id"]) for r in rows]
        index = {r["ImageID"]: r for r in content["images"][split]}
        for r in rows:
            assert r["shard"] == planio.shard_of(r["image_id"], sm.num_shards)
            assert r["bucket_key"] == f"{split}/{r['image_id']}.jpg" and r["split"] == split
            for b in r["boxes"]:
                assert b["mid"] in expected_mids and lm[b["mid"]][0] == b["label_id"]
            for lab in r["image_labels"]:
                assert lab["mid"] in expected_mids and lm[lab["mid"]][0] == lab["label_id"]
            ix = index.get(r["image_id"])
            if ix is None:
                assert r["original_url"] is None and r["rotation"] is None
            else:
                assert r["original_url"] == ix["OriginalURL"] and r["original_md5"] == ix["OriginalMD5"]
                assert r["original_size"] == int(ix["OriginalSize"])
                assert r["rotation"] == (int(float(ix["Rotation"])) if ix["Rotation"] else None)
        assert stats[split]["images_without_index_row"] == sum(r["image_id"] not in index for r in rows) > 0
        per_cls = stats[split]["classes"]
        for mid in expected_mids:
            assert per_cls[mid]["boxes"] == sum(b["mid"] == mid for r in rows for b in r["boxes"])
            assert per_cls[mid]["images"] == sum(any(b["mid"] == mid for b in r["boxes"]) for r in rows)
        assert stats[split]["malformed"] == {}
    assert (out / "plan" / "config.resolved.yaml").is_file()
    # Only the selection's classes appear in image-level labels (Person and Human face were in the file).
    all_labels = {lab["mid"] for t in plans.values() for r in t.to_pylist() for lab in r["image_labels"]}
    assert all_labels and all_labels <= expected_mids and PERSON not in all_labels


def test_rerun_is_identical_and_removes_stale_shards(tmp_path):
    src = write_release(tmp_path / "v4", make_content(), "v4")
    out = tmp_path / "out"
    cfg = make_cfg(src, str(out))
    build_plan(cfg)
    files = sorted(p for p in out.rglob("*") if p.is_file() and "metadata" not in p.parts)
    first = {p: p.read_bytes() for p in files}
    build_plan(cfg)
    assert {p: p.read_bytes() for p in files} == first
    cfg2 = cfg.model_copy(update={"shards": cfg.shards.model_copy(update={"images_per_shard": 1000})})
    res = build_plan(cfg2)
    assert sorted(p.name for p in (out / "plan" / "train").iterdir()) == ["shard-00000-of-00001.parquet"]
    assert res.manifest.splits["train"].shards == ["train/shard-00000-of-00001.parquet"]


def test_filters_caps_expansion(tmp_path):
    content = make_content()
    src = write_release(tmp_path / "v6", content, "v6")

    def plan(name: str, **sel) -> dict[str, list[dict]]:
        build_plan(make_cfg(src, str(tmp_path / name), **sel))
        return {k: v.to_pylist() for k, v in read_plan(str(tmp_path / name)).items()}

    base = plan("base")
    no_group = plan("nogroup", filters={"is_group_of": False})
    boxes = [b for r in no_group["train"] for b in r["boxes"]]
    assert boxes and all(b["is_group_of"] in (0, -1) for b in boxes)
    strict_group = plan("nogroup2", filters={"is_group_of": False, "drop_unknown": True})
    assert all(b["is_group_of"] == 0 for r in strict_group["train"] for b in r["boxes"])

    capped = plan("cap", max_images_per_class=3, seed=1)
    again = plan("cap-again", max_images_per_class=3, seed=1)
    other = plan("cap-seed", max_images_per_class=3, seed=2)
    assert capped == again
    assert [r["image_id"] for r in capped["train"]] != [r["image_id"] for r in other["train"]]
    for split, rows in capped.items():
        # Each class keeps at most 3 images chosen for it; an image chosen for one class keeps all its boxes.
        assert 0 < len(rows) < len(base[split])
    top = plan("max", max_images=5, seed=1)
    assert all(len(rows) == 5 for rows in top.values())

    # Expansion: selecting only Vehicle, a Car box also counts as Vehicle (and Land vehicle's ancestors).
    exp = plan("exp", classes=["Vehicle"], include_subclasses=False, expand_hierarchy=True)
    noexp = plan("noexp", classes=["Vehicle"], include_subclasses=False)
    n_vehicle_like = sum(
        r["LabelName"] in {VEHICLE, CAR, BOAT, AIRPLANE, LAND}
        for rows in content["boxes"].values()
        for r in rows
    )
    assert sum(len(r["boxes"]) for rows in exp.values() for r in rows) == n_vehicle_like
    assert sum(len(r["boxes"]) for rows in noexp.values() for r in rows) < n_vehicle_like
    assert {b["mid"] for rows in exp.values() for r in rows for b in r["boxes"]} == {VEHICLE}


def test_malformed_rows_are_counted_by_reason(tmp_path):
    cols = BOX_LAYOUTS["v4"]
    good = ["0123456789abcdef", "xclick", CAR, "1", "0.1", "0.5", "0.2", "0.6", "0", "0", "0", "0", "0"]
    bad_rows = {
        "missing_fields": good[:6],
        "extra_fields": good + ["7"],
        "non_numeric": good[:4] + ["abc"] + good[5:],
        "out_of_range": good[:4] + ["1.5"] + good[5:],
        "min_greater_than_max": good[:4] + ["0.9", "0.5"] + good[6:],
        "unknown_mid": good[:2] + ["/m/notaclass"] + good[3:],
        "bad_image_id": ["xyz"] + good[1:],
        "bad_attribute": good[:8] + ["7"] + good[9:],
    }
    lines = [",".join(cols)]
    where = {}
    for k, (reason, row) in enumerate(bad_rows.items()):
        lines.append(",".join([f"{k:016x}"] + good[1:]))  # distinct: exact duplicates count as one box
        lines.append(",".join(row))
        where[reason] = len(lines)
    lines.append(",".join(good))
    d = tmp_path / "m"
    d.mkdir()
    (d / "boxes.csv").write_text("\n".join(lines) + "\n")
    src = {"class_descriptions": str(CLASSES), "splits": {"train": {"boxes": str(d / "boxes.csv")}}}
    res = build_plan(make_cfg(src, str(tmp_path / "out"), classes=["Car"], include_subclasses=False))
    mal = res.stats["splits"]["train"]["malformed"]
    assert {r: v["count"] for r, v in mal.items()} == {r: 1 for r in bad_rows}
    for reason, line in where.items():
        assert mal[reason]["examples"][0].startswith(f"{d / 'boxes.csv'}:{line}: "), (reason, mal[reason])
    assert res.manifest.splits["train"].num_boxes == len(bad_rows) + 1
    with pytest.raises(
        DataError, match=rf"boxes\.csv:{where['missing_fields']}: malformed row \(missing_fields\)"
    ):
        build_plan(
            make_cfg(src, str(tmp_path / "out2"), classes=["Car"], include_subclasses=False, strict=True)
        )
    # Strict mode stops at the first value error too (the earliest line, whatever the reason).
    src2 = dict(src, splits={"train": {"boxes": str(d / "b2.csv")}})
    (d / "b2.csv").write_text(
        "\n".join(
            [lines[0], ",".join(good), ",".join(bad_rows["out_of_range"]), ",".join(bad_rows["bad_image_id"])]
        )
        + "\n"
    )
    with pytest.raises(DataError, match=r"b2\.csv:3: malformed row \(out_of_range\)"):
        build_plan(
            make_cfg(src2, str(tmp_path / "out3"), classes=["Car"], include_subclasses=False, strict=True)
        )


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run(
        [sys.executable, "-m", "openimages_od", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _yaml_cfg(path: Path, src: dict, out: Path, classes: list[str]) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "source": src,
                "selection": {"classes": classes, "include_subclasses": True},
                "output": {"url": str(out)},
            }
        )
    )
    return path


def test_cli_plan_end_to_end_and_unknown_class(tmp_path):
    src = write_release(tmp_path / "v6", make_content(), "v6")
    cfg = _yaml_cfg(tmp_path / "c.yaml", src, tmp_path / "out", ["Vehicle"])
    proc = _cli("plan", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "classes" in proc.stdout
    assert (tmp_path / "out" / "plan" / "manifest.json").is_file()
    assert (tmp_path / "out" / "label_map.pbtxt").read_text().startswith('item {\n  name: "/m/07yv9"')

    bad = _yaml_cfg(tmp_path / "bad.yaml", src, tmp_path / "out2", ["Vehicel", "Car"])
    proc = _cli("plan", "-c", str(bad))
    assert proc.returncode == 2
    assert "unknown class 'Vehicel'" in proc.stderr and "did you mean 'Vehicle'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out2" / "plan" / "manifest.json").exists()


@pytest.mark.integration
def test_http_inputs_are_cached_and_give_the_same_plan(tmp_path, image_server):
    content = make_content()
    src = write_release(tmp_path / "v6", content, "v6")
    build_plan(make_cfg(src, str(tmp_path / "local")))

    def serve(path: str) -> str:
        return image_server.add("meta/" + Path(path).name, Path(path).read_bytes(), content_type="text/csv")

    remote = {
        "class_descriptions": serve(src["class_descriptions"]),
        "hierarchy": serve(src["hierarchy"]),
        "splits": {
            s: {
                k: image_server.add(f"meta/{s}/{Path(v).name}", Path(v).read_bytes(), content_type="text/csv")
                for k, v in d.items()
            }
            for s, d in src["splits"].items()
        },
    }
    out = tmp_path / "http"
    cfg = make_cfg(remote, str(out))
    build_plan(cfg)
    assert read_plan(str(out)) == read_plan(str(tmp_path / "local"))
    cached = sorted(p.relative_to(out / "metadata") for p in (out / "metadata").rglob("*.csv"))
    assert len(cached) == 1 + 3 * 2
    hits = dict(image_server.hits)
    build_plan(cfg)  # a rerun reads the cache, not the server
    assert dict(image_server.hits) == hits


@pytest.mark.integration
def test_s3_inputs_and_output(tmp_path, seaweedfs, s3_bucket, s3_options):
    content = make_content()
    src = write_release(tmp_path / "v4", content, "v4")
    build_plan(make_cfg(src, str(tmp_path / "local")))
    st = Storage(s3=s3_options)

    def up(path: str) -> str:
        url = f"s3://{s3_bucket}/oid/{Path(path).parent.name}/{Path(path).name}"
        st.upload_file(path, url)
        return url

    remote = {
        "class_descriptions": up(src["class_descriptions"]),
        "hierarchy": up(src["hierarchy"]),
        "splits": {s: {k: up(v) for k, v in d.items()} for s, d in src["splits"].items()},
        "s3": s3_options.model_dump(),
    }
    # Local output: inputs cached under {output}/metadata/.
    out = tmp_path / "from-s3"
    cfg = make_cfg(remote, str(out))
    cfg.output.s3 = s3_options
    build_plan(cfg, st)
    assert read_plan(str(out)) == read_plan(str(tmp_path / "local"))
    assert (out / "metadata" / "s3" / s3_bucket / "oid" / "v4" / "train-annotations-bbox.csv").is_file()
    # s3 output: a copy of every input is kept under {output}/metadata/.
    out_url = f"s3://{s3_bucket}/runs/one"
    cfg2 = make_cfg(remote, out_url)
    cfg2.output.s3 = s3_options
    build_plan(cfg2, st)
    assert read_plan(out_url, st) == read_plan(str(tmp_path / "local"))
    meta = [o.url for o in st.list(out_url + "/metadata/")]
    assert f"{out_url}/metadata/s3/{s3_bucket}/oid/v4/train-annotations-bbox.csv" in meta
    assert st.exists(f"{out_url}/label_map.pbtxt") and st.exists(f"{out_url}/plan/stats.json")


def test_v2_trainable_only_label_map(tmp_path):
    src = write_release(tmp_path / "v2", make_content(), "v2")
    src["trainable_classes"] = str(DATA / "oid_bbox_trainable_label_map.pbtxt")
    cfg = Config.model_validate(
        {"source": src, "selection": {"trainable_only": True}, "output": {"url": str(tmp_path / "out")}}
    )
    res = build_plan(cfg)
    assert res.manifest.num_classes == 545 == len(res.label_map)
    order = [ln.split(",")[0] for ln in CLASSES.read_text().splitlines()]
    mids = [c.mid for c in res.label_map]
    assert mids == sorted(mids, key=order.index)  # class-descriptions order
    rows = read_plan(str(tmp_path / "out"))["train"].to_pylist()
    assert rows and all(r["rotation"] is None for r in rows)
    assert {b["mid"] for r in rows for b in r["boxes"]} <= set(mids)
