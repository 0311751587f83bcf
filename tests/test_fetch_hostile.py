"""The fetcher and the image checks against a hostile upstream (issue #12, items 6-8).

Contract: whatever the upstream does, :meth:`Fetcher.fetch` raises only
:class:`FetchFailed` with a stable reason, holds at most ``max_body_mb`` in
memory, and a JPEG whose scan holds fewer pixels than its header claims is
rejected. The prepare run over the same catalogue is in
``test_pipeline_integration.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import tracemalloc

import aiohttp
import pytest
import yarl
from hostile_upstream import HOSTILE_HTTP, MAX_BODY, bomb, install, tall_jpeg
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_helpers import photo

from openimages_od.config import load_config
from openimages_od.devservices import Reply
from openimages_od.pipeline.fetch import Fetcher, FetchFailed
from openimages_od.pipeline.geometry import render
from openimages_od.pipeline.verify import Rejected, open_image

pytestmark = pytest.mark.integration


def _sources():
    return load_config(None, HOSTILE_HTTP).source.images


def _row(url):
    return {"image_id": "0" * 16, "split": "train", "original_url": url}


async def _outcome(f: Fetcher, url: str) -> tuple[str, bytes | None]:
    try:
        got = await f.fetch("original", _row(url))
    except FetchFailed as exc:
        return exc.reason, None
    return "fetched", got.data


def _verify(data: bytes) -> str:
    try:
        render(open_image(data, max_pixels=10**8), data, rotation=None, max_side=128, quality=90)
    except Rejected as exc:
        return exc.reason
    return "ok"


@pytest.mark.asyncio
async def test_every_hostile_upstream_fails_only_its_image(image_server):
    cases = install(image_server)
    f = Fetcher(_sources(), concurrency=16)
    try:
        got = await asyncio.gather(*(_outcome(f, c.url) for c in cases))
    finally:
        await f.close()
    for case, (outcome, data) in zip(cases, got):
        if case.reason is None:
            assert outcome == "fetched" and _verify(data) == "ok", (case.name, outcome)
        elif case.stage == "fetch":
            assert outcome == case.reason, (case.name, outcome)
        else:
            assert outcome == "fetched" and _verify(data) == case.reason, (case.name, outcome)
    # Final failures are not retried; transient ones once (max_retries=1).
    assert image_server.hits["/h/redirect-ftp"] == 1 and image_server.hits["/h/gzip-bomb"] == 1
    assert image_server.hits["/h/always-503"] == 2


@pytest.mark.asyncio
async def test_gzip_bomb_never_inflates_past_the_limit(image_server):
    url = image_server.script("bomb256", [Reply(200, bomb(64 * MAX_BODY), content_encoding="gzip")])
    f = Fetcher(_sources(), concurrency=2)
    try:
        await _outcome(f, image_server.url("nothing"))  # session set up outside the measurement
        tracemalloc.start()
        try:
            reason, _ = await _outcome(f, url)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await f.close()
    assert reason == "too_large"
    assert peak < 8 * MAX_BODY, f"peak {peak / 2**20:.1f} MiB while refusing a 64 MiB bomb"


def _error_types() -> list[type[BaseException]]:
    """Every exception class aiohttp and yarl export, plus the URL/Unicode errors of the stdlib."""
    found: set[type[BaseException]] = {
        ValueError,
        UnicodeError,
        UnicodeDecodeError,
        OSError,
        ConnectionResetError,
        TimeoutError,
        asyncio.TimeoutError,
        RuntimeError,
        AssertionError,
        AttributeError,
        KeyError,
        TypeError,
        MemoryError,
        RecursionError,
    }
    for mod in (aiohttp, aiohttp.client_exceptions, aiohttp.http_exceptions, yarl):
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, Exception):
                found.add(obj)
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance even of classes whose constructors want arguments (half-built, as a bug might make it)."""
    for args in ((), ("boom",), (None, ()), ("boom", "boom")):
        try:
            return cls(*args)
        except Exception:
            continue
    return cls.__new__(cls)


