"""The dataset as a versioned artifact (issue 11): re-plans are safe, only new images are fetched,
every model names the data it saw.

Integration tests run the real planner on a generated Open Images V7-layout dataset (real MIDs,
some photos stored rotated), the real prepare on the session's embedded Ray with several actors,
images served by a local HTTP server that counts requests, on local disk and SeaweedFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openimages_od.config import Config, dump_config, load_config
from openimages_od.dataset import dataset_shards, run_status, status
from openimages_od.devservices import Reply
from openimages_od.errors import ConfigError, DataError
from openimages_od.layout import Layout
from openimages_od.openimages.labelmap import LabelClass, LabelMap, assign_ids
from openimages_od.openimages.plan import build_plan
from openimages_od.openimages.planio import read_manifest, read_plan_table
from openimages_od.outputlock import LockHeld, OutputLock
from openimages_od.pipeline.distribute import run_prepare
from openimages_od.pipeline.example import decode_example
from openimages_od.pipeline.ledger import decode_ledger
from openimages_od.pipeline.tfrecord import iter_records
from openimages_od.storage import Storage
from openimages_od.storage_setup import storage_from_config
from openimages_od.synth import SynthClass, generate_dataset

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "openimages"

VEHICLE, APPLE, DOG, CAT = "/m/07yv9", "/m/014j1m", "/m/0bt9lr", "/m/01yrx"
CLASSES = (
    SynthClass(VEHICLE, "Vehicle", "rect", (30, 90, 220)),
    SynthClass(APPLE, "Apple", "circle", (200, 30, 30)),
    SynthClass(DOG, "Dog", "triangle", (140, 90, 40)),
    SynthClass(CAT, "Cat", "circle", (40, 200, 60)),
)


# --------------------------------------------------------------------------- helpers


def _dataset(tmp_path, image_server, n=36, seed=5, delay_s=0.0):
    ds = generate_dataset(
        tmp_path / "ds",
        n,
        classes=CLASSES,
        base_url=image_server.url("").rstrip("/"),
        rotation_rate=0.4,
        min_side=80,
        max_side=140,
        group_of_rate=0.1,
        seed=seed,
    )
    for im in ds.images:
        image_server.script(f"original/{im.split}/{im.image_id}.jpg", [Reply(200, im.jpeg, delay_s=delay_s)])
    return ds


def _cfg(ds, out_url, classes, images_per_shard, *sets, s3=None) -> Config:
    base = load_config(
        None,
        [
            f"output.url={out_url}",
            "ray.num_actors=2",
            "ray.num_cpus_per_actor=0.5",
            "ray.progress=false",
            "ray.max_shard_retries=2",
            "ray.actor_start_timeout_s=60",
            "source.images.order=[original]",
            "image.max_side=96",
            "source.images.http.max_retries=1",
            "source.images.http.backoff_base_s=0.05",
            f"shards.images_per_shard={images_per_shard}",
            f"selection.classes={json.dumps(classes)}",
            *sets,
        ],
    )
    d = base.model_dump(mode="json")
    d["source"] = {**d["source"], **ds.source_config()}
    if s3 is not None:
        d["output"]["s3"] = s3.model_dump(mode="json")
    return Config.model_validate(d)


def _hits(srv, ds) -> dict[str, int]:
    return {im.image_id: srv.hits[f"/original/{im.split}/{im.image_id}.jpg"] for im in ds.images}


def _read_what_train_reads(cfg, st, split):
    """Every record of every shard train/evaluate would read for ``split``."""
    urls, doc = dataset_shards(cfg, st, split)
    recs = {}
    for u in urls:
        for rec in iter_records(st.read_bytes(u), u):
            d = decode_example(rec)
            fn = d["image/filename"][0].decode()
            assert fn not in recs, f"{fn} read twice"
            recs[fn] = d
    return urls, doc, recs


def _shard_bytes(st, cfg, split):
    prefix = Layout.from_config(cfg).tfrecords_dir(split) + "/"
    return {
        o.url.rsplit("/", 1)[1]: st.read_bytes(o.url) for o in st.list(prefix) if o.url.endswith(".tfrecord")
    }


def _plan_ids(st, cfg, split) -> set[str]:
    layout = Layout.from_config(cfg)
    m = read_manifest(st, layout.plan_dir)
    return {
        i
        for rel in m.splits[split].shards
        for i in read_plan_table(st, layout.plan_shard(rel), ["image_id"]).column("image_id").to_pylist()
    }


# --------------------------------------------------------------------------- acceptance 1 (+3, status)


@pytest.mark.integration
def test_replan_reads_only_current_labels_and_fetches_only_new_images(ray_local, image_server, tmp_path):
    ds = _dataset(tmp_path, image_server)
    out = f"file://{tmp_path}/out"
    cfg1 = _cfg(ds, out, ["Vehicle", "Apple", "Dog"], 8)
    st = storage_from_config(cfg1)
    assert run_prepare(cfg1) == 0
    hits1 = _hits(image_server, ds)
    fetched1 = {i for i, n in hits1.items() if n}
    lm1 = LabelMap.from_pbtxt(st.read_text(Layout.from_config(cfg1).label_map_pbtxt))
    assert [(c.mid, c.id) for c in lm1] == [(VEHICLE, 1), (APPLE, 2), (DOG, 3)]
    assert run_status(cfg1) == 0

    # Re-plan: another selection and another shard size, into the same output.
    cfg2 = _cfg(ds, out, ["Dog", "Apple", "Cat"], 5)
    res = build_plan(cfg2)
    lm2 = res.label_map
    assert {c.mid: c.id for c in lm2} == {DOG: 3, APPLE: 2, CAT: 4}  # kept ids, Cat appended
    assert [r["mid"] for r in res.manifest.removed_classes] == [VEHICLE]  # recorded, id 1 retired
    # Until prepare runs, nothing reads the old shards: dataset.json is of another plan.
    with pytest.raises(DataError, match="re-planned since the last prepare"):
        dataset_shards(cfg2, st, "train")
    ids2 = {s: _plan_ids(st, cfg2, s) for s in ("train", "validation")}
    new = set().union(*ids2.values()) - fetched1
    assert new, "the dataset should have images only the new selection picks"
    s = status(cfg2)
    assert not s["up_to_date"] and s["shards"]["committed"] == 0
    assert s["next_prepare"]["fetch_from_source"] == len(new)
    assert run_status(cfg2) == 1

    assert run_prepare(cfg2) == 0
    hits2 = _hits(image_server, ds)
    fetched_now = {i: hits2[i] - hits1[i] for i in hits2 if hits2[i] != hits1[i]}
    assert set(fetched_now) == new and set(fetched_now.values()) == {1}

    wanted = {DOG, APPLE, CAT}
    by_id = {im.image_id: im for im in ds.images}
    layout = Layout.from_config(cfg2)
    for split in ("train", "validation"):
        urls, doc, recs = _read_what_train_reads(cfg2, st, split)
        assert set(recs) == ids2[split]  # exactly the current plan's images, no record of the old plan
        assert all(
            "-of-" in u and st.read_json(u[: -len(".tfrecord")] + ".stats.json")["shard_key"] for u in urls
        )
        for iid, d in recs.items():
            labels = list(d["image/object/class/label"])
            mids = [m.decode() for m in d["image/object/class/text"]]
            assert [lm2.by_id[i].mid for i in labels] == mids, iid  # ids agree with the current label map
            assert set(mids) <= wanted
            assert sorted(mids) == sorted(
                b["LabelName"] for b in by_id[iid].boxes if b["LabelName"] in wanted
            )
        # Only the current plan's shard files are left.
        names = {o.url.rsplit("/", 1)[1] for o in st.list(layout.tfrecords_dir(split) + "/")}
        n_of = f"-of-{doc['splits'][split]['num_shards']:05d}"
        assert all(n.endswith((f"{n_of}.tfrecord", f"{n_of}.stats.json")) for n in names), names
    ledger = [e for o in st.list(layout.ledger_dir() + "/") for e in decode_ledger(st.read_bytes(o.url))]
    assert {e.image_id for e in ledger if not e.from_cache} == new
    report = st.read_json(layout.prepare_report)
    assert report["this_run"]["source_fetches"] == len(new)
    assert report["this_run"]["cache_hits"] == len(ledger) - len(new)
    assert run_status(cfg2) == 0
    # A rerun does nothing and fetches nothing.
    assert run_prepare(cfg2) == 0
    assert _hits(image_server, ds) == hits2


# --------------------------------------------------------------------------- acceptance 2 (file and S3)


@pytest.mark.integration
def test_reshard_fetches_nothing_and_equals_a_clean_prepare(
    ray_local, image_server, tmp_path, seaweedfs, s3_bucket, s3_options
):
    """On S3 (the file:// path does the same in the re-plan and kill tests, which also compare bytes)."""
    ds = _dataset(tmp_path, image_server, n=20, seed=7)
    s3 = s3_options
    out, clean_out = f"s3://{s3_bucket}/run", f"s3://{s3_bucket}/clean"
    classes = ["Apple", "Dog", "Cat"]
    cfg1 = _cfg(ds, out, classes, 6, s3=s3)
    assert run_prepare(cfg1) == 0
    before = _hits(image_server, ds)
    cfg2 = _cfg(ds, out, classes, 4, s3=s3)
    build_plan(cfg2)
    assert run_prepare(cfg2) == 0
    assert _hits(image_server, ds) == before  # zero source fetches
    clean = _cfg(ds, clean_out, classes, 4, s3=s3)
    assert run_prepare(clean) == 0
    st = storage_from_config(cfg2)
    for split in ("train", "validation"):
        assert _shard_bytes(st, cfg2, split) == _shard_bytes(st, clean, split)
    a = st.read_json(Layout.from_config(cfg2).dataset)
    b = st.read_json(Layout.from_config(clean).dataset)
    assert a["digest"] == b["digest"] and a["plan_digest"] == b["plan_digest"]


# --------------------------------------------------------------------------- acceptance 3 (units + pinned plan)


def test_label_ids_are_stable_appended_retired_and_pinnable():
    names = {"/m/a": "A", "/m/b": "B", "/m/c": "C", "/m/d": "D"}
    lm, retired = assign_ids(["/m/a", "/m/b", "/m/c"], names)
    assert [(c.mid, c.id) for c in lm] == [("/m/a", 1), ("/m/b", 2), ("/m/c", 3)] and retired == []
    lm2, retired2 = assign_ids(["/m/c", "/m/d", "/m/b"], names, previous=lm, retired=retired)
    assert {c.mid: c.id for c in lm2} == {"/m/c": 3, "/m/d": 4, "/m/b": 2}
    assert retired2 == [{"id": 1, "mid": "/m/a", "name": "A"}] and lm2.num_classes == 5
    # A retired id is never reused; a class that comes back gets its old id.
    lm3, retired3 = assign_ids(
        ["/m/c", "/m/e", "/m/a"], {**names, "/m/e": "E"}, previous=lm2, retired=retired2
    )
    assert {c.mid: c.id for c in lm3} == {"/m/c": 3, "/m/e": 5, "/m/a": 1}
    assert [r["mid"] for r in retired3] == ["/m/b", "/m/d"]
    pinned = LabelMap([LabelClass(14, "/m/a", "A"), LabelClass(446, "/m/b", "B")])
    lm4, _ = assign_ids(["/m/b", "/m/a"], names, previous=lm3, pinned=pinned)
    assert {c.mid: c.id for c in lm4} == {"/m/a": 14, "/m/b": 446}
    with pytest.raises(DataError, match=r"oid\.pbtxt: 1 selected class\(es\) have no id there: /m/c \(C\)"):
        assign_ids(["/m/c"], names, pinned=pinned, pinned_source="oid.pbtxt")


def test_selection_label_map_pins_ids_in_the_plan(tmp_path):
    ds = generate_dataset(tmp_path / "ds", 12, classes=CLASSES, min_side=64, max_side=96, seed=3)
    cfg = _cfg(
        ds,
        f"file://{tmp_path}/out",
        ["Dog", "Apple"],
        50,
        f"selection.label_map={DATA / 'oid_v4_label_map.pbtxt'}",
    )
    res = build_plan(cfg)
    assert {c.mid: c.id for c in res.label_map} == {DOG: 446, APPLE: 14}
    assert res.label_map.num_classes == 447
    st = storage_from_config(cfg)
    rows = read_plan_table(
        st, Layout.from_config(cfg).plan_shard(res.manifest.splits["train"].shards[0])
    ).to_pylist()
    assert {(b["mid"], b["label_id"]) for r in rows for b in r["boxes"]} <= {(DOG, 446), (APPLE, 14)}
    bad = _cfg(
        ds,
        f"file://{tmp_path}/out2",
        ["Dog", "Screwdriver"],
        50,  # Screwdriver is not a V2 class
        f"selection.label_map={DATA / 'oid_bbox_trainable_label_map.pbtxt'}",
    )
    with pytest.raises(DataError, match=r"oid_bbox_trainable_label_map.pbtxt: 1 selected class.*/m/01bms0"):
        build_plan(bad)


# --------------------------------------------------------------------------- acceptance 5


@pytest.mark.integration
def test_killed_prepare_during_replan_gives_the_uninterrupted_result(ray_local, image_server, tmp_path):
    ds = _dataset(tmp_path, image_server, n=24, seed=9)
    out = f"file://{tmp_path}/out"
    cfg1 = _cfg(ds, out, ["Vehicle", "Apple"], 6)
    assert run_prepare(cfg1) == 0
    hits1 = _hits(image_server, ds)
    # New images answer slowly, so the re-plan's prepare is killed in the middle.
    for im in ds.images:
        if not hits1[im.image_id]:
            image_server.script(f"original/{im.split}/{im.image_id}.jpg", [Reply(200, im.jpeg, delay_s=0.4)])
    gcs = ray_local.get_runtime_context().gcs_address
    cfg2 = _cfg(
        ds,
        out,
        ["Apple", "Dog", "Cat"],
        4,
        "ray.concurrency_per_actor=1",
        "ray.max_shards_in_flight_per_actor=1",
        f"ray.address={gcs}",
    )
    build_plan(cfg2)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(cfg2))
    st = storage_from_config(cfg2)
    layout = Layout.from_config(cfg2)
    stats_dir = Path(layout.tfrecords_dir("train").removeprefix("file://"))
    old_stats = {p: p.stat().st_mtime_ns for p in stats_dir.glob("*.stats.json")}
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openimages_od", "prepare", "-c", str(cfg_file)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(
                p not in old_stats or p.stat().st_mtime_ns != old_stats[p]
                for p in stats_dir.glob("*.stats.json")
            ):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert status(cfg2)["shards"]["missing"] + status(cfg2)["shards"]["stale"] > 0, (
        "prepare finished before the kill"
    )
    with pytest.raises(DataError):  # the half-done output is never read
        dataset_shards(cfg2, st, "train")

    assert run_prepare(cfg2) == 0
    # The uninterrupted run of the same history, in an output of its own (same label ids: planned
    # [Vehicle, Apple] first, then re-planned), fetching every image afresh into its own cache.
    ref = f"file://{tmp_path}/ref"
    build_plan(_cfg(ds, ref, ["Vehicle", "Apple"], 6))
    clean = _cfg(ds, ref, ["Apple", "Dog", "Cat"], 4)
    build_plan(clean)
    assert run_prepare(clean) == 0
    for split in ("train", "validation"):
        assert _shard_bytes(st, cfg2, split) == _shard_bytes(st, clean, split)
    assert st.read_json(layout.dataset)["digest"] == st.read_json(Layout.from_config(clean).dataset)["digest"]
    # Images of the first plan were never fetched again (the clean run, in its own output, fetched each once).
    hits = _hits(image_server, ds)
    assert all(hits[i] - hits1[i] <= 1 for i in hits1 if hits1[i])


