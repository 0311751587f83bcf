"""The plan's fast paths give exactly what the streaming pyarrow reader gives.

``iter_rows_fast`` / ``select_rows_fast`` (polars, streaming) are tried first for box and image-label
CSVs; ``CsvStream`` is the reference. Here both run on the same files and must
give the same plan, the same malformed-row counts and the same ``file:line``
examples; structural damage must make the fast path step aside.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_plan import CAR, make_cfg, make_content, read_plan, write_release

from openimages_od.openimages import formats, planio, readboxes, readimages
from openimages_od.openimages.formats import (
    BOX_LAYOUTS,
    FastPathUnavailable,
    detect_layout,
    iter_rows_fast,
    select_rows_fast,
)
from openimages_od.openimages.idkeys import IdSet
from openimages_od.openimages.ids import source_ids
from openimages_od.openimages.plan import build_plan
from openimages_od.openimages.planwrite import bucket_keys, shards_and_source_ids

BOX_COLS = ["ImageID", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax"]


def _plan(tmp_path, src, name, monkeypatch, engine, **sel):
    if engine == "pyarrow":  # the reference: every CSV through CsvStream

        def unavailable(*a, **k):
            raise FastPathUnavailable("test")
            yield  # a generator, like iter_rows_fast

        monkeypatch.setattr(readimages, "select_rows_fast", lambda *a, **k: None)
        monkeypatch.setattr(readboxes, "iter_rows_fast", unavailable)
    else:  # small groups, so checks run group by group
        monkeypatch.setattr(readboxes, "iter_rows_fast", functools.partial(iter_rows_fast, group_batches=1))
    res = build_plan(make_cfg(src, str(tmp_path / name), **sel))
    monkeypatch.undo()
    return res, read_plan(str(tmp_path / name))


@pytest.mark.parametrize("release", ["v4", "v6"])
def test_fast_path_gives_the_same_plan_and_errors(tmp_path, monkeypatch, release):
    content = make_content()
    src = write_release(tmp_path / "rel", content, release)
    # Value errors and an exact duplicate spread through the train boxes (all found by value checks).
    boxes = tmp_path / "rel" / "train-annotations-bbox.csv"
    lines = boxes.read_text().splitlines()
    car = next(i for i, ln in enumerate(lines) if f",{CAR}," in ln)
    bad = lines[car].split(",")
    extra = [
        ",".join(bad[:4] + ["abc"] + bad[5:]),
        ",".join(bad[:4] + ["1.5"] + bad[5:]),
        ",".join(["xyz"] + bad[1:]),
        ",".join(bad[:2] + ["/m/notaclass"] + bad[3:]),
        lines[car],
    ]
    for k, row in enumerate(extra):
        lines.insert(len(lines) // (k + 2), row)
    boxes.write_text("\n".join(lines) + "\n")
    fast, t_fast = _plan(tmp_path, src, "fast", monkeypatch, "polars")
    slow, t_slow = _plan(tmp_path, src, "slow", monkeypatch, "pyarrow")
    for split in t_slow:
        assert t_fast[split].equals(t_slow[split]), split
    for split in slow.stats["splits"]:
        assert fast.stats["splits"][split] == slow.stats["splits"][split]
    mal = fast.stats["splits"]["train"]["malformed"]
    assert {"non_numeric", "out_of_range", "bad_image_id", "unknown_mid", "duplicate_box"} <= set(mal)


@pytest.mark.parametrize(
    "damage",
    [
        "0123456789abcdef,xclick",  # too few fields
        "",  # a blank line
        "0123456789abcdef,xclick,/m/0k4j,1,0.1,0.5,0.2,0.6,0,0,0,0,0,7",  # too many fields
    ],
)
def test_fast_path_steps_aside_on_structural_damage(tmp_path, damage):
    good = "0123456789abcdef,xclick,/m/0k4j,1,0.1,0.5,0.2,0.6,0,0,0,0,0"
    p = tmp_path / "b.csv"
    p.write_text("\n".join([",".join(BOX_LAYOUTS["v4"]), good, damage, good]) + "\n")
    lay = detect_layout(p, "boxes", "b.csv")
    assert select_rows_fast(p, lay, BOX_COLS, "b.csv", [CAR], None) is None
    p.write_text("\n".join([",".join(BOX_LAYOUTS["v4"]), good, good]) + "\n")
    rows, lines, total = select_rows_fast(p, lay, BOX_COLS, "b.csv", [CAR], None)
    assert rows.num_rows == 2 and list(lines.lines) == [2, 3] and total == 2


def test_fast_path_lines(tmp_path):
    cols = BOX_LAYOUTS["v4"]
    rows = [
        f"{k:016x},xclick,{CAR if k % 7 == 0 else '/m/019jd'},1,0.1,0.5,0.2,0.6,0,0,0,0,0" for k in range(500)
    ]
    p = tmp_path / "b.csv"
    p.write_text(",".join(cols) + "\n" + "\n".join(rows))  # no final newline
    got = select_rows_fast(p, detect_layout(p, "boxes", "b.csv"), BOX_COLS, "b.csv", [CAR], None)
    rows_b, lines, total = got
    assert total == 500
    assert list(lines.lines) == [k + 2 for k in range(500) if k % 7 == 0]
    assert rows_b.column("ImageID").to_pylist() == [f"{k:016x}" for k in range(500) if k % 7 == 0]


def test_quoted_box_file_uses_the_exact_reader(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text('"' + '","'.join(BOX_LAYOUTS["v4"]) + '"\n')
    assert select_rows_fast(p, detect_layout(p, "boxes", "b.csv"), BOX_COLS, "b.csv", [CAR], None) is None


def test_id_set_matches_is_in():
    rng = np.random.default_rng(3)
    ids = [f"{k:016x}" for k in rng.integers(0, 2**63, 3000).tolist()]
    batch = pa.array(ids[500:2500] + ["abcdef0123456789", "ABCDEF0123456789", "xyz", "", "zzzzzzzzzzzzzzzz"])
    for wanted in (
        pa.array(ids[:1500] + ["ABCDEF0123456789"]),
        pa.array(ids[:1500] + ["abcdef0123456789", "ABCDEF0123456789"]),  # same key: exact fallback
        pa.array([], pa.string()),
    ):
        want = pc.is_in(batch, value_set=wanted).to_numpy(zero_copy_only=False)
        assert (IdSet(wanted).contains(batch) == want).all()


def test_one_hash_gives_shard_and_source_id():
    ids = [f"{k:016x}" for k in np.random.default_rng(4).integers(0, 2**63, 2000).tolist()]
    shard, src = shards_and_source_ids(ids, 13)
    assert shard.tolist() == [planio.shard_of(i, 13) for i in ids]
    assert src.tolist() == source_ids(ids).tolist()
    assert bucket_keys("{split}/{image_id}.jpg", "train", pa.array(ids[:3]), ids[:3]).to_pylist() == [
        f"train/{i}.jpg" for i in ids[:3]
    ]
    assert bucket_keys("{image_id}/{split}/{image_id}", "v", pa.array(ids[:1]), ids[:1]).to_pylist() == [
        f"{ids[0]}/v/{ids[0]}"
    ]
    assert formats.RowLines("x", np.array([5, 9])).line_of(1) == 9
