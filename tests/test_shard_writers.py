"""Shard writers (issue 16): the registry, the WebDataset format, and its guarantees.

Unit tests cover the registry and the tar format. Integration tests prepare a
generated Open Images-layout dataset (:mod:`openimages_od.synth`, images from a
local HTTP server) on the session's embedded Ray, once as TFRecord and once as
WebDataset, and read the tars back with the ``webdataset`` library and Ray
Data's ``read_webdataset``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from crash_writer import arm, crash_sets

from openimages_od.config import Config, load_config
from openimages_od.dataset import dataset_shards, run_status, status
from openimages_od.devservices import Reply
from openimages_od.errors import ConfigError, DataError
from openimages_od.layout import Layout
from openimages_od.pipeline.distribute import run_prepare
from openimages_od.pipeline.example import BytesF, FloatF, IntF, decode_example, encode_example
from openimages_od.pipeline.tfrecord import iter_records
from openimages_od.pipeline.writers import Sample, ShardWriter, UnknownWriter, resolve_writer, write_shard
from openimages_od.pipeline.writers.tfrecord import TFRecordShardWriter
from openimages_od.pipeline.writers.webdataset import WebDatasetShardWriter
from openimages_od.report import build_report
from openimages_od.storage_setup import storage_from_config
from openimages_od.synth import SynthClass, generate_dataset

CLASSES = (
    SynthClass("/m/07yv9", "Vehicle", "rect", (30, 90, 220)),
    SynthClass("/m/014j1m", "Apple", "circle", (200, 30, 30)),
    SynthClass("/m/0bt9lr", "Dog", "triangle", (140, 90, 40)),
)
BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


def _example(image_id: str, n_boxes: int, labels: bool = True) -> bytes:
    feats = {
        "image/encoded": BytesF([b"\xff\xd8jpeg-bytes-" + image_id.encode()]),
        "image/format": BytesF([b"jpeg"]),
        "image/height": IntF([48]),
        "image/width": IntF([64]),
        "image/filename": BytesF([image_id]),
        "image/source_id": BytesF(["123456"]),
        "image/key/sha256": BytesF(["ab" * 32]),
        "image/object/bbox/xmin": FloatF([0.1 + i / 10 for i in range(n_boxes)]),
        "image/object/bbox/xmax": FloatF([0.2 + i / 10 for i in range(n_boxes)]),
        "image/object/bbox/ymin": FloatF([0.3 / (i + 1) for i in range(n_boxes)]),
        "image/object/bbox/ymax": FloatF([0.9 for _ in range(n_boxes)]),
        "image/object/class/label": IntF([i + 1 for i in range(n_boxes)]),
        "image/object/class/text": BytesF([f"/m/{i:04d}" for i in range(n_boxes)]),
        "image/object/group_of": IntF([i % 2 for i in range(n_boxes)]),
        "image/object/is_crowd": IntF([i % 2 for i in range(n_boxes)]),
        "image/object/occluded": IntF([-1 for _ in range(n_boxes)]),
        "image/object/truncated": IntF([0 for _ in range(n_boxes)]),
        "image/object/depiction": IntF([1 for _ in range(n_boxes)]),
    }
    if labels:
        feats["image/class/label"] = IntF([1, 2])
        feats["image/class/text"] = BytesF(["/m/0000", "/m/0001"])
        feats["image/class/confidence"] = FloatF([1.0, 0.0])
    return encode_example(feats)


SAMPLES = [
    Sample("00a1", _example("00a1", 2)),
    Sample("00b2", _example("00b2", 0, labels=False)),
    Sample("0c3f", _example("0c3f", 3)),
]


# --------------------------------------------------------------------------- registry + config


def test_registry_resolves_names_and_import_paths_and_names_what_is_wrong():
    assert resolve_writer("tfrecord") is TFRecordShardWriter
    assert resolve_writer("webdataset") is WebDatasetShardWriter
    assert resolve_writer("crash_writer:CrashOnceTFRecordWriter").extension == "tfrecord"
    with pytest.raises(
        UnknownWriter, match=r"'parquet' is not a known shard writer.*'tfrecord', 'webdataset'"
    ):
        resolve_writer("parquet")
    with pytest.raises(UnknownWriter, match="cannot import module 'no_such_module_oiod'"):
        resolve_writer("no_such_module_oiod:W")
    with pytest.raises(UnknownWriter, match="has no attribute 'Nope'"):
        resolve_writer("crash_writer:Nope")
    with pytest.raises(UnknownWriter, match="not a ShardWriter subclass"):
        resolve_writer("crash_writer:crash_if_victim")
    with pytest.raises(UnknownWriter, match="abstract methods"):
        resolve_writer("openimages_od.pipeline.writers.base:ShardWriter")
    assert issubclass(resolve_writer("webdataset"), ShardWriter)


def test_config_validates_shards_format_and_compression_is_gone():
    assert load_config(None, []).shards.format == "tfrecord"
    assert load_config(None, ["shards.format=webdataset"]).shards.format == "webdataset"
    with pytest.raises(ConfigError, match=r"shards\.format.*'tar' is not a known shard writer"):
        load_config(None, ["shards.format=tar"])
    with pytest.raises(ConfigError, match=r"shards\.compression: unknown key"):
        load_config(None, ["shards.compression=none"])


def test_layout_names_files_by_format_and_keys_tfrecord_as_before(tmp_path):
    t = Layout.from_config(load_config(None, [f"output.url={tmp_path}"]))
    w = Layout.from_config(load_config(None, [f"output.url={tmp_path}", "shards.format=webdataset"]))
    assert t.shard_file("train", "n").endswith("/tfrecords/train/n.tfrecord")
    assert w.shard_file("train", "n").endswith("/tfrecords/train/n.tar")
    assert w.shard_urls("train", "n")["stats"] == t.shard_urls("train", "n")["stats"]


# --------------------------------------------------------------------------- the formats


def test_tfrecord_writer_is_the_plain_framing():
    data = write_shard(TFRecordShardWriter, "s", SAMPLES)
    assert list(iter_records(data, "s")) == [s.example for s in SAMPLES]
    assert list(TFRecordShardWriter.read(data, "s")) == SAMPLES


def test_webdataset_tar_is_deterministic_posix_and_round_trips():
    data = write_shard(WebDatasetShardWriter, "s", SAMPLES)
    assert data == write_shard(WebDatasetShardWriter, "s", SAMPLES)
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{s.image_id}.{e}" for s in SAMPLES for e in ("jpg", "json")]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (
                0,
                0,
                0,
                "",
                "",
                0o644,
                tarfile.REGTYPE,
            )
        doc = json.loads(tar.extractfile("00a1.json").read())  # type: ignore[union-attr]
        jpg = tar.extractfile("00a1.jpg").read()  # type: ignore[union-attr]
    assert data[257:263] == b"ustar\x00"  # POSIX ustar headers, no pax/GNU extensions
    assert jpg == b"\xff\xd8jpeg-bytes-00a1"
    assert doc["image_id"] == "00a1" and doc["source_id"] == "123456"
    assert (doc["width"], doc["height"], doc["labels"], doc["mids"]) == (
        64,
        48,
        [1, 2],
        ["/m/0000", "/m/0001"],
    )
    assert doc["boxes"][1] == pytest.approx([0.2, 0.15, 0.3, 0.9], abs=1e-6)
    assert doc["image_labels"] == {"labels": [1, 2], "mids": ["/m/0000", "/m/0001"], "confidence": [1.0, 0.0]}
    # Read back, every sample is the same tf.Example byte for byte (what --retry-failed reuses).
    assert list(WebDatasetShardWriter.read(data, "s")) == SAMPLES


def test_webdataset_refuses_keys_webdataset_would_split_and_names_bad_tars():
    bad = Sample("a.b", _example("a.b", 1))
    with pytest.raises(DataError, match=r"shard-7: image id 'a\.b' cannot be a WebDataset key"):
        write_shard(WebDatasetShardWriter, "shard-7", [bad])
    with pytest.raises(DataError, match=r"x\.tar: not a readable tar file"):
        list(WebDatasetShardWriter.read(b"not a tar" * 100, "x.tar"))


# --------------------------------------------------------------------------- prepare end to end


def _dataset(tmp_path, image_server, n=24, seed=11):
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
        image_server.script(f"original/{im.split}/{im.image_id}.jpg", [Reply(200, im.jpeg)])
    return ds


def _cfg(ds, out: Path, *sets: str) -> Config:
    base = load_config(
        None,
        [
            f"output.url=file://{out}",
            "ray.num_actors=1",
            "ray.num_cpus_per_actor=0.5",
            "ray.progress=false",
            "ray.max_shard_retries=2",
            "ray.actor_start_timeout_s=60",
            "ray.join_timeout_s=90",
            "source.images.order=[original]",
            "image.max_side=96",
            "source.images.http.max_retries=1",
            "shards.images_per_shard=5",
            f"selection.classes={json.dumps([c.name for c in CLASSES])}",
            *sets,
        ],
    )
    d = base.model_dump(mode="json")
    d["source"] = {**d["source"], **ds.source_config()}
    return Config.model_validate(d)


def _files(out: Path, suffix: str) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob(f"tfrecords/*/*{suffix}"))}


def _tfrecords(out: Path) -> dict[str, dict]:
    recs: dict[str, dict] = {}
    for name, data in _files(out, ".tfrecord").items():
        for rec in iter_records(data, name):
            d = decode_example(rec)
            recs[d["image/filename"][0].decode()] = d
    return recs


def _assert_same_as_tfrecords(samples: list[tuple[str, bytes, dict]], recs: dict[str, dict]) -> None:
    """(key, jpg bytes, annotation) per sample: once each, same image, boxes equal to 1e-6."""
    keys = [k for k, _, _ in samples]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    assert set(keys) == set(recs)
    for key, jpg, doc in samples:
        r = recs[key]
        assert jpg == r["image/encoded"][0]
        assert doc["image_id"] == key and doc["source_id"] == r["image/source_id"][0].decode()
        assert (doc["width"], doc["height"]) == (r["image/width"][0], r["image/height"][0])
        want = list(zip(*(r[f"image/object/bbox/{k}"] for k in BOX_KEYS)))
        assert len(doc["boxes"]) == len(want)
        for got, exp in zip(doc["boxes"], want):
            assert got == pytest.approx(list(exp), abs=1e-6)
        assert doc["labels"] == list(r["image/object/class/label"])
        assert doc["mids"] == [m.decode() for m in r["image/object/class/text"]]
        assert doc["group_of"] == list(r["image/object/group_of"])


@pytest.fixture
def prepared(ray_local, image_server, tmp_path):
    """The same plan prepared as TFRecord and as WebDataset."""
    ds = _dataset(tmp_path, image_server)
    tf_out, wds_out = tmp_path / "tf", tmp_path / "wds"
    assert run_prepare(_cfg(ds, tf_out)) == 0
    wcfg = _cfg(ds, wds_out, "shards.format=webdataset")
    assert run_prepare(wcfg) == 0
    return ds, tf_out, wds_out, wcfg


@pytest.mark.integration
def test_webdataset_shards_read_by_the_webdataset_library_equal_the_tfrecords(prepared, capsys):
    wds = pytest.importorskip("webdataset")
    _, tf_out, wds_out, wcfg = prepared
    recs = _tfrecords(tf_out)
    assert recs and not _files(wds_out, ".tfrecord")
    tars = _files(wds_out, ".tar")
    assert len(tars) >= 4  # train and validation, several shards each
    urls = [str(wds_out / name) for name in tars]
    samples = [
        (s["__key__"], s["jpg"], json.loads(s["json"]))
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    ]
    _assert_same_as_tfrecords(samples, recs)

    # dataset.json and `oiod status` record the format; train/evaluate refuse it before any TF work.
    st = storage_from_config(wcfg)
    doc = st.read_json(Layout.from_config(wcfg).dataset)
    assert doc["shard_format"] == "webdataset"
    assert all(sh["file"].endswith(".tar") for sd in doc["splits"].values() for sh in sd["shards"])
    with pytest.raises(DataError, match=r"format 'webdataset'.*train and evaluate read TFRecord shards only"):
        dataset_shards(wcfg, st, "train")
    s = status(wcfg)
    assert s["up_to_date"] and s["shard_format"] == "webdataset"
    assert s["dataset"]["shard_format"] == "webdataset"
    assert run_status(wcfg) == 0
    assert "format webdataset" in capsys.readouterr().out
    # `oiod report` reads the tars through the same writer.
    html = build_report(wcfg)
    assert "<h2 id='sizes'>Image sizes</h2>" in html and "No committed shards" not in html


@pytest.mark.integration
def test_webdataset_shards_read_by_ray_data_equal_the_tfrecords(prepared):
    import ray.data

    _, tf_out, wds_out, _ = prepared
    paths = [str(wds_out / name) for name in _files(wds_out, ".tar")]
    rows = ray.data.read_webdataset(paths, decoder=None).take_all()
    samples = [(r["__key__"], r["jpg"], json.loads(r["json"])) for r in rows]
    _assert_same_as_tfrecords(samples, _tfrecords(tf_out))


@pytest.mark.integration
def test_webdataset_is_byte_deterministic_and_resumes_without_loss(prepared, tmp_path, monkeypatch):
    ds, _, wds_out, wcfg = prepared
    first = _files(wds_out, ".tar")

    # Another run, another actor count: the same bytes.
    again = tmp_path / "again"
    assert run_prepare(_cfg(ds, again, "shards.format=webdataset", "ray.num_actors=2")) == 0
    assert _files(again, ".tar") == first

    # A committed shard removed: a rerun rebuilds that one alone, byte for byte.
    victim = sorted(first)[1]
    (wds_out / victim).unlink()
    (wds_out / victim.replace(".tar", ".stats.json")).unlink()
    assert run_prepare(wcfg) == 0
    report = storage_from_config(wcfg).read_json(Layout.from_config(wcfg).prepare_report)
    assert report["this_run"]["shards_processed"] == 1
    assert _files(wds_out, ".tar") == first

    # A worker killed mid-shard (while writing the tar): the shard is retried, nothing lost or doubled.
    crashed = tmp_path / "crashed"
    marker = tmp_path / "crash-marker"
    ccfg = _cfg(
        ds,
        crashed,
        *crash_sets("CrashOnceWebDatasetWriter"),
        "ray.max_shards_in_flight_per_actor=1",
    )
    st = storage_from_config(ccfg)
    # The second sample of a shard: the writer has already written the first when the process dies.
    victim_id = [x.image_id for x in WebDatasetShardWriter.read(first[victim], victim)][1]
    arm(monkeypatch, victim_id, marker)
    assert run_prepare(ccfg) == 0
    assert marker.exists(), "the crash writer did not fire"
    assert _files(crashed, ".tar") == first
    report = st.read_json(Layout.from_config(ccfg).prepare_report)
    assert report["this_run"]["shard_retries"] >= 1