# --------------------------------------------------------------------------- concurrency


def test_second_prepare_on_a_locked_local_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from openimages_od.outputlock import OutputLock; from openimages_od.storage import Storage;"
                f"lock = OutputLock(Storage(), 'file://{out}/.oiod.lock', what='prepare').acquire(); print('held', flush=True);"
                "time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        cfg = load_config(None, [f"output.url=file://{out}"])
        with pytest.raises(LockHeld, match=r"held by prepare on .* \(pid \d+"):
            run_prepare(cfg)
        with pytest.raises(LockHeld):
            build_plan(cfg)
    finally:
        holder.kill()
        holder.wait(10)
    # The kernel released the dead holder's lock: the next run takes it at once.
    lock = OutputLock(Storage(), f"file://{out}/.oiod.lock").acquire()
    lock.release()


@pytest.mark.integration
def test_s3_lease_lock_excludes_renews_and_is_taken_over(seaweedfs, s3_bucket, s3_options):
    st = Storage(s3=s3_options)
    url = f"s3://{s3_bucket}/out/.oiod.lock"
    a = OutputLock(st, url, ttl_s=6, what="prepare").acquire()
    with pytest.raises(LockHeld, match="held by prepare"):
        OutputLock(st, url, ttl_s=6).acquire()
    time.sleep(7)  # a's heartbeat renewed the lease: still held after its first ttl
    with pytest.raises(LockHeld):
        OutputLock(st, url, ttl_s=6).acquire()
    a.release()
    b = OutputLock(st, url, ttl_s=6).acquire()  # released: taken at once
    # A holder that stops renewing (a crashed pod) loses the lease after ttl; it notices and stops.
    b._stop.set()  # stop b's heartbeat, as if its pod froze
    b._thread.join(5)
    time.sleep(6.5)
    c = OutputLock(st, url, ttl_s=6).acquire()
    assert st.put_conditional(url, b"x", if_match=b._etag) is None  # b can no longer renew the lease
    c.release()


