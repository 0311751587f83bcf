"""``selection.image_ids`` and ``selection.keep_all_labels`` on a generated Open Images dataset.

The dataset (:func:`openimages_od.synth.generate_dataset`) has real MIDs (Ball, Traffic sign,
Window), the real class descriptions and box hierarchy, boxes, image-level labels and an index.
Every expectation is checked against a plan of the same data without the option.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError
from test_plan import read_plan

from openimages_od.config import Config
from openimages_od.errors import ConfigError, DataError
from openimages_od.openimages.classes import read_hierarchy
from openimages_od.openimages.idlist import parse_image_ids
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.openimages.plan import build_plan
from openimages_od.synth import generate_dataset
from openimages_od.training.oid_metric import hierarchy_from_json

BALL, SIGN, WINDOW = "/m/018xm", "/m/01mqdt", "/m/0d4v4"
SPORTS_EQUIPMENT = "/m/05y5lj"  # Ball's parent in the box hierarchy
UNKNOWN_IDS = ["ffffffffffffff00", "ffffffffffffff01"]  # well formed, in no split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection") / "oid"
    return generate_dataset(root, 80, min_side=32, max_side=48, seed=11)


def _plan(ds, out: Path, **selection):
    cfg = Config.model_validate(
        {
            "source": ds.source_config(),
            "selection": selection,
            "output": {"url": str(out)},
            "shards": {"images_per_shard": 16},
        }
    )
    return build_plan(cfg), read_plan(str(out))


def _rows(tables: dict[str, pa.Table]) -> dict[str, dict]:
    """Plan rows by ImageID, without the shard number (it depends on the number of shards)."""
    return {
        r["image_id"]: {k: v for k, v in r.items() if k != "shard"}
        for t in tables.values()
        for r in t.to_pylist()
    }


def _shard_digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "plan").rglob("*.parquet"))
    }


def _box_key(b: dict) -> tuple:
    return (b["mid"], b["xmin"], b["xmax"], b["ymin"], b["ymax"])


def _pick_ids(ds, n_per_split: int) -> list[str]:
    out: list[str] = []
    for split in ("train", "validation"):
        out += [im.image_id for im in ds.split_images(split) if im.boxes][:n_per_split]
    return out


# --------------------------------------------------------------------------- image_ids


def test_image_ids_list_restricts_every_split(dataset, tmp_path):
    full = _rows(_plan(dataset, tmp_path / "full")[1])
    listed = _pick_ids(dataset, 6)
    res, tables = _plan(dataset, tmp_path / "ids", image_ids=listed + UNKNOWN_IDS)
    got = _rows(tables)
    assert sorted(got) == sorted(listed)
    # Exactly the rows the unrestricted plan has for those images (boxes, labels, index columns).
    for image_id, row in got.items():
        assert row == full[image_id]
    for split in ("train", "validation"):
        in_split = {im.image_id for im in dataset.split_images(split)}
        assert set(tables[split].column("image_id").to_pylist()) == set(listed) & in_split
        assert res.stats["splits"][split]["boxes_outside_image_ids"] > 0
    doc = res.stats["image_ids"]
    assert doc["listed"] == len(listed) + 2
    assert doc["unmatched"] == 2 and doc["unmatched_ids"] == UNKNOWN_IDS
    assert doc["source"] == "selection.image_ids"


def test_image_ids_file_forms_give_the_same_plan(dataset, tmp_path):
    listed = _pick_ids(dataset, 4)
    _plan(dataset, tmp_path / "list", image_ids=listed)
    text = tmp_path / "ids.txt"
    text.write_text(
        "# chosen by hand\n\n" + "\n".join(f"{i}   # image {k}" for k, i in enumerate(listed)) + "\n\n"
    )
    res_txt, _ = _plan(dataset, tmp_path / "txt", image_ids=str(text))
    table = tmp_path / "ids.csv"  # an Open Images style CSV: the ImageID column is used
    table.write_text(
        "Source,ImageID,LabelName\n"
        + "".join(f"xclick,{i},/m/0\n" for i in reversed(listed))
        + f"xclick,{listed[0]},/m/1\n"  # repeated ids are one
    )
    _plan(dataset, tmp_path / "csv", image_ids=f"file://{table}")
    ref = _shard_digests(tmp_path / "list")
    assert ref and _shard_digests(tmp_path / "txt") == ref == _shard_digests(tmp_path / "csv")
    assert res_txt.stats["image_ids"]["source"] == str(text)
    assert res_txt.stats["image_ids"]["unmatched"] == 0
    # Determinism: the same file planned again writes the same bytes.
    _plan(dataset, tmp_path / "txt2", image_ids=str(text))
    assert _shard_digests(tmp_path / "txt2") == ref


def test_image_ids_errors_name_file_and_line(dataset, tmp_path):
    bad = tmp_path / "ids.txt"
    bad.write_text("# header comment\n0123456789abcdef\n0123456789abcdeg\n\nnot-an-id # x\n")
    with pytest.raises(DataError) as err:
        _plan(dataset, tmp_path / "out", image_ids=str(bad))
    msg = str(err.value)
    assert f"{bad}:3: '0123456789abcdeg'" in msg and f"{bad}:5: 'not-an-id'" in msg
    assert "2 line(s)" in msg
    assert not (tmp_path / "out" / "plan" / "manifest.json").exists()
    with pytest.raises(DataError, match=r"ids\.csv:1: a CSV header without an ImageID column"):
        parse_image_ids("Source,ImageId\nx,0123456789abcdef\n", "ids.csv")
    with pytest.raises(DataError, match=r"ids\.csv:3"):  # a row without its ImageID
        parse_image_ids("ImageID,Source\n0123456789abcdef,x\n,x\n", "ids.csv")
    with pytest.raises(ValidationError, match=r"item 1: 'xyz' is not an ImageID"):
        Config.model_validate({"selection": {"image_ids": ["0123456789abcdef", "xyz"]}})
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=f"selection.image_ids: {missing} not found"):
        _plan(dataset, tmp_path / "out2", image_ids=str(missing))


def test_image_ids_with_classes_is_the_intersection(dataset, tmp_path):
    balls = _rows(_plan(dataset, tmp_path / "balls", classes=["Ball"])[1])
    listed = _pick_ids(dataset, 10)
    res, tables = _plan(dataset, tmp_path / "both", classes=["Ball"], image_ids=listed)
    got = _rows(tables)
    assert got and sorted(got) == sorted(set(listed) & set(balls))
    assert all(got[i] == balls[i] for i in got)
    # Every listed image has a Ball image-level label (verified present or absent), so all are
    # found; without the labels file, those without a Ball box are reported unmatched.
    assert res.stats["image_ids"]["unmatched"] == 0
    src = dataset.source_config()
    for split in src["splits"].values():
        del split["image_labels"]
    cfg = Config.model_validate(
        {
            "source": src,
            "selection": {"classes": ["Ball"], "image_ids": listed},
            "output": {"url": str(tmp_path / "nolabels")},
        }
    )
    doc = build_plan(cfg).stats["image_ids"]
    without_ball = sorted(set(listed) - set(balls))
    assert without_ball and doc["unmatched"] == len(without_ball) and doc["unmatched_ids"] == without_ball
    assert [c.mid for c in res.label_map] == [BALL]


# --------------------------------------------------------------------------- keep_all_labels


def test_keep_all_labels_keeps_every_box_and_grows_the_label_map(dataset, tmp_path):
    everything = _rows(_plan(dataset, tmp_path / "all")[1])
    only = _rows(_plan(dataset, tmp_path / "only", classes=["Ball"])[1])
    res, tables = _plan(dataset, tmp_path / "keep", classes=["Ball"], keep_all_labels=True)
    got = _rows(tables)
    assert sorted(got) == sorted(only)  # images are chosen by the selected class only
    lm = res.label_map
    # Ball keeps id 1; the other classes found are appended in class-descriptions order.
    assert (lm.classes[0].id, lm.classes[0].mid) == (1, BALL)
    assert {c.mid for c in lm} == {BALL, SIGN, WINDOW}
    descriptions = [ln.split(",")[0] for ln in Path(dataset.source_config()["class_descriptions"]).open()]
    extra = [c.mid for c in lm.classes[1:]]
    assert extra == sorted(extra, key=descriptions.index) and [c.id for c in lm.classes[1:]] == [2, 3]
    others = 0
    for image_id, row in got.items():
        ref = everything[image_id]
        assert sorted(map(_box_key, row["boxes"])) == sorted(map(_box_key, ref["boxes"]))
        for b in row["boxes"]:
            assert b["label_id"] == lm.by_mid[b["mid"]].id
        others += sum(b["mid"] != BALL for b in row["boxes"])
        # Image-level labels stay those of the selected classes.
        assert {x["mid"] for x in row["image_labels"] or []} <= {BALL}
    assert others > 0
    st = res.stats["splits"]["train"]
    assert st["other_classes"] == 2 and set(st["classes"]) == {BALL, SIGN, WINDOW}
    assert st["boxes"] == sum(len(everything[i]["boxes"]) for i in tables["train"]["image_id"].to_pylist())
    assert (tmp_path / "keep" / "label_map.pbtxt").read_text() == lm.to_pbtxt()


def test_keep_all_labels_respects_filters_and_is_deterministic(dataset, tmp_path):
    _, tables = _plan(
        dataset, tmp_path / "a", classes=["Window"], keep_all_labels=True, filters={"is_group_of": False}
    )
    boxes = [b for t in tables.values() for r in t.to_pylist() for b in r["boxes"]]
    assert boxes and all(b["is_group_of"] != 1 for b in boxes)
    assert {b["mid"] for b in boxes} - {WINDOW}
    _plan(dataset, tmp_path / "b", classes=["Window"], keep_all_labels=True, filters={"is_group_of": False})
    assert _shard_digests(tmp_path / "a") == _shard_digests(tmp_path / "b")
    assert (tmp_path / "a" / "label_map.pbtxt").read_text() == (
        tmp_path / "b" / "label_map.pbtxt"
    ).read_text()


def test_keep_all_labels_ids_follow_pinned_and_previous_maps(dataset, tmp_path):
    pinned = tmp_path / "pinned.pbtxt"
    pinned.write_text(LabelMap.from_mids([SIGN, "/m/0k4j", BALL], {}).to_pbtxt())  # Window not there
    res, _ = _plan(dataset, tmp_path / "pin", classes=["Ball"], keep_all_labels=True, label_map=str(pinned))
    ids = {c.mid: c.id for c in res.label_map}
    assert ids == {BALL: 3, SIGN: 1, WINDOW: 4}  # Window appended after the highest pinned id
    # Re-planning an output keeps every id: Window was first, so it stays 1.
    out = tmp_path / "replan"
    _plan(dataset, out, classes=["Window"])
    res2, _ = _plan(dataset, out, classes=["Ball"], keep_all_labels=True)
    ids2 = {c.mid: c.id for c in res2.label_map}
    assert ids2[WINDOW] == 1 and ids2[BALL] == 2 and ids2[SIGN] == 3
    assert res2.stats["removed_classes"] == []


def test_keep_all_labels_hierarchy_matches_the_evaluation(dataset, tmp_path):
    """With expand_hierarchy, every box counts for each ancestor in the label map, as the
    evaluation expands ground truth over the label map: the plan's boxes are closed under it."""
    res, tables = _plan(
        dataset, tmp_path / "h", classes=["Window"], keep_all_labels=True, expand_hierarchy=True
    )
    lm = res.label_map
    assert SPORTS_EQUIPMENT in lm.by_mid  # reached through Ball boxes
    tree_path = Path(dataset.source_config()["hierarchy"])

    h = hierarchy_from_json(json.loads(tree_path.read_text()), {c.mid: c.id for c in lm})
    hier = read_hierarchy(tree_path.read_text(), str(tree_path))
    assert lm.by_mid[SPORTS_EQUIPMENT].id in h.up(lm.by_mid[BALL].id)
    checked = 0
    for t in tables.values():
        for row in t.to_pylist():
            have = {(b["label_id"], b["xmin"], b["xmax"], b["ymin"], b["ymax"]) for b in row["boxes"]}
            for label, *xy in have:
                for anc in h.up(label):
                    assert (anc, *xy) in have
                    checked += 1
            assert all(
                {a for a in hier.ancestors(b["mid"]) if a in lm.by_mid} <= {c.mid for c in lm}
                for b in row["boxes"]
            )
    assert checked > 0


