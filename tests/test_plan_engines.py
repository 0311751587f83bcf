"""The plan's fast paths give exactly what the streaming pyarrow reader gives.

``iter_rows_fast`` / ``select_rows_fast`` are tried first for box and image-label CSVs, with two
engines: the compiled line scanner (:mod:`.linescan`, big files) and polars (streaming);
``CsvStream`` is the reference. Here they run on the same files and must give the same plan, the
same malformed-row counts and the same ``file:line`` examples; structural damage must make the
fast path step aside. The scanner runs with tiny blocks here, so block edges fall everywhere.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_plan import CAR, make_cfg, make_content, read_plan, write_release

from openimages_od.errors import DataError
from openimages_od.openimages import (
    assemble,
    csvstream,
    fastcsv,
    linescan,
    planio,
    planwrite,
    readboxes,
    readimages,
)
from openimages_od.openimages.fastcsv import FastPathUnavailable, iter_rows_fast, select_rows_fast
from openimages_od.openimages.formats import BOX_LAYOUTS, detect_layout
from openimages_od.openimages.idkeys import IdSet
from openimages_od.openimages.ids import source_ids
from openimages_od.openimages.plan import build_plan
from openimages_od.openimages.planwrite import bucket_keys, shards_and_source_ids

BOX_COLS = ["ImageID", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax"]
FAST_ENGINES = ["polars", "scan"]


def use_engine(mp: pytest.MonkeyPatch, engine: str) -> None:
    """Make ``iter_rows_fast`` take ``engine`` whatever the file size (the scanner in blocks of a
    line or so, with reads that often stop short of a line's end)."""
    if engine == "scan":
        mp.setattr(linescan, "SCAN_MIN_BYTES", 0)
        mp.setattr(linescan, "BLOCK_BYTES", 61)
        mp.setattr(linescan, "_SLACK", 7)
    else:
        mp.setattr(linescan, "SCAN_MIN_BYTES", 1 << 62)


@pytest.fixture(params=FAST_ENGINES)
def fast_engine(request, monkeypatch):
    use_engine(monkeypatch, request.param)
    return request.param


def _plan(tmp_path, src, name, monkeypatch, engine, **sel):
    if engine == "pyarrow":  # the reference: every CSV through CsvStream

        def unavailable(*a, **k):
            raise FastPathUnavailable("test")
            yield  # a generator, like iter_rows_fast

        monkeypatch.setattr(readimages, "select_rows_fast", lambda *a, **k: None)
        monkeypatch.setattr(readboxes, "iter_rows_fast", unavailable)
    else:  # small groups, so checks run group by group
        use_engine(monkeypatch, engine)
        monkeypatch.setattr(readboxes, "iter_rows_fast", functools.partial(iter_rows_fast, group_batches=1))
    res = build_plan(make_cfg(src, str(tmp_path / name), **sel))
    monkeypatch.undo()
    return res, read_plan(str(tmp_path / name))


@pytest.mark.parametrize("engine", FAST_ENGINES)
@pytest.mark.parametrize("release", ["v4", "v6"])
def test_fast_path_gives_the_same_plan_and_errors(tmp_path, monkeypatch, release, engine):
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
    fast, t_fast = _plan(tmp_path, src, "fast", monkeypatch, engine)
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
        "0123456789abcdef,xclick,/m/019jd,1,0.1,0.5,0.2,0.6,0,0,0,0,0,7",  # the same, a class not kept
    ],
)
def test_fast_path_steps_aside_on_structural_damage(tmp_path, damage, fast_engine):
    good = "0123456789abcdef,xclick,/m/0k4j,1,0.1,0.5,0.2,0.6,0,0,0,0,0"
    p = tmp_path / "b.csv"
    p.write_text("\n".join([",".join(BOX_LAYOUTS["v4"]), good, damage, good]) + "\n")
    lay = detect_layout(p, "boxes", "b.csv")
    assert select_rows_fast(p, lay, BOX_COLS, "b.csv", [CAR], None) is None
    p.write_text("\n".join([",".join(BOX_LAYOUTS["v4"]), good, good]) + "\n")
    rows, lines, total = select_rows_fast(p, lay, BOX_COLS, "b.csv", [CAR], None)
    assert rows.num_rows == 2 and list(lines.lines) == [2, 3] and total == 2