# --------------------------------------------------------------------------- readers refuse


def test_readers_refuse_a_label_map_that_disagrees_with_the_shards(tmp_path):
    pytest.importorskip("tensorflow")
    from training_helpers import build_output, label_map

    out = build_output(tmp_path / "out", num_images=8)
    cfg = load_config(None, [f"output.url=file://{out}"])
    st = Storage()
    urls, doc = dataset_shards(cfg, st, "train")
    assert urls and doc["label_map_digest"] == label_map().digest
    lm = label_map()
    (out / "label_map.pbtxt").write_text(
        LabelMap([LabelClass(c.id + 1, c.mid, c.name) for c in lm]).to_pbtxt()
    )
    with pytest.raises(DataError, match=r"not the label map the shards .* were written with"):
        dataset_shards(cfg, st, "train")
    (out / "label_map.pbtxt").write_text(lm.to_pbtxt())
    shard = next((out / "tfrecords" / "train").glob("*.tfrecord"))
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(DataError, match="rewritten since"):
        dataset_shards(cfg, st, "train")


def test_prepare_refuses_image_settings_other_than_the_plans(tmp_path):
    from openimages_od.dataset import check_image_settings
    from openimages_od.layout import image_settings
    from openimages_od.openimages.planio import PlanManifest

    cfg = load_config(None, ["image.max_side=512"])
    m = PlanManifest(splits={}, num_classes=1, image_settings={**image_settings(cfg.image), "max_side": 1024})
    with pytest.raises(ConfigError, match=r"image.max_side: 1024 in the plan, 512 now"):
        check_image_settings(cfg, m)