def test_keep_all_labels_needs_the_class_list(dataset, tmp_path):
    src = dataset.source_config()
    del src["class_descriptions"], src["hierarchy"]
    cfg = Config.model_validate(
        {
            "source": src,
            "selection": {"classes": [BALL], "keep_all_labels": True},
            "output": {"url": str(tmp_path / "o")},
        }
    )
    with pytest.raises(ConfigError, match="keep_all_labels needs"):
        build_plan(cfg)


def test_keep_all_labels_on_reference_metadata_with_trainable_only(tmp_path):
    """The real class files and a real box sample (tests/data/openimages): with trainable_only the
    other classes kept are V2-trainable ones, and every trainable box of a chosen image is kept."""
    data = Path(__file__).resolve().parent / "data" / "openimages"
    boxes_csv = data / "sample_sysaster_test-annotations-bbox_first2000lines.csv"
    trainable = {
        ln.split('"')[1] for ln in (data / "oid_bbox_trainable_label_map.pbtxt").open() if "name:" in ln
    }
    cfg = Config.model_validate(
        {
            "source": {
                "class_descriptions": str(data / "class-descriptions-boxable.csv"),
                "trainable_classes": str(data / "oid_bbox_trainable_label_map.pbtxt"),
                "splits": {"test": {"boxes": str(boxes_csv)}},
            },
            "selection": {"classes": ["/m/0dzf4"], "trainable_only": True, "keep_all_labels": True},
            "output": {"url": str(tmp_path / "out")},
        }
    )
    res = build_plan(cfg)
    rows = _rows(read_plan(str(tmp_path / "out")))
    by_image: dict[str, list[str]] = {}
    for ln in boxes_csv.read_text().splitlines()[1:]:
        f = ln.split(",")
        by_image.setdefault(f[0], []).append(f[2])
    chosen = {i for i, mids in by_image.items() if "/m/0dzf4" in mids}
    assert set(rows) == chosen
    for image_id, row in rows.items():
        assert sorted(b["mid"] for b in row["boxes"]) == sorted(
            m for m in by_image[image_id] if m in trainable
        )
    extra = [c.mid for c in res.label_map.classes[1:]]
    assert extra and set(extra) <= trainable
    assert set(by_image) != chosen  # the sample has images the selection leaves out


def test_image_ids_file_by_http_url(dataset, tmp_path, image_server):
    """An id list at an http(s) URL goes through the storage layer (and the metadata cache)."""
    listed = _pick_ids(dataset, 3)
    _plan(dataset, tmp_path / "list", image_ids=listed)
    url = image_server.add("lists/ids.txt", ("\n".join(listed) + "\n").encode(), content_type="text/plain")
    res, _ = _plan(dataset, tmp_path / "http", image_ids=url)
    assert _shard_digests(tmp_path / "http") == _shard_digests(tmp_path / "list")
    assert res.stats["image_ids"] == {
        "source": url,
        "listed": len(listed),
        "unmatched": 0,
        "unmatched_ids": [],
    }
    assert list((tmp_path / "http" / "metadata").rglob("ids.txt"))  # downloaded once, kept
