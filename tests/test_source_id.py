"""``source_id``: stable per ImageID whatever the selection, and exact through Model Garden's parsing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from openimages_od.errors import DataError
from openimages_od.openimages import ids
from openimages_od.openimages.ids import source_id, source_ids
from openimages_od.openimages.plan import build_plan

sys.path.insert(0, str(Path(__file__).parent))
from test_plan import CAR, make_cfg, make_content, read_plan, write_release


def test_source_id_is_a_positive_int64_hash_of_the_image_id():
    sid = source_id("000002b66c9c498e")
    # blake2b-64 of the ImageID with the top bit cleared; computed independently here.
    import hashlib

    want = int.from_bytes(hashlib.blake2b(b"000002b66c9c498e", digest_size=8).digest(), "big") & (2**63 - 1)
    assert sid == want and 0 < sid < 2**63
    assert source_id("000002b66c9c498f") != sid
    assert list(source_ids(["000002b66c9c498e", "000002b66c9c498f"])) == [sid, source_id("000002b66c9c498f")]


def test_a_collision_inside_a_plan_is_an_error(monkeypatch):
    monkeypatch.setattr(ids, "source_id", lambda image_id: 42)
    with pytest.raises(DataError, match="collision"):
        source_ids(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])


def test_same_image_same_source_id_under_two_selections(tmp_path):
    """Acceptance 3: two plans with different classes and caps number shared images alike."""
    src = write_release(tmp_path / "v6", make_content(), "v6")
    build_plan(make_cfg(src, str(tmp_path / "a")))
    build_plan(
        make_cfg(src, str(tmp_path / "b"), classes=[CAR], include_subclasses=False, max_images=7, seed=3)
    )
    a = {
        r["image_id"]: r["source_id"] for t in read_plan(str(tmp_path / "a")).values() for r in t.to_pylist()
    }
    b = {
        r["image_id"]: r["source_id"] for t in read_plan(str(tmp_path / "b")).values() for r in t.to_pylist()
    }
    common = set(a) & set(b)
    assert len(common) >= 5 and len(b) < len(a)
    assert all(a[i] == b[i] == source_id(i) for i in common)
    # The former per-selection ordinals would have differed for these images.
    rank_a = {i: k for k, i in enumerate(sorted(a))}
    rank_b = {i: k for k, i in enumerate(sorted(b))}
    assert any(rank_a[i] != rank_b[i] for i in common)


@pytest.mark.tf
def test_model_garden_parses_the_largest_ids_exactly():
    """Model Garden parses image/source_id with tf.strings.to_number(..., tf.int64): no precision lost."""
    import tensorflow as tf
    from official.vision.dataloaders.utils import process_source_id

    for sid in (1, 2**53 + 1, 2**63 - 1, source_id("ffffffffffffffff")):
        got = int(process_source_id(tf.constant(str(sid))).numpy())
        assert got == sid