# --------------------------------------------------------------------------- units


def test_layout_owns_every_path_and_the_commit_rule(tmp_path):
    from openimages_od.layout import image_digest, is_current, shard_key

    cfg = load_config(
        None,
        [
            f"output.url={tmp_path}/o",
            "output.cache_url=s3://cache-bucket/oiod",
            "train.model_dir=s3://models/m1",
        ],
    )
    lay = Layout.from_config(cfg)
    root = f"file://{tmp_path}/o"
    assert (
        lay.shard_file("train", "train-00001-of-00004")
        == f"{root}/tfrecords/train/train-00001-of-00004.tfrecord"
    )
    assert lay.shard_stats("train", "x") == f"{root}/tfrecords/train/x.stats.json"
    assert lay.ledger("validation", "x") == f"{root}/ledger/validation/x.jsonl"
    assert (lay.dataset, lay.plan_manifest, lay.lock) == (
        f"{root}/dataset.json",
        f"{root}/plan/manifest.json",
        f"{root}/.oiod.lock",
    )
    assert lay.model_dataset == "s3://models/m1/dataset.json" and lay.export_dir == f"{root}/export"
    d = image_digest(cfg.image)
    assert (
        lay.image_cache(d, "abcdef0123456789")
        == f"s3://cache-bucket/oiod/images-{d}/ab/abcdef0123456789.oiodimg"
    )
    assert lay.relative(lay.shard_file("train", "n")) == "tfrecords/train/n.tfrecord"
    # A setting that changes bytes changes the digest; one that does not, does not.
    assert image_digest(load_config(None, ["image.max_side=512"]).image) != d
    assert image_digest(load_config(None, ["ray.num_actors=7"]).image) == d
    key = shard_key("p", "l", d)
    assert is_current({"shard_key": key, "tfrecord_sha256": "s"}, key)
    assert not is_current({"shard_key": shard_key("p2", "l", d), "tfrecord_sha256": "s"}, key)
    assert not is_current({"images": 3}, key) and not is_current(None, key)


