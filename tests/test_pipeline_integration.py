"""Integration tests for ``oiod prepare``: real Ray, a faulty HTTP server, SeaweedFS.

Every test builds its plan with :func:`pipeline_helpers.write_plan`, runs the
real driver (:func:`run_prepare`) on the session's embedded Ray, and checks
what landed in the shards and ledgers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_writer import arm, crash_sets
from pipeline_helpers import b64md5, box, image_row, photo, write_plan

from openimages_od.config import dump_config, load_config
from openimages_od.devservices import Reply
from openimages_od.openimages.ids import source_id
from openimages_od.pipeline.distribute import ShardWorker, run_prepare
from openimages_od.pipeline.example import decode_example
from openimages_od.pipeline.ledger import decode_ledger
from openimages_od.pipeline.shard import ShardTask
from openimages_od.pipeline.tfrecord import iter_records
from openimages_od.storage import Storage
from openimages_od.storage_setup import storage_from_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent

FAST_HTTP = [
    "source.images.http.connect_timeout_s=2",
    "source.images.http.read_timeout_s=1",
    "source.images.http.total_timeout_s=2",
    "source.images.http.backoff_base_s=0.05",
    "source.images.http.backoff_max_s=0.2",
    "source.images.http.max_retries=3",
    "source.images.http.max_retry_after_s=2",
    "source.images.http.max_redirects=3",
]


def _cfg(out_url: str, *sets: str):
    return load_config(
        None,
        [
            f"output.url={out_url}",
            "ray.num_actors=1",
            "ray.num_cpus_per_actor=0.5",
            "ray.progress=false",
            "image.max_side=128",
            "ray.max_shard_retries=2",
            "ray.actor_start_timeout_s=60",
            *FAST_HTTP,
            *sets,
        ],
    )


def _shards(storage: Storage, cfg, split: str = "train") -> dict[str, bytes]:
    prefix = cfg.output_path("tfrecords", split) + "/"
    return {
        o.url.rsplit("/", 1)[1]: storage.read_bytes(o.url)
        for o in storage.list(prefix)
        if o.url.endswith(".tfrecord")
    }


def _records(shards: dict[str, bytes]) -> dict[str, dict]:
    out = {}
    for name, data in shards.items():
        for rec in iter_records(data, name):
            d = decode_example(rec)
            fn = d["image/filename"][0].decode()
            assert fn not in out, f"{fn} written twice"
            out[fn] = d
    return out


def _ledger(storage: Storage, cfg, split: str = "train") -> dict[str, object]:
    out = {}
    for o in storage.list(cfg.output_path("ledger", split) + "/"):
        for e in decode_ledger(storage.read_bytes(o.url)):
            assert e.image_id not in out
            out[e.image_id] = e
    return out


def _simple_rows(srv, n: int, prefix: str = "c", delay_s: float = 0.0, size=(160, 120)) -> list[dict]:
    rows = []
    for i in range(n):
        iid = f"{prefix}{i:015x}"
        body = photo(*size, seed=i)
        url = srv.script(f"o/{iid}.jpg", [Reply(200, body, delay_s=delay_s)])
        rows.append(
            image_row(
                iid,
                original_url=url,
                rotation=[0, 90, 180, 270][i % 4],
                boxes=[box(1 + i % 3, 0.1, 0.4, 0.2, 0.7)],
            )
        )
    return rows


# --------------------------------------------------------------------------- faults + S3


def test_faults_recover_and_every_image_is_accounted_for(ray_local, seaweedfs, image_server, tmp_path):
    src_bucket = seaweedfs.create_bucket(f"src-{os.getpid()}-{int(time.time())}")
    out_bucket = seaweedfs.create_bucket(f"out-{os.getpid()}-{int(time.time())}")
    s3 = seaweedfs.client()
    srv = image_server
    rows, expect = [], {}

    def add(iid, expected, **kw):
        rows.append(image_row(iid, **kw))
        expect[iid] = expected

    # In the (mirror) bucket only, one of them rotated.
    for iid, rot in (("a000000000000000", None), ("a000000000000001", 90)):
        s3.put_object(Bucket=src_bucket, Key=f"mirror/train/{iid}.jpg", Body=photo(200, 150, seed=1))
        add(iid, ("ok", "bucket"), rotation=rot)
    good = photo(180, 120, seed=2)
    add(
        "b000000000000001",
        ("ok", "original"),
        original_url=srv.add("ok.jpg", good),
        original_md5=b64md5(good),
    )
    add(
        "b000000000000002",
        ("ok", "original"),
        original_url=srv.script("e500.jpg", [Reply(500), Reply(200, good)]),
    )
    add(
        "b000000000000003",
        ("ok", "original"),
        original_url=srv.script("e429.jpg", [Reply(429, headers={"Retry-After": "1"}), Reply(200, good)]),
    )
    add(
        "b000000000000004",
        ("ok", "original"),
        original_url=srv.script("slow.jpg", [Reply(200, good, delay_s=4), Reply(200, good)]),
    )
    add(
        "b000000000000005",
        ("ok", "original"),
        original_url=srv.script("trunc.jpg", [Reply(200, good, truncate_at=100), Reply(200, good)]),
    )
    add(
        "b000000000000006",
        ("ok", "thumbnail"),
        original_url=srv.add("html.jpg", b"<html>gone</html>", content_type="text/html"),
        thumbnail_url=srv.add("t6.jpg", good),
    )
    add(
        "b000000000000007",
        ("failed", "http_404"),
        original_url=srv.url("missing.jpg"),
        thumbnail_url=srv.url("missing-thumb.jpg"),
    )
    add(
        "b000000000000008",
        ("failed", "redirect_loop"),
        original_url=srv.script("loop-a", [Reply(302, headers={"Location": "/loop-b"})]),
    )
    srv.script("loop-b", [Reply(302, headers={"Location": "/loop-a"})])
    add(
        "b000000000000009",
        ("ok", "thumbnail"),
        original_url=srv.add("md5.jpg", good),
        original_md5=b64md5(b"something else"),
        thumbnail_url=srv.add("t9.jpg", good),
    )
    add(
        "b00000000000000a",
        ("failed", "placeholder_redirect"),
        original_url=srv.script("gone.jpg", [Reply(302, headers={"Location": "/photo_unavailable.png"})]),
    )
    add("b00000000000000b", ("failed", "http_503"), original_url=srv.script("e503.jpg", [Reply(503)]))
    add("b00000000000000c", ("failed", "http_403"), original_url=srv.script("e403.jpg", [Reply(403)]))

    ep = seaweedfs.endpoint
    cfg = _cfg(
        f"s3://{out_bucket}/run",
        "ray.num_actors=2",
        "ray.concurrency_per_actor=8",
        f"output.s3.endpoint_url={ep}",
        "output.s3.addressing_style=path",
        "output.s3.region=us-east-1",
        f"source.images.bucket={src_bucket}",
        "source.images.key_template=mirror/{split}/{image_id}.jpg",
        f"source.images.s3.endpoint_url={ep}",
        "source.images.s3.unsigned=false",
        "source.images.s3.addressing_style=path",
        "source.images.s3.region=us-east-1",
    )
    st = storage_from_config(cfg)
    write_plan(st, cfg.output_root, rows, images_per_shard=4)
    assert run_prepare(cfg) == 0

    recs = _records(_shards(st, cfg))
    ledger = _ledger(st, cfg)
    assert set(ledger) == set(expect)
    for iid, (status, what) in expect.items():
        e = ledger[iid]
        assert e.status == status, (iid, e)
        if status == "ok":
            assert e.source == what and iid in recs, (iid, e)
        else:
            assert e.error == what and iid not in recs, (iid, e)
    assert set(recs) == {i for i, (s, _) in expect.items() if s == "ok"}
    # Transient faults were retried, final ones were not.
    assert srv.hits["/e500.jpg"] == 2 and srv.hits["/e429.jpg"] == 2 and srv.hits["/trunc.jpg"] == 2
    assert srv.hits["/e503.jpg"] == 4  # 1 + max_retries
    assert srv.hits["/e403.jpg"] == 1 and srv.hits["/missing.jpg"] == 1
    assert ledger["b000000000000006"].attempts == ["bucket:s3_not_found", "original:not_image"]
    assert recs["a000000000000001"]["image/width"] == (96,) and recs["a000000000000001"]["image/height"] == (
        128,
    )
    report = st.read_json(cfg.output_path("prepare_report.json"))
    assert report["totals"]["ok"] == 9 and report["totals"]["failed"] == 5
    assert report["totals"]["failed_by_reason"]["http_404"] == 1
    assert st.exists(cfg.output_path("tfrecords", "config.resolved.yaml"))

    # A rerun skips every committed shard: no request at all.
    before = sum(srv.hits.values())
    shards_before = _shards(st, cfg)
    assert run_prepare(cfg) == 0
    assert sum(srv.hits.values()) == before
    assert _shards(st, cfg) == shards_before


# --------------------------------------------------------------------------- killed actor


def test_killed_actor_shard_is_retried_byte_identical(ray_local, image_server, tmp_path, monkeypatch):
    rows = _simple_rows(image_server, 10)
    clean = _cfg(f"{tmp_path}/clean")
    st = storage_from_config(clean)
    write_plan(st, clean.output_root, rows, images_per_shard=3)
    assert run_prepare(clean) == 0
    hits_clean = dict(image_server.hits)

    crash = _cfg(f"{tmp_path}/crash", "ray.max_shards_in_flight_per_actor=1", *crash_sets())
    write_plan(st, crash.output_root, rows, images_per_shard=3)
    victim = rows[5]["image_id"]
    marker = tmp_path / "crashed"
    arm(monkeypatch, victim, marker)
    assert run_prepare(crash) == 0
    assert marker.exists(), "the crash hook did not fire"
    assert _shards(st, crash) == _shards(st, clean)
    report = st.read_json(crash.output_path("prepare_report.json"))
    assert report["this_run"]["shard_retries"] >= 1
    # Only the victim's shard was fetched again.
    victim_shard = next(
        e
        for e in report["shards"]
        if victim
        in {
            rec.image_id
            for rec in decode_ledger(
                st.read_bytes(crash.output_path("ledger", "train", e["name"] + ".jsonl"))
            )
        }
    )
    victim_ids = {
        rec.image_id
        for rec in decode_ledger(
            st.read_bytes(crash.output_path("ledger", "train", victim_shard["name"] + ".jsonl"))
        )
    }
    for r in rows:
        path = "/o/" + r["image_id"] + ".jpg"
        n = image_server.hits[path] - hits_clean[path]
        assert n == 1 or (n == 2 and r["image_id"] in victim_ids), (r["image_id"], n)


def test_progress_bar_survives_a_killed_actor(ray_local, image_server, tmp_path, monkeypatch, capfd):
    """With the bar on, progress keeps coming after an actor restart (the driver gathers it
    with its heartbeats), and Ray has no constructor argument in the object store to warn about."""
    rows = _simple_rows(image_server, 8, prefix="p")
    cfg = _cfg(f"{tmp_path}/bar", "ray.progress=true", "ray.max_shards_in_flight_per_actor=1", *crash_sets())
    write_plan(storage_from_config(cfg), cfg.output_root, rows, images_per_shard=4)
    marker = tmp_path / "crashed"
    arm(monkeypatch, rows[6]["image_id"], marker)
    assert run_prepare(cfg) == 0
    assert marker.exists(), "the crash hook did not fire"
    err = capfd.readouterr().err
    assert "constructor arguments in the object store" not in err
    counts = [int(m) for m in re.findall(r"(\d+)/8 images", err)]
    assert counts and max(counts) >= 8, err[-2000:]


def test_worker_heartbeat_counts_images_of_running_shards(ray_local, image_server, tmp_path):
    """The heartbeat (liveness + progress for the driver's bar) counts only shards still running."""
    rows = _simple_rows(image_server, 3, prefix="h", delay_s=0.5)
    cfg = _cfg(f"{tmp_path}/out")
    st = storage_from_config(cfg)
    manifest = write_plan(st, cfg.output_root, rows, images_per_shard=8)
    task = ShardTask(
        "train",
        0,
        manifest.splits["train"].num_shards,
        f"{cfg.output_path('plan')}/{manifest.splits['train'].shards[0]}",
    )
    worker = ShardWorker(cfg.model_dump(mode="json"))

    async def go():
        run = asyncio.create_task(worker.run(task))
        seen = []
        while not run.done():
            seen.append(await worker.heartbeat())
            await asyncio.sleep(0.05)
        stats = await run
        after = await worker.heartbeat()
        await worker._context().fetcher.close()
        return seen, stats, after

    seen, stats, after = asyncio.run(go())
    assert stats["ok"] == 3
    assert seen[0] == (0, 0, 0) and max(s[0] for s in seen) >= 1
    assert after == (0, 0, 0)


# --------------------------------------------------------------------------- killed driver


def test_killed_driver_rerun_skips_committed_shards(ray_local, image_server, tmp_path):
    rows = _simple_rows(image_server, 12, prefix="d", delay_s=0.3)
    clean = _cfg(f"{tmp_path}/clean")
    st = storage_from_config(clean)
    write_plan(st, clean.output_root, rows, images_per_shard=3)
    assert run_prepare(clean) == 0
    hits_clean = dict(image_server.hits)

    gcs = ray_local.get_runtime_context().gcs_address
    run = _cfg(
        f"{tmp_path}/run",
        "ray.concurrency_per_actor=1",
        "ray.max_shards_in_flight_per_actor=1",
        f"ray.address={gcs}",
    )
    write_plan(st, run.output_root, rows, images_per_shard=3)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(run))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openimages_od", "prepare", "-c", str(cfg_file)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    stats_dir = Path(run.output_path("tfrecords", "train").removeprefix("file://"))
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(stats_dir.glob("*.stats.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        committed_first = {p.name.removesuffix(".stats.json") for p in stats_dir.glob("*.stats.json")}
        assert committed_first
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    committed = {p.name.removesuffix(".stats.json") for p in stats_dir.glob("*.stats.json")}
    assert len(committed) < 4, "the driver finished before it was killed"
    ledgers = {
        name: {
            e.image_id
            for e in decode_ledger(st.read_bytes(run.output_path("ledger", "train", name + ".jsonl")))
        }
        for name in committed
    }
    hits_mid = dict(image_server.hits)

    assert run_prepare(run) == 0
    assert _shards(st, run) == _shards(st, clean)
    committed_ids = set().union(*ledgers.values())
    for r in rows:
        path = "/o/" + r["image_id"] + ".jpg"
        if r["image_id"] in committed_ids:
            assert image_server.hits[path] == hits_mid[path] == hits_clean[path] + 1, r["image_id"]


# --------------------------------------------------------------------------- --retry-failed


def test_retry_failed_refetches_only_failed_images(ray_local, image_server, tmp_path):
    rows = _simple_rows(image_server, 6, prefix="e")
    flaky = rows[2]["image_id"]
    good = photo(160, 120, seed=2)
    clean = _cfg(f"{tmp_path}/clean")
    st = storage_from_config(clean)
    write_plan(st, clean.output_root, rows, images_per_shard=6)
    assert run_prepare(clean) == 0

    image_server.script(f"o/{flaky}.jpg", [Reply(503)])
    run = _cfg(f"{tmp_path}/run", "source.images.http.max_retries=0")
    write_plan(st, run.output_root, rows, images_per_shard=6)
    assert run_prepare(run) == 0
    assert _ledger(st, run)[flaky].error == "http_503"
    assert flaky not in _records(_shards(st, run))

    image_server.script(f"o/{flaky}.jpg", [Reply(200, good)])
    before = dict(image_server.hits)
    assert run_prepare(run) == 0  # plain rerun: committed, nothing fetched
    assert dict(image_server.hits) == before
    assert run_prepare(run, retry_failed=True) == 0
    fetched = {p: image_server.hits[p] - before.get(p, 0) for p in image_server.hits}
    assert {p for p, n in fetched.items() if n} == {f"/o/{flaky}.jpg"}
    assert _shards(st, run) == _shards(st, clean)
    ledger = _ledger(st, run)
    assert ledger[flaky].status == "ok" and sum(e.reused for e in ledger.values()) == 5


# --------------------------------------------------------------------------- Model Garden decoder


@pytest.mark.tf
def test_shards_decode_with_model_garden(ray_local, image_server, tmp_path):
    tf = pytest.importorskip("tensorflow")
    decoder_mod = pytest.importorskip("official.vision.dataloaders.tf_example_decoder")
    from openimages_od.pipeline.geometry import ops_for_rotation, target_size, transform_box

    rows = []
    for i, rot in enumerate([0, 90, 180, 270, None]):
        iid = f"f{i:015x}"
        url = image_server.add(f"mg/{iid}.jpg", photo(240, 160, seed=i))
        rows.append(
            image_row(
                iid,
                original_url=url,
                rotation=rot,
                boxes=[box(1, 0.1, 0.3, 0.2, 0.9, group_of=1), box(3, 0.55, 0.95, 0.05, 0.45)],
                image_labels=[{"label_id": 2, "mid": "/m/01g317", "confidence": 1.0}],
            )
        )
    cfg = _cfg(f"{tmp_path}/mg")
    st = storage_from_config(cfg)
    write_plan(st, cfg.output_root, rows, images_per_shard=2)
    assert run_prepare(cfg) == 0
    files = sorted(
        str(Path(u.removeprefix("file://")))
        for u in (o.url for o in st.list(cfg.output_path("tfrecords", "train") + "/"))
        if u.endswith(".tfrecord")
    )
    decoder = decoder_mod.TfExampleDecoder(include_mask=False, regenerate_source_id=False)
    by_id = {r["image_id"]: r for r in rows}
    seen = 0
    for serialized in tf.data.TFRecordDataset(files):
        d = decoder.decode(serialized)
        fn = tf.io.parse_single_example(serialized, {"image/filename": tf.io.FixedLenFeature([], tf.string)})
        row = by_id[fn["image/filename"].numpy().decode()]
        ops = ops_for_rotation(row["rotation"])
        w, h = target_size(240, 160, 128)
        if len(ops) and row["rotation"] in (90, 270):
            w, h = h, w
        assert (int(d["height"]), int(d["width"])) == (h, w)
        assert tuple(d["image"].shape) == (h, w, 3)
        want = [transform_box((b["xmin"], b["xmax"], b["ymin"], b["ymax"]), ops) for b in row["boxes"]]
        got = d["groundtruth_boxes"].numpy()  # ymin, xmin, ymax, xmax
        for g, (xmin, xmax, ymin, ymax) in zip(got, want):
            assert abs(g[0] - ymin) < 1e-6 and abs(g[1] - xmin) < 1e-6
            assert abs(g[2] - ymax) < 1e-6 and abs(g[3] - xmax) < 1e-6
        assert d["groundtruth_classes"].numpy().tolist() == [1, 3]
        assert d["groundtruth_is_crowd"].numpy().tolist() == [True, False]
        assert d["source_id"].numpy().decode() == str(source_id(row["image_id"]))
        seen += 1
    assert seen == len(rows)


# --------------------------------------------------------------------------- plan first, then prepare (synth data)


def test_prepare_plans_first_and_matches_upright_boxes(ray_local, image_server, tmp_path):
    from openimages_od.config import Config
    from openimages_od.synth import generate_dataset, upright_boxes

    ds = generate_dataset(
        tmp_path / "ds",
        12,
        base_url=image_server.url("").rstrip("/"),
        rotation_rate=0.5,
        min_side=96,
        max_side=160,
        seed=11,
    )
    for im in ds.images:
        image_server.add(f"original/{im.split}/{im.image_id}.jpg", im.jpeg)
    base = _cfg(
        f"{tmp_path}/out",
        "source.images.order=[original]",
        "shards.images_per_shard=4",
        "image.max_side=1024",
        "image.verify_md5=false",
    )
    cfg = Config.model_validate(
        {
            **base.model_dump(mode="json"),
            "source": {**base.model_dump(mode="json")["source"], **ds.source_config()},
        }
    )
    st = storage_from_config(cfg)
    assert not st.exists(cfg.output_path("plan", "manifest.json"))
    assert run_prepare(cfg) == 0
    assert st.exists(cfg.output_path("plan", "manifest.json"))
    seen = 0
    for split in ("train", "validation"):
        recs = _records(_shards(st, cfg, split))
        for im in ds.split_images(split):
            d = recs[im.image_id]
            want = sorted(
                (round(b["XMin"], 5), round(b["XMax"], 5), round(b["YMin"], 5), round(b["YMax"], 5))
                for b in upright_boxes(im)
            )
            got = sorted(
                zip(
                    *(
                        tuple(round(v, 5) for v in d[f"image/object/bbox/{k}"])
                        for k in ("xmin", "xmax", "ymin", "ymax")
                    )
                )
            )
            assert len(got) == len(want) and all(
                abs(a - b) < 1e-4 for g, w in zip(got, want) for a, b in zip(g, w)
            ), (im.image_id, im.rotation, got, want)
            w, h = (im.height, im.width) if im.rotation in (90, 270) else (im.width, im.height)
            assert (d["image/width"][0], d["image/height"][0]) == (w, h)
            seen += 1
    assert seen == len(ds.images)


# --------------------------------------------------------------------------- stuck shard


def test_stuck_shard_times_out_and_is_reported(ray_local, image_server, tmp_path):
    from openimages_od.errors import OiodError

    rows = _simple_rows(image_server, 3, prefix="g")
    image_server.script(f"o/{rows[1]['image_id']}.jpg", [Reply(200, photo(64, 48), delay_s=6)])
    cfg = _cfg(
        f"{tmp_path}/stuck",
        "ray.shard_timeout_s=1.5",
        "ray.max_shard_retries=1",
        "source.images.http.read_timeout_s=60",
        "source.images.http.total_timeout_s=60",
    )
    st = storage_from_config(cfg)
    write_plan(st, cfg.output_root, rows, images_per_shard=3, num_shards={"train": 1})
    t0 = time.monotonic()
    with pytest.raises(OiodError, match="train-00000-of-00001"):
        run_prepare(cfg)
    assert time.monotonic() - t0 < 25
    assert not st.exists(cfg.output_path("tfrecords", "train", "train-00000-of-00001.stats.json"))
    report = st.read_json(cfg.output_path("prepare_report.json"))
    assert list(report["failed_shards"]) == ["train-00000-of-00001"]
    assert report["this_run"]["shard_retries"] == 2  # the first attempt and its one retry both timed out