def test_fast_path_lines(tmp_path, fast_engine):
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
    assert csvstream.RowLines("x", np.array([5, 9])).line_of(1) == 9


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.text(max_size=70), max_size=40))
def test_compiled_blake2b_is_hashlibs(ids):
    """The compiled shard hash is hashlib's blake2b(digest_size=8) on every ID up to a block (any
    text; past 128 bytes it declines), and the column helper gives the list helper's answers."""
    import hashlib

    from openimages_od.openimages import idhash

    arr = pa.array(ids, pa.string())
    got = idhash.blake2b8_keys(arr)
    want = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids]
    if any(len(i.encode()) > idhash.MAX_BYTES for i in ids):
        assert got is None
    else:
        assert got is not None and got.tolist() == want
    if ids and len(set(ids)) == len(ids):
        sh, src = planwrite.shards_and_source_ids_of(arr, 7, compiled_min=0)
        sh_ref, src_ref = shards_and_source_ids(ids, 7)
        assert sh.tolist() == sh_ref.tolist() and src.tolist() == src_ref.tolist()


# --------------------------------------------------------------------------- property: any damage, same plan

_DAMAGES = {
    "short": lambda row: ",".join(row.split(",")[:-2]),
    "long": lambda row: row + ",7",
    "long_and_short": lambda row: row + ",7\n" + ",".join(row.split(",")[:-1]),  # commas balance out
    "blank": lambda row: "",
    "non_numeric": lambda row: ",".join(row.split(",")[:4] + ["abc"] + row.split(",")[5:]),
    "out_of_range": lambda row: ",".join(row.split(",")[:4] + ["1.5"] + row.split(",")[5:]),
    "bad_id": lambda row: ",".join(["xyz"] + row.split(",")[1:]),
    "unknown_class": lambda row: ",".join(row.split(",")[:2] + ["/m/notaclass"] + row.split(",")[3:]),
    "stray_quote": lambda row: row.replace(",", ',"', 1),
    "empty_id": lambda row: ",".join([""] + row.split(",")[1:]),
    "duplicate": lambda row: row + "\n" + row,
    "non_ascii": lambda row: row.replace(",", ",é", 1),  # valid UTF-8 past ASCII (any column 2)
    "non_ascii_class": lambda row: ",".join(row.split(",")[:2] + ["/m/é"] + row.split(",")[3:]),
}


def _plan_both(root, src, strict, **sel):
    """(outcome, tables) of the fast and the reference engine: outcome is the stats or the DataError."""
    out = []
    for engine in (*FAST_ENGINES, "pyarrow"):
        mp = pytest.MonkeyPatch()
        if engine == "pyarrow":

            def unavailable(*a, **k):
                raise FastPathUnavailable("test")
                yield

            mp.setattr(readimages, "select_rows_fast", lambda *a, **k: None)
            mp.setattr(readboxes, "iter_rows_fast", unavailable)
        else:
            use_engine(mp, engine)
            mp.setattr(readboxes, "iter_rows_fast", functools.partial(iter_rows_fast, group_batches=1))
        try:
            res = build_plan(make_cfg(src, str(root / engine), strict=strict, **sel))
            out.append((res.stats["splits"], read_plan(str(root / engine))))
        except DataError as exc:
            out.append((str(exc), None))
        finally:
            mp.undo()
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    release=st.sampled_from(["v2", "v4", "v6", "v7"]),
    edits=st.lists(st.tuples(st.sampled_from(sorted(_DAMAGES)), st.floats(0.0, 1.0)), min_size=0, max_size=4),
    bom=st.booleans(),
    crlf=st.booleans(),
    final_newline=st.booleans(),
    strict=st.booleans(),
)
def test_fast_path_equals_reference_on_damaged_files(release, edits, bom, crlf, final_newline, strict):
    """Whatever the damage, the fast engine gives the reference engine's plan, stats and file:line
    reasons (or the same strict-mode error)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = write_release(root / "rel", make_content(), release)
        boxes = root / "rel" / "train-annotations-bbox.csv"
        lines = boxes.read_text().splitlines()
        for name, where in edits:
            i = 1 + int(where * (len(lines) - 2))
            lines[i] = _DAMAGES[name](lines[i])
        eol = "\r\n" if crlf else "\n"
        text = eol.join("\n".join(lines).split("\n")) + (eol if final_newline else "")
        boxes.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
        *fast_engines, (slow, t_slow) = _plan_both(root, src, strict)
        for fast, t_fast in fast_engines:
            assert fast == slow
            if t_slow is not None:
                for split in t_slow:
                    assert t_fast[split].equals(t_slow[split]), split


@pytest.mark.parametrize("where", ["kept", "other"])
def test_invalid_utf8_gives_the_reference_plan(tmp_path, where):
    """A byte that is not UTF-8 in a kept row or in a row of another class: every engine gives the
    reference's plan and reasons (the scanner returns such rows and its parser steps aside)."""
    src = write_release(tmp_path / "rel", make_content(), "v6")
    boxes = tmp_path / "rel" / "train-annotations-bbox.csv"
    lines = boxes.read_bytes().split(b"\n")
    i = next(k for k, ln in enumerate(lines) if (f",{CAR},".encode() in ln) == (where == "kept") and k)
    f = lines[i].split(b",")
    f[1] = b"xcl\xffick"
    lines[i] = b",".join(f)
    boxes.write_bytes(b"\n".join(lines))
    *fast_engines, (slow, t_slow) = _plan_both(tmp_path, src, strict=False)
    for fast, t_fast in fast_engines:
        assert fast == slow
        for split in t_slow:
            assert t_fast[split].equals(t_slow[split]), split


