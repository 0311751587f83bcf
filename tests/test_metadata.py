"""Open Images metadata parsing on the real reference files: classes, hierarchy, label maps, layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openimages_od.errors import ConfigError, DataError, UsageError
from openimages_od.openimages.classes import (
    ROOT_MID,
    read_class_descriptions,
    read_hierarchy,
    read_trainable,
    resolve_classes,
)
from openimages_od.openimages.csvstream import CsvStream
from openimages_od.openimages.formats import BOX_LAYOUTS, IMAGE_INDEX_LAYOUTS, MalformedLog, detect_layout
from openimages_od.openimages.labelmap import LabelMap

DATA = Path(__file__).resolve().parent / "data" / "openimages"
CLASSES = DATA / "class-descriptions-boxable.csv"
HIERARCHY = DATA / "bbox_labels_600_hierarchy.json"
TRAINABLE = DATA / "oid_bbox_trainable_label_map.pbtxt"
V4_MAP = DATA / "oid_v4_label_map.pbtxt"
VEHICLE, CAR, BOAT, AIRPLANE, PERSON = "/m/07yv9", "/m/0k4j", "/m/019jd", "/m/0cmf2", "/m/01g317"


@pytest.fixture(scope="module")
def desc():
    return read_class_descriptions(CLASSES.read_text(), str(CLASSES))


@pytest.fixture(scope="module")
def hier():
    return read_hierarchy(HIERARCHY.read_text(), str(HIERARCHY))


def _walk_subcategories(node: dict, below: dict[str, set[str]]) -> set[str]:
    """Independent oracle: every Subcategory descendant of each node, straight from the JSON."""
    out: set[str] = set()
    for child in node.get("Subcategory", []):
        out.add(child["LabelName"])
        out |= _walk_subcategories(child, below)
    for part in node.get("Part", []):
        _walk_subcategories(part, below)
    below.setdefault(node["LabelName"], set()).update(out)
    return out


def test_real_class_descriptions(desc):
    assert len(desc.mids) == 601 and len(set(desc.mids)) == 601
    assert desc.mids[0] == "/m/011k07" and desc.names["/m/011k07"] == "Tortoise"
    assert desc.mids[-1] == "/m/0zvk5" and desc.names[desc.mids[-1]] == "Helmet"
    # The V4 label map lists the same classes in the same order.
    v4 = LabelMap.from_pbtxt(V4_MAP.read_text())
    assert [(c.mid, c.name) for c in v4] == [(m, desc.names[m]) for m in desc.mids]


def test_class_descriptions_with_header_and_quoted_commas():
    text = 'LabelName,DisplayName\n/m/0k4j,Car\n/m/0x1,"Salt and pepper shakers, mills"\n'
    d = read_class_descriptions(text, "oidv7-class-descriptions-boxable.csv")
    assert d.mids == ["/m/0k4j", "/m/0x1"]
    assert d.names["/m/0x1"] == "Salt and pepper shakers, mills"
    with pytest.raises(DataError, match=r"weird\.csv: unknown class-descriptions layout: header 'Foo,Bar'"):
        read_class_descriptions("Foo,Bar\n/m/0k4j,Car\n", "weird.csv")


def test_real_hierarchy(hier, desc):
    assert ROOT_MID not in hier.classes
    assert hier.classes == set(desc.mids)
    multi = [m for m, ps in hier.parents.items() if len([p for p in ps]) > 1]
    assert multi, "the real hierarchy has classes under several parents"
    # A multi-parent class lists every parent's ancestors.
    m = multi[0]
    for p in hier.parents[m]:
        if p != ROOT_MID:
            assert p in hier.ancestors(m)


def test_vehicle_subclasses_match_the_json(hier, desc):
    below: dict[str, set[str]] = {}
    _walk_subcategories(json.loads(HIERARCHY.read_text()), below)
    mids = resolve_classes(["vehicle"], desc, hier, None, include_subclasses=True)
    assert mids[0] == VEHICLE
    assert set(mids[1:]) == below[VEHICLE]
    assert {CAR, BOAT, AIRPLANE} <= set(mids) and PERSON not in mids
    order = desc.index()
    assert [order[m] for m in mids[1:]] == sorted(order[m] for m in mids[1:])  # class-descriptions order
    # Without include_subclasses: just the class.
    assert resolve_classes(["Vehicle"], desc, hier, None) == [VEHICLE]


def test_selection_order_and_mids(desc, hier):
    mids = resolve_classes(["Car", "/m/01g317", "car"], desc, hier, None)
    assert mids == [CAR, PERSON]
    assert resolve_classes([], desc, hier, None) == desc.mids


def test_unknown_class_suggests_close_matches(desc, hier):
    with pytest.raises(UsageError, match=r"unknown class 'Vehicel'.*did you mean 'Vehicle'") as ei:
        resolve_classes(["Vehicel"], desc, hier, None)
    assert ei.value.exit_code == 2
    with pytest.raises(UsageError, match="unknown MID"):
        resolve_classes(["/m/doesnotexist"], desc, hier, None)


def test_trainable_label_map_and_list(desc, hier):
    mids = read_trainable(TRAINABLE.read_text(), str(TRAINABLE))
    assert len(mids) == 545 and mids[0] == PERSON
    as_list = read_trainable("\n".join(mids) + "\n", "classes-bbox-trainable.txt")
    assert as_list == mids
    sel = resolve_classes([], desc, hier, mids, trainable_only=True)
    assert len(sel) == 545 and set(sel) == set(mids)
    assert sel == [m for m in desc.mids if m in set(mids)]  # class-descriptions order
    with pytest.raises(ConfigError, match="trainable_classes"):
        resolve_classes([], desc, hier, None, trainable_only=True)
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        read_trainable("/m/0k4j\nnot a mid\n", "bad.txt")


def test_v2_names_hierarchy_is_rejected_clearly():
    with pytest.raises(DataError, match="unknown hierarchy format"):
        read_hierarchy('{"name": "Entity", "children": []}', "bbox_hierarchy.json")


@pytest.mark.parametrize("name,cols", list(BOX_LAYOUTS.items()))
def test_box_layouts_detected(tmp_path, name, cols):
    p = tmp_path / "b.csv"
    p.write_text(",".join(cols) + "\n")
    assert detect_layout(p, "boxes", "b.csv").name == name
    # ImageId (V7 spelling) is an alias of ImageID; headerless files go by column count.
    p.write_text(",".join(("ImageId",) + cols[1:]) + "\n")
    assert detect_layout(p, "boxes", "b.csv").columns[0] == "ImageID"
    p.write_text(",".join(["000002b66c9c498e"] + ["0"] * (len(cols) - 1)) + "\n")
    lay = detect_layout(p, "boxes", "b.csv")
    assert lay.name == name and not lay.has_header


def test_image_index_layouts(tmp_path):
    for name, cols in IMAGE_INDEX_LAYOUTS.items():
        p = tmp_path / f"{name}.csv"
        p.write_text("\ufeff" + ",".join(cols) + "\r\n")
        assert detect_layout(p, "images", p.name).name == name


def test_unknown_layout_names_file_and_header(tmp_path):
    p = tmp_path / "odd.csv"
    p.write_text("ImageID,LabelName,Score\n")
    with pytest.raises(
        DataError, match=r"odd\.csv: unknown boxes layout: header 'ImageID,LabelName,Score' \(3 columns\)"
    ):
        detect_layout(p, "boxes", "odd.csv")


def test_stream_reports_physical_lines_of_skipped_rows(tmp_path):
    cols = BOX_LAYOUTS["v2-train"]
    good = "000002b66c9c498e,xclick,/m/0k4j,1,0.1,0.2,0.3,0.4"
    lines = [",".join(cols), good, "000002b66c9c498e,xclick,/m/0k4j", good, "", good, good + ",extra", good]
    p = tmp_path / "b.csv"
    p.write_text("\n".join(lines) + "\n")
    lay = detect_layout(p, "boxes", "b.csv")
    logm = MalformedLog()
    st = CsvStream(p, lay, ["ImageID"], "b.csv", logm, block_size=64)
    kept = []
    for batch, g0 in st:
        kept.extend(st.line_of(g0 + i) for i in range(batch.num_rows))
    # The blank line 5 is kept as a row of empty fields (the readers count it); lines stay exact.
    assert kept == [2, 4, 5, 6, 8]
    assert logm.counts == {"missing_fields": 1, "extra_fields": 1}
    assert logm.examples["missing_fields"][0].startswith("b.csv:3:")
    assert logm.examples["extra_fields"][0].startswith("b.csv:7:")