def test_cache_entries_round_trip_and_match_only_the_same_image():
    from openimages_od.pipeline.cache import CacheEntry, decode_entry, encode_entry

    e = CacheEntry(
        "abc",
        "ok",
        rotation=90,
        original_md5="m==",
        source="original",
        url="http://x/a.jpg",
        bytes=10,
        width=3,
        height=4,
        ops=[2],
        attempts=["bucket:s3_not_found"],
        data=b"\xff\xd8jpeg\n\x00",
    )
    back = decode_entry(encode_entry(e))
    assert back == e
    assert back.matches({"rotation": 90, "original_md5": "m=="})
    assert not back.matches({"rotation": 0, "original_md5": "m=="})  # a new release rotated it: a miss
    assert not back.matches({"rotation": 90, "original_md5": "other"})
    with pytest.raises(ValueError):
        decode_entry(b"garbage")


def test_cache_entries_carry_their_sha256_and_a_damaged_entry_is_refused():
    """Entries are not fsynced; what a power loss can leave (empty, short, garbled) is refused."""
    import hashlib

    from openimages_od.pipeline.cache import _MAGIC, CacheEntry, decode_entry, encode_entry

    data = bytes(range(256)) * 40
    raw = encode_entry(CacheEntry("abc", "ok", width=3, height=4, data=data))
    head = json.loads(raw[len(_MAGIC) : raw.index(b"\n", len(_MAGIC))])
    assert head["sha256"] == hashlib.sha256(data).hexdigest()
    assert decode_entry(raw).sha256 == head["sha256"]
    assert decode_entry(raw).data == data
    flipped = bytearray(raw)
    flipped[-100] ^= 1
    damaged = [raw[:-1], raw[: len(raw) // 2], bytes(flipped), raw[:-4096] + bytes(4096), b"", raw[:12]]
    for bad in damaged:
        with pytest.raises(ValueError):
            decode_entry(bad, "x.oiodimg")
    # A failed image's entry has no bytes and no digest.
    failed = decode_entry(encode_entry(CacheEntry("abc", "failed", error="http_404")))
    assert failed.sha256 is None and failed.error == "http_404"
    # An entry written before the digest was stored (no "sha256" key) is read as before.
    legacy = {k: v for k, v in head.items() if k != "sha256"}
    old = _MAGIC + json.dumps(legacy).encode() + b"\n" + data
    assert decode_entry(old).data == data and decode_entry(old).sha256 == head["sha256"]


@pytest.mark.integration
def test_a_damaged_cache_entry_is_fetched_again_and_never_becomes_a_record(ray_local, image_server, tmp_path):
    from openimages_od.layout import image_digest
    from openimages_od.pipeline.cache import ImageCache

    ds = _dataset(tmp_path, image_server, n=16)
    out = f"file://{tmp_path}/out"
    cfg1 = _cfg(ds, out, ["Vehicle", "Apple", "Dog", "Cat"], 4)
    st = storage_from_config(cfg1)
    assert run_prepare(cfg1) == 0
    hits1 = _hits(image_server, ds)
    cache = ImageCache(st, Layout.from_config(cfg1), image_digest(cfg1.image))
    ok_ids = sorted(i for i in cache.present() if (e := cache.get(i)) is not None and e.ok)
    assert len(ok_ids) >= 3
    # What a power loss can leave of an unsynced entry: a garbled byte, a short file, an empty one.
    for image_id, damage in zip(ok_ids, ("flip", "short", "empty"), strict=False):
        path = Path(cache.url(image_id).removeprefix("file://"))
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[-50] ^= 0x40
        path.write_bytes(
            bytes(raw[: len(raw) // 2] if damage == "short" else b"" if damage == "empty" else raw)
        )
        assert cache.get(image_id) is None
    # A re-shard rebuilds every record from the cache, except the damaged ones, fetched again.
    cfg2 = _cfg(ds, out, ["Vehicle", "Apple", "Dog", "Cat"], 3)
    build_plan(cfg2)
    assert run_prepare(cfg2) == 0
    refetched = {i for i, n in _hits(image_server, ds).items() if n != hits1[i]}
    assert refetched == set(ok_ids[:3])
    report = st.read_json(Layout.from_config(cfg2).prepare_report)
    assert report["this_run"]["source_fetches"] == 3 and report["this_run"]["cache_hits"] > 0
    for split in ("train", "validation"):
        _, _, recs = _read_what_train_reads(cfg2, st, split)
        for iid, d in recs.items():
            enc = d["image/encoded"][0]
            assert d["image/key/sha256"][0].decode() == hashlib.sha256(enc).hexdigest(), iid
            assert enc[:2] == b"\xff\xd8" and enc[-2:] == b"\xff\xd9", iid
    for image_id in ok_ids[:3]:  # and the cache holds them whole again
        assert cache.get(image_id) is not None


def test_status_cli_exit_codes(tmp_path, capsys):
    from openimages_od.cli import main

    assert main(["status", "--set", f"output.url={tmp_path}/o"]) == 1
    assert "next     oiod plan" in capsys.readouterr().out
    assert main(["status", "--json", "--set", f"output.url={tmp_path}/o"]) == 1
    assert json.loads(capsys.readouterr().out)["up_to_date"] is False


def test_plan_config_digest_covers_only_what_a_plan_is_made_of():
    """``oiod status`` says "config changed since" only when the plan itself would change."""
    from openimages_od.openimages.plan import config_digest

    def digest(*sets: str) -> str:
        base = ["source.splits.train.boxes=/d/train-boxes.csv", "selection.classes=[Ball]"]
        return config_digest(load_config(None, overrides=[*base, *sets]))

    base = digest()
    # Settings that change no plan row.
    assert digest("source.images.http.read_timeout_s=5") == base
    assert digest("source.images.order=[original]") == base
    assert digest("shards.format=webdataset") == base
    # A field set to its default is the same config as the field left out (so a field a later
    # release adds, at its default, does not mark existing plans stale).
    assert digest("selection.keep_all_labels=false", "selection.seed=0") == base
    # Settings a plan is made of.
    assert digest("selection.classes=[Window]") != base
    assert digest("source.images.key_template={image_id}.jpg") != base
    assert digest("shards.images_per_shard=7") != base
    assert digest("selection.max_images=3") != base


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_cache_batches_read_and_write_each_entry_in_order(where, request, tmp_path):
    """get_many/put_many (one thread hand-off per batch in a shard) do what get/put do, per entry."""
    from openimages_od.layout import image_digest
    from openimages_od.pipeline.cache import CacheEntry, ImageCache

    if where == "s3":
        bucket, s3 = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_options")
        st, url = Storage(s3=s3), f"s3://{bucket}/out"
    else:
        st, url = Storage(), str(tmp_path / "out")
    cfg = load_config(None, [f"output.url={url}"])
    cache = ImageCache(st, Layout.from_config(cfg), image_digest(cfg.image))
    entries = [
        CacheEntry(f"{i:016x}", "ok", source="original", width=i + 1, height=2, data=bytes([i]) * (i + 1))
        for i in range(12)
    ]
    cache.put_many(entries[::2])
    got = cache.get_many([e.image_id for e in entries])
    assert got == [e if i % 2 == 0 else None for i, e in enumerate(entries)]
    # A damaged object is a miss, as with get; an empty batch does nothing.
    st.write_bytes(cache.url(entries[0].image_id), b"not an entry")
    assert cache.get_many([entries[0].image_id, entries[2].image_id]) == [None, entries[2]]
    assert cache.get_many([]) == [] and cache.put_many([]) is None