@pytest.mark.parametrize(
    ("pad_len", "blocks"),
    [(500, (7, 61, 4096, 1 << 20)), (30_000, (4096, 50_000, 1 << 20))],  # 30 KB: past 2 search windows
)
def test_line_scanner_reads_lines_longer_than_its_reads(tmp_path, pad_len, blocks):
    """Rows far longer than a block and its read-ahead (and than the windows that look for the end
    of the line in progress at a block's start), CRLF line ends, a last line without one."""
    cols = BOX_LAYOUTS["v4"]
    pad = "0" * pad_len
    rows = [
        f"{k:016x},xclick{pad},{CAR if k % 3 == 0 else '/m/019jd'},1,0.1,0.5,0.2,0.6,0,0,0,0,0"
        for k in range(40)
    ]
    p = tmp_path / "b.csv"
    p.write_bytes((",".join(cols) + "\r\n" + "\r\n".join(rows)).encode())
    lay = detect_layout(p, "boxes", "b.csv")
    for block in blocks:
        got = list(linescan.iter_rows_scan(p, lay, BOX_COLS + ["IsInside"], [CAR], None, block_bytes=block))
        ids = [i for b, _ in got for i in b.column("ImageID").to_pylist()]
        lines = [int(x) for _, ln in got for x in ln]
        assert ids == [f"{k:016x}" for k in range(0, 40, 3)], block
        assert lines == [k + 2 for k in range(0, 40, 3)], block
        assert {v for b, _ in got for v in b.column("IsInside").to_pylist()} == {"0"}  # no "\r"


def test_strict_reports_an_early_extra_field_row_before_a_later_value_error(tmp_path):
    """The fast path learns of extra fields only from the comma count, at the end; in strict mode it
    steps aside, so the row reported is the reference's (here the long one, the earliest)."""
    src = write_release(tmp_path / "rel", make_content(), "v4")
    boxes = tmp_path / "rel" / "train-annotations-bbox.csv"
    lines = boxes.read_text().splitlines()
    car = [i for i, ln in enumerate(lines) if f",{CAR}," in ln]
    lines[car[0]] += ",7"
    lines[car[-1]] = ",".join(lines[car[-1]].split(",")[:4] + ["abc"] + lines[car[-1]].split(",")[5:])
    boxes.write_text("\n".join(lines) + "\n")
    *fast_engines, (slow, _) = _plan_both(tmp_path, src, strict=True)
    for fast, _ in fast_engines:
        assert isinstance(fast, str) and fast == slow
    assert f":{car[0] + 1}: malformed row (extra_fields)" in fast


