"""Image sources as plug-ins: the registry, config errors, the local and gs:// sources, and the
acceptance check that prepare from the S3 bucket, a local directory and a GCS bucket (a fake GCS
server, ``gcp-storage-emulator`` from PyPI, spoken to with google-cloud-storage's JSON API client;
not the S3-interop path) writes byte-identical shards."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pyarrow as pa
import pytest

from openimages_od.config import Config, ImageSources, load_config
from openimages_od.errors import ConfigError
from openimages_od.pipeline.fetch import Fetcher, source_url
from openimages_od.pipeline.ledger import decode_ledger
from openimages_od.pipeline.sources.base import (
    FetchFailed,
    ImageSource,
    is_permanent_reason,
    source_class,
    source_names,
)
from openimages_od.pipeline.sources.bucket import object_key, object_keys
from openimages_od.pipeline.sources.local import LocalSource, safe_relative_key
from openimages_od.storage import GcsOptions, ObjectNotFound, Storage, StorageError
from openimages_od.synth import SynthClass, generate_dataset

ROW = {"image_id": "00ab", "split": "validation", "original_url": "http://x/a.jpg", "thumbnail_url": ""}


# --------------------------------------------------------------------------- registry and config


def test_registry_names_and_classes():
    assert set(source_names()) >= {"bucket", "original", "thumbnail", "local", "gcs"}
    for name in source_names():
        cls = source_class(name)
        assert issubclass(cls, ImageSource) and cls.name == name
    with pytest.raises(KeyError, match=r"unknown image source 'ftp'.*known: bucket, original"):
        source_class("ftp")


def test_source_urls_of_every_builtin_source(tmp_path):
    src = ImageSources(
        order=["local", "gcs", "bucket"],
        local={"root": str(tmp_path), "key_template": "imgs/{image_id}.jpg"},
        gcs={"bucket": "pub", "key_template": "/oi/{split}/{image_id}.jpg"},
    )
    assert source_url("bucket", ROW, src) == "s3://open-images-dataset/validation/00ab.jpg"
    assert source_url("gcs", ROW, src) == "gs://pub/oi/validation/00ab.jpg"
    assert source_url("local", ROW, src) == str(tmp_path / "imgs" / "00ab.jpg")
    assert source_url("original", ROW, src) == "http://x/a.jpg"
    assert source_url("thumbnail", ROW, src) is None
    assert source_url("local", ROW, ImageSources()) is None  # no root: this source has no image


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["source.images.order=[bucket, ftp]"], r"source\.images\.order.*'ftp'.*known: bucket, original"),
        (["source.images.order=[]"], r"source\.images\.order.*at least one"),
        (["source.images.order=[bucket, bucket]"], r"source\.images\.order.*repeat"),
        (["source.images.order=[local]"], r"source\.images.*local\.root is not set"),
        (["source.images.order=[gcs]"], r"source\.images.*gcs\.bucket is not set"),
        (["source.images.local.root=s3://b/x"], r"source\.images\.local\.root.*local directory"),
        (
            ["source.images.local.key_template='{image_id!r}'"],
            r"source\.images\.local\.key_template.*conversion or format spec",
        ),
        (["source.images.gcs.key_template='{path}.jpg'"], r"source\.images\.gcs\.key_template.*\{split\}"),
        (["source.images.gcs.timeout=3"], r"source\.images\.gcs\.timeout"),
    ],
)
def test_config_errors_name_the_key_and_the_known_sources(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_config_accepts_the_new_sources(tmp_path):
    cfg = load_config(
        None,
        [
            "source.images.order=[local, gcs, bucket]",
            f"source.images.local.root=file://{tmp_path}",
            "source.images.gcs.bucket=gcp-public-data",
            "source.images.gcs.anonymous=true",
        ],
    )
    assert cfg.source.images.order == ["local", "gcs", "bucket"]
    assert cfg.source.images.gcs.storage_options() == GcsOptions(anonymous=True)


def test_one_owner_of_the_object_key():
    ids = ["00ab", "ff01", "/x"]
    for tmpl in (
        "{split}/{image_id}.jpg",
        "/m/{split}/{image_id}",
        "{image_id}",
        "{image_id}/{split}/{image_id}",
    ):
        assert object_keys(tmpl, "train", pa.array(ids)).to_pylist() == [
            object_key(tmpl, "train", i) for i in ids
        ]
    assert object_key("/m/{split}/{image_id}.jpg", "train", "a") == "m/train/a.jpg"
    mirror = ImageSources(bucket="mirror", key_template="oi/{split}/{image_id}.jpg")
    assert source_url("bucket", {**ROW, "bucket_key": "validation/00ab.jpg"}, mirror) == (
        "s3://mirror/oi/validation/00ab.jpg"
    )


# --------------------------------------------------------------------------- local source


@pytest.mark.parametrize(
    "image_id", ["../../etc/passwd", "..", "a/../../b", "a//b", "./a", "a\\..\\b", "a\x00b", "/abs"]
)
def test_local_source_refuses_keys_that_leave_the_root(tmp_path, image_id):
    src = LocalSource(ImageSources(local={"root": str(tmp_path), "key_template": "{image_id}"}))
    with pytest.raises(FetchFailed) as ei:
        src.resolve({"image_id": image_id, "split": "train"})
    assert ei.value.reason == "bad_key"
    assert src.is_permanent(ei.value)
    assert safe_relative_key("train/00ab.jpg") == "train/00ab.jpg"


def test_local_source_fetches_bytes_and_classifies_failures(tmp_path):
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "00ab.jpg").write_bytes(b"\xff\xd8jpeg")
    (tmp_path / "validation" / "big.jpg").write_bytes(b"x" * 2048)
    sources = ImageSources(order=["local"], local={"root": f"file://{tmp_path}"}, http={"max_body_mb": 0.001})

    async def run():
        f = Fetcher(sources, concurrency=2)
        try:
            ok = await f.fetch("local", ROW)
            errs = {}
            for iid in ("missing", "big", "../validation/00ab"):
                with pytest.raises(FetchFailed) as ei:
                    await f.fetch("local", {**ROW, "image_id": iid})
                errs[iid] = ei.value
            return ok, errs, f
        finally:
            await f.close()

    ok, errs, f = asyncio.run(run())
    assert (
        ok.data == b"\xff\xd8jpeg"
        and ok.source == "local"
        and ok.url == str(tmp_path / "validation/00ab.jpg")
    )
    assert [errs[i].reason for i in ("missing", "big", "../validation/00ab")] == [
        "local_not_found",
        "too_large",
        "bad_key",
    ]
    assert all(f.is_permanent("local", e) for e in errs.values())


def test_permanent_and_transient_reasons():
    permanent = [
        "http_404",
        "http_403",
        "http_410",
        "http_400",
        "s3_not_found",
        "gcs_access_denied",
        "local_not_found",
        "no_url",
        "bad_url",
        "bad_key",
        "too_large",
        "redirect_loop",
    ]
    transient = [
        "http_500",
        "http_503",
        "http_429",
        "http_408",
        "timeout",
        "connection",
        "truncated",
        "s3_error",
        "gcs_error",
        "fetch_error",
    ]
    assert [r for r in permanent if not is_permanent_reason(r)] == []
    assert [r for r in transient if is_permanent_reason(r)] == []


# --------------------------------------------------------------------------- gs:// storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fake_gcs():
    """A fake GCS JSON API server (gcp-storage-emulator, in memory) on loopback."""
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    port = _free_port()
    server = server_mod.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _gcs_bucket(endpoint: str, name: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(
        credentials=AnonymousCredentials(), project="test", client_options={"api_endpoint": endpoint}
    )
    client.create_bucket(name)


@pytest.mark.integration
def test_gs_storage_backend_roundtrip(fake_gcs, tmp_path):
    _gcs_bucket(fake_gcs, "roundtrip")
    st = Storage(gcs=GcsOptions(endpoint_url=fake_gcs, anonymous=True, max_attempts=2))
    url = "gs://roundtrip/a/b.bin"
    st.write_bytes(url, b"0123456789")
    with st.open_write("gs://roundtrip/a/c.bin") as fh:
        fh.write(b"streamed")
    assert st.read_bytes(url) == b"0123456789"
    assert st.read_range(url, 2, 5) == b"234"
    assert st.exists(url) and not st.exists("gs://roundtrip/a/none")
    assert st.size(url) == 10
    assert [(o.url, o.size) for o in st.list("gs://roundtrip/a/")] == [
        ("gs://roundtrip/a/b.bin", 10),
        ("gs://roundtrip/a/c.bin", 8),
    ]
    with pytest.raises(ObjectNotFound, match="gs://roundtrip/a/none"):
        st.read_bytes("gs://roundtrip/a/none")
    st.download_file(url, tmp_path / "dl.bin")
    assert (tmp_path / "dl.bin").read_bytes() == b"0123456789"
    with pytest.raises(StorageError, match="only used on s3://"):
        st.put_conditional("gs://roundtrip/lock", b"one")
    st.delete(url)
    st.delete(url)  # missing: not an error
    assert not st.exists(url)


# --------------------------------------------------------------------------- acceptance 2

CLASSES = (
    SynthClass("/m/07yv9", "Vehicle", "rect", (30, 90, 220)),
    SynthClass("/m/014j1m", "Apple", "circle", (200, 30, 30)),
)


def _prepare_cfg(ds, out: Path, *sets: str) -> Config:
    base = load_config(
        None,
        [
            f"output.url=file://{out}",
            "ray.num_actors=1",
            "ray.num_cpus_per_actor=0.5",
            "ray.progress=false",
            "ray.max_shard_retries=1",
            "ray.actor_start_timeout_s=60",
            "image.max_side=96",
            "shards.images_per_shard=5",
            f"selection.classes={json.dumps([c.name for c in CLASSES])}",
            *sets,
        ],
    )
    d = base.model_dump(mode="json")
    d["source"] = {**d["source"], **ds.source_config()}
    d["source"]["images"] = {**base.source.images.model_dump(mode="json"), **d["source"].get("images", {})}
    return Config.model_validate(d)


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tfrecord"))}


@pytest.mark.integration
def test_prepare_from_bucket_local_dir_and_gcs_writes_identical_shards(
    ray_local, seaweedfs, s3_bucket, fake_gcs, tmp_path
):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from openimages_od.pipeline.distribute import run_prepare

    ds = generate_dataset(tmp_path / "ds", 14, classes=CLASSES, min_side=64, max_side=120, seed=11)
    images = sorted(p for p in ds.bucket_dir.rglob("*.jpg"))
    assert images
    # The same files in the S3 bucket (SeaweedFS) and a GCS bucket (fake server).
    s3 = seaweedfs.client()
    for p in images:
        s3.put_object(Bucket=s3_bucket, Key=f"mirror/{p.relative_to(ds.bucket_dir)}", Body=p.read_bytes())
    _gcs_bucket(fake_gcs, "oi-images")
    client = gcs.Client(
        credentials=AnonymousCredentials(), project="t", client_options={"api_endpoint": fake_gcs}
    )
    for p in images:
        client.bucket("oi-images").blob(f"v7/{p.relative_to(ds.bucket_dir)}").upload_from_filename(str(p))

    s3_sets = [
        "source.images.order=[bucket]",
        f"source.images.bucket={s3_bucket}",
        "source.images.key_template=mirror/{split}/{image_id}.jpg",
        f"source.images.s3.endpoint_url={seaweedfs.endpoint}",
        "source.images.s3.unsigned=false",
        "source.images.s3.addressing_style=path",
        "source.images.s3.region=us-east-1",
    ]
    runs = {
        "bucket": s3_sets,
        "local": ["source.images.order=[local]", f"source.images.local.root={ds.bucket_dir}"],
        "gcs": [
            "source.images.order=[gcs]",
            "source.images.gcs.bucket=oi-images",
            "source.images.gcs.key_template=v7/{split}/{image_id}.jpg",
            f"source.images.gcs.endpoint_url={fake_gcs}",
            "source.images.gcs.anonymous=true",
        ],
    }
    shards = {}
    for name, sets in runs.items():
        out = tmp_path / f"out-{name}"
        cfg = _prepare_cfg(ds, out, *sets)
        assert run_prepare(cfg) == 0, name
        shards[name] = _shards(out)
        entries = [
            e for p in sorted((out / "ledger").rglob("*.jsonl")) for e in decode_ledger(p.read_bytes())
        ]
        assert len(entries) == len(images), name  # every planned image ...
        assert {(e.status, e.source) for e in entries} == {("ok", name)}, name  # ... from this source
    assert shards["bucket"], "no shards written"
    assert sum(len(v) for v in shards["bucket"].values()) > 0
    assert shards["local"] == shards["bucket"]
    assert shards["gcs"] == shards["bucket"]


# --------------------------------------------------------------------------- serving: gs:// images


@pytest.mark.integration
def test_serving_reads_gs_images_only_under_allowed_prefixes(fake_gcs):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from openimages_od.serving.errors import ApiError
    from openimages_od.serving.pools import WorkPool
    from openimages_od.serving.s3_source import S3ImageSource

    _gcs_bucket(fake_gcs, "serve-imgs")
    bucket = gcs.Client(
        credentials=AnonymousCredentials(), project="t", client_options={"api_endpoint": fake_gcs}
    ).bucket("serve-imgs")
    bucket.blob("ok/a.png").upload_from_string(b"\x89PNG-small")
    bucket.blob("ok/big.png").upload_from_string(b"\x89PNG" + b"\0" * 4096)
    bucket.blob("secret/a.png").upload_from_string(b"\x89PNG-secret")
    st = Storage(gcs=GcsOptions(endpoint_url=fake_gcs, anonymous=True))

    async def status(src: S3ImageSource, url: str) -> tuple[int, str] | bytes:
        try:
            return await src.fetch(url)
        except ApiError as exc:
            return exc.status, exc.code

    async def run() -> dict[str, tuple[int, str] | bytes]:
        pool = WorkPool("fetch", 2, 10.0)
        closed = S3ImageSource([], st, 1024, 10.0, pool)
        src = S3ImageSource(["gs://serve-imgs/ok"], st, 1024, 10.0, pool)
        try:
            return {
                "off": await status(closed, "gs://serve-imgs/ok/a.png"),
                "ok": await status(src, "gs://serve-imgs/ok/a.png"),
                "outside": await status(src, "gs://serve-imgs/secret/a.png"),
                "sibling": await status(src, "gs://serve-imgs/ok-private/a.png"),
                "dots": await status(src, "gs://serve-imgs/ok/../secret/a.png"),
                "missing": await status(src, "gs://serve-imgs/ok/none.png"),
                "big": await status(src, "gs://serve-imgs/ok/big.png"),
            }
        finally:
            await src.close()
            await closed.close()
            pool.close()

    got = asyncio.run(run())
    assert got == {
        "off": (403, "gs_not_allowed"),
        "ok": b"\x89PNG-small",
        "outside": (403, "gs_not_allowed"),
        "sibling": (403, "gs_not_allowed"),
        "dots": (400, "bad_url"),
        "missing": (422, "fetch_failed"),
        "big": (413, "image_too_large"),
    }


def test_serve_config_accepts_gs_prefixes():
    cfg = load_config(None, ["serve.allowed_image_prefixes=['gs://b/imgs', 's3://c/x/']"])
    assert cfg.serve.allowed_image_prefixes == ["gs://b/imgs/", "s3://c/x/"]
    with pytest.raises(ConfigError, match=r"allowed_image_prefixes.*s3:// or gs://"):
        load_config(None, ["serve.allowed_image_prefixes=['ftp://b/x/']"])


def test_storage_imports_no_config():
    """The storage layer and the source interface stand alone: no config <-> storage import cycle."""
    import subprocess
    import sys

    code = (
        "import sys, openimages_od.storage, openimages_od.pipeline.sources.base; "
        "bad = [m for m in ('openimages_od.config',) if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.integration
def test_serving_model_location_on_gs_is_downloaded_through_storage(fake_gcs):
    """``serve.model: gs://...`` lists and copies the export through the storage layer; a broken
    ``model.json`` is reported with its gs:// URL before TensorFlow is touched."""
    from openimages_od.errors import DataError, OiodError
    from openimages_od.openimages.labelmap import LabelMap
    from openimages_od.serving.model import ExportedModel

    _gcs_bucket(fake_gcs, "models")
    st = Storage(gcs=GcsOptions(endpoint_url=fake_gcs, anonymous=True))
    with pytest.raises(OiodError, match="no exported model at gs://models/none"):
        ExportedModel.load("gs://models/none", storage=st, warmup=False)
    root = "gs://models/m1"
    st.write_bytes(f"{root}/saved_model/saved_model.pb", b"not a model")
    st.write_bytes(
        f"{root}/label_map.pbtxt", LabelMap.from_mids(["/m/0k4j"], {"/m/0k4j": "Car"}).to_pbtxt().encode()
    )
    st.write_bytes(f"{root}/model.json", b"{broken")
    with pytest.raises(DataError, match=r"gs://models/m1/model\.json: not valid JSON"):
        ExportedModel.load(root, storage=st, warmup=False)