class _RaisingSession:
    """Stands in for aiohttp's session: its ``get`` raises the given error (no server can send these)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def get(self, *a, **kw):
        raise self.exc

    async def close(self) -> None:
        return None


@pytest.mark.asyncio
@pytest.mark.parametrize("cls", _error_types(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
async def test_every_client_error_type_is_one_images_failure(cls):
    f = Fetcher(
        load_config(None, HOSTILE_HTTP + ["source.images.http.backoff_base_s=0"]).source.images, concurrency=1
    )
    f._session = _RaisingSession(_instance(cls))
    try:
        with pytest.raises(FetchFailed) as exc:
            await f.fetch("original", _row("http://127.0.0.1:9/x.jpg"))
        assert exc.value.reason
    finally:
        await f.close()


def test_jpeg_claiming_more_pixels_than_its_data_is_rejected():
    good = photo(320, 240, seed=5)
    assert _verify(good) == "ok"
    tall = tall_jpeg(good)
    # Pillow alone accepts it and fills the missing rows with grey: that was the bug.
    assert open_image(tall, max_pixels=10**8).size == (320, 960)
    assert _verify(tall) == "truncated"
    # Also when the image already fits and its bytes would be kept as they are.
    with pytest.raises(Rejected) as exc:
        render(open_image(tall, max_pixels=10**8), tall, rotation=None, max_side=2000, quality=90)
    assert exc.value.reason == "truncated"


# --------------------------------------------------------------------------- acceptance 3: a whole prepare run


def test_prepare_over_every_hostile_upstream_finishes_every_shard(ray_local, image_server, tmp_path):
    """Every shard commits; each hostile image is failed with its reason; every good image lands."""
    from pipeline_helpers import box, image_row, write_plan

    from openimages_od.pipeline.distribute import run_prepare
    from openimages_od.pipeline.ledger import decode_ledger
    from openimages_od.storage_setup import storage_from_config

    cases = install(image_server)
    good_extra = [
        image_server.script(f"g/{i}.jpg", [Reply(200, photo(150, 100, seed=100 + i))]) for i in range(6)
    ]
    rows, expect = [], {}
    for i, c in enumerate(cases):
        iid = f"{i:016x}"
        rows.append(image_row(iid, original_url=c.url, boxes=[box(1, 0.1, 0.5, 0.2, 0.6)]))
        expect[iid] = c.reason
    for i, url in enumerate(good_extra):
        iid = f"f{i:015x}"
        rows.append(image_row(iid, original_url=url))
        expect[iid] = None
    cfg = load_config(
        None,
        [
            f"output.url=file://{tmp_path}/out",
            "ray.num_actors=1",
            "ray.num_cpus_per_actor=0.5",
            "ray.progress=false",
            "image.max_side=128",
            "ray.max_shard_retries=0",
            "ray.actor_start_timeout_s=60",
            "ray.concurrency_per_actor=16",
            "source.images.order=[original]",
            *HOSTILE_HTTP,
        ],
    )
    st = storage_from_config(cfg)
    manifest = write_plan(st, cfg.output_root, rows, images_per_shard=5)
    assert run_prepare(cfg) == 0  # no shard retries allowed: a shard failing once would fail the run

    n = manifest.splits["train"].num_shards
    stats = [
        st.read_json(o.url)
        for o in st.list(cfg.output_path("tfrecords", "train") + "/")
        if o.url.endswith(".stats.json")
    ]
    assert len(stats) == n
    ledger = {}
    for o in st.list(cfg.output_path("ledger", "train") + "/"):
        ledger.update({e.image_id: e for e in decode_ledger(st.read_bytes(o.url))})
    assert set(ledger) == set(expect)
    for iid, reason in expect.items():
        e = ledger[iid]
        if reason is None:
            assert e.status == "ok", (iid, e)
        else:
            assert (e.status, e.error) == ("failed", reason), (
                iid,
                e,
                [c.name for c in cases if c.reason == reason],
            )
    assert sum(s["ok"] for s in stats) == sum(1 for r in expect.values() if r is None)


# --------------------------------------------------------------------------- fuzzing the image checks


def _seeds() -> list[bytes]:
    out = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        out.append(photo(40, 30, seed=2, fmt=fmt))
    return out


_SEEDS = _seeds()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, len(_SEEDS) - 1),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.binary(min_size=0, max_size=4), st.integers(0, 4)), max_size=4
    ),
)
def test_fuzzed_image_bytes_are_rendered_or_rejected(seed, edits):
    """Whatever the bytes, the image stage answers a result or a :class:`Rejected`, never another error."""
    data = bytearray(_SEEDS[seed])
    for pos, ins, cut in edits:
        i = int(pos * len(data))
        data[i : i + cut] = ins
    try:
        out = render(
            open_image(bytes(data), max_pixels=4_000_000), bytes(data), rotation=90, max_side=32, quality=80
        )
    except Rejected:
        return
    assert out.width <= 32 and out.height <= 32


@pytest.mark.asyncio
async def test_bucket_objects_are_read_with_a_bounded_range(seaweedfs, s3_bucket, s3_options):
    """A huge mirror object costs at most max_body_mb + 1 bytes; an empty one is rejected as empty."""
    s3 = seaweedfs.client()
    s3.put_object(Bucket=s3_bucket, Key="train/big.jpg", Body=b"\xff" * (3 * MAX_BODY))
    s3.put_object(Bucket=s3_bucket, Key="train/empty.jpg", Body=b"")
    good = photo(60, 40, seed=1)
    s3.put_object(Bucket=s3_bucket, Key="train/good.jpg", Body=good)
    src = load_config(None, HOSTILE_HTTP + [f"source.images.bucket={s3_bucket}"]).source.images.model_copy(
        update={"s3": s3_options}
    )
    f = Fetcher(src, concurrency=2)
    try:

        async def bucket(name):
            return await f.fetch(
                "bucket", {"image_id": name, "split": "train", "bucket_key": f"train/{name}.jpg"}
            )

        with pytest.raises(FetchFailed) as exc:
            await bucket("big")
        assert exc.value.reason == "too_large"
        empty = await bucket("empty")
        assert empty.data == b""
        with pytest.raises(Rejected) as rej:
            open_image(empty.data, max_pixels=10**8)
        assert rej.value.reason == "empty"
        assert (await bucket("good")).data == good
    finally:
        await f.close()