def test_count_lines_and_commas_match_a_plain_count(tmp_path):
    for data in (b"", b"a", b"a\n", b"a,b\r\nc,d", b"\n\n,", b",,," * 100_000 + b"\nx"):
        p = tmp_path / "f"
        p.write_bytes(data)
        want_lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        assert csvstream.count_lines_and_commas(p, chunk=7) == (want_lines, data.count(b","))
        assert csvstream.count_lines(p) == want_lines


def _duplicates_reference(*columns):
    n = len(columns[0])
    dup = np.zeros(n, bool)
    if n < 2:
        return dup
    order = np.lexsort(columns[::-1])
    same = np.ones(n - 1, bool)
    for c in columns:
        cs = c[order]
        same &= cs[1:] == cs[:-1]
    dup[order[1:][same]] = True
    return dup


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, 2),
            st.sampled_from([0.0, -0.0, 0.25, float("nan")]),
            st.integers(-1, 1),
        ),
        max_size=40,
    )
)
def test_duplicate_rows_matches_an_exact_sort(rows):
    cols = [
        np.array([r[0] for r in rows], np.uint64),
        np.array([r[1] for r in rows], np.int32),
        np.array([r[2] for r in rows], np.float32),
        np.array([r[3] for r in rows], np.int8),
    ]
    assert (fastcsv.duplicate_rows(*cols) == _duplicates_reference(*cols)).all()


@pytest.mark.parametrize("release", ["v2", "v6"])
def test_shards_written_bucket_by_bucket_are_the_same(tmp_path, monkeypatch, release):
    """A split larger than one bucket routes its index rows through spill files; the shards (bytes
    included), stats and the first-index-row-wins rule are those of the one-bucket, in-memory path."""
    content = make_content()
    src = write_release(tmp_path / "rel", content, release)
    index = Path(src["splits"]["train"]["images"])
    lines = index.read_text().splitlines()
    # A repeated index row (the first must win) and a removed one (an image without an index row).
    first = lines[1].split(",")
    lines.insert(len(lines) // 2, ",".join([first[0], first[1], "https://elsewhere/x.jpg"] + first[3:]))
    del lines[2]
    index.write_text("\n".join(lines) + "\n")
    one = build_plan(make_cfg(src, str(tmp_path / "one")))
    monkeypatch.setattr(assemble, "IMAGES_PER_BUCKET", 1)  # every shard its own bucket
    many = build_plan(make_cfg(src, str(tmp_path / "many")))
    assert many.manifest.splits["train"].num_shards > 1
    for split, sm in one.manifest.splits.items():
        assert many.manifest.splits[split].shard_sha256 == sm.shard_sha256, split
    assert many.stats["splits"] == one.stats["splits"]
    assert one.stats["splits"]["train"]["images_without_index_row"] >= 1
    t = read_plan(str(tmp_path / "many"))["train"]
    row = t.filter(pc.equal(t.column("image_id"), first[0])).to_pylist()
    assert row and row[0]["original_url"] == (first[2] or None)


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(
        st.one_of(
            st.text("0123456789abcdef", min_size=16, max_size=16),
            st.sampled_from(["0123456789ABCDEF", "0123456789abcdeF", "short", "0123456789abcdeg"]),
        ),
        max_size=30,
    )
)
def test_grouping_by_keys_matches_grouping_by_strings(ids):
    """group_by_image's uint64-key path gives the string path's images, order and box positions."""
    from openimages_od.openimages import idkeys, selection

    arr = pa.array(ids, pa.string())
    n = len(ids)
    kept = selection.KeptBoxes(np.arange(n), np.zeros(n, np.int32), arr, 0)
    got = selection.group_by_image(kept, 1, 1)
    uniq = pc.unique(arr)
    want_ids = uniq.take(pc.sort_indices(uniq)) if len(uniq) else pa.array([], pa.string())
    want_pos = pc.index_in(arr, value_set=want_ids).to_numpy(zero_copy_only=False) if len(arr) else []
    assert got.img_ids.to_pylist() == want_ids.to_pylist()
    assert list(got.b_img) == list(want_pos)
    if all(len(i) == 16 and set(i) <= set("0123456789abcdef") for i in ids):
        assert idkeys.lower_hex_keys(arr) is not None
    else:
        assert idkeys.lower_hex_keys(arr) is None
