"""Unit tests for the pure stages of the prepare pipeline (no services)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps
from pipeline_helpers import b64md5, box, image_row, photo

from openimages_od.config import ImageSources
from openimages_od.errors import DataError
from openimages_od.pipeline import geometry as G
from openimages_od.pipeline.example import (
    BytesF,
    FloatF,
    IntF,
    decode_example,
    detection_features,
    encode_example,
)
from openimages_od.pipeline.fetch import backoff_s, parse_retry_after, source_url
from openimages_od.pipeline.ledger import LedgerEntry, decode_ledger, encode_ledger
from openimages_od.pipeline.tfrecord import encode_records, frame_record, iter_records, masked_crc32c
from openimages_od.pipeline.verify import Rejected, check_md5, full_decode, open_image

# --------------------------------------------------------------------------- geometry


def _marked(
    width: int, height: int, rect: tuple[int, int, int, int], fmt: str = "PNG", exif: int | None = None
) -> bytes:
    """Grey image with a pure red rectangle (x0, y0, x1, y1) in pixels."""
    arr = np.full((height, width, 3), 128, np.uint8)
    x0, y0, x1, y1 = rect
    arr[y0:y1, x0:x1] = (255, 0, 0)
    buf = io.BytesIO()
    kw = {}
    if exif:
        e = Image.Exif()
        e[0x0112] = exif
        kw["exif"] = e.tobytes()
    if fmt == "JPEG":
        kw["quality"] = 98
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _red_box(data: bytes) -> tuple[float, float, float, float]:
    """Relative (xmin, xmax, ymin, ymax) of the red pixels."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    mask = (arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h


@pytest.mark.parametrize("rotation", [0, 90, 180, 270, None])
def test_rotation_maps_pixels_and_boxes_together(rotation):
    w, h, rect = 200, 100, (20, 10, 60, 40)
    data = _marked(w, h, rect)
    src_box = (rect[0] / w, rect[2] / w, rect[1] / h, rect[3] / h)
    out = G.render(open_image(data, max_pixels=10**8), data, rotation=rotation, max_side=1000, quality=95)
    want = G.transform_box(src_box, out.ops)
    got = _red_box(out.data)
    assert np.allclose(got, want, atol=0.02), (got, want)
    assert (out.width, out.height) == ((h, w) if rotation in (90, 270) else (w, h))


def test_rotation_box_formulas():
    b = (0.1, 0.3, 0.2, 0.6)  # xmin, xmax, ymin, ymax
    assert G.transform_box(b, G.ops_for_rotation(0)) == b
    assert np.allclose(G.transform_box(b, G.ops_for_rotation(90)), (0.2, 0.6, 0.7, 0.9))  # CCW
    assert np.allclose(G.transform_box(b, G.ops_for_rotation(180)), (0.7, 0.9, 0.4, 0.8))
    assert np.allclose(G.transform_box(b, G.ops_for_rotation(270)), (0.4, 0.8, 0.1, 0.3))
    assert np.allclose(G.transform_box(b, G.ops_for_rotation(90) * 4), b)
    with pytest.raises(Rejected) as e:
        G.ops_for_rotation(45)
    assert e.value.reason == "bad_rotation"


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_matches_pillow_and_moves_boxes(orientation):
    w, h, rect = 160, 96, (16, 8, 56, 40)
    data = _marked(w, h, rect, fmt="JPEG", exif=orientation)
    out = G.render(
        open_image(data, max_pixels=10**8),
        data,
        rotation=None,
        max_side=1000,
        quality=95,
        keep_original_if_fits=False,
    )
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert (out.width, out.height) == ref.size
    src_box = (rect[0] / w, rect[2] / w, rect[1] / h, rect[3] / h)
    assert np.allclose(_red_box(out.data), G.transform_box(src_box, out.ops), atol=0.03)
    # The output carries no EXIF orientation: every reader sees the same pixels.
    assert Image.open(io.BytesIO(out.data)).getexif().get(0x0112) is None


def test_exif_policies():
    assert G.choose_ops(0, 6, "rotation_wins") == []  # Rotation known: EXIF ignored
    assert G.choose_ops(None, 6, "rotation_wins") == [G.Op.ROTATE_270]
    assert G.choose_ops(90, 6, "exif_wins") == [G.Op.ROTATE_270]
    assert G.choose_ops(90, 1, "exif_wins") == [G.Op.ROTATE_90]
    assert G.choose_ops(None, 6, "ignore") == []


def test_resize_never_upscales_and_keeps_small_jpeg_bytes():
    assert G.target_size(1024, 768, 512) == (512, 384)
    assert G.target_size(300, 200, 512) == (300, 200)
    assert G.target_size(768, 1024, 640) == (480, 640)
    small = photo(300, 200, seed=3)
    out = G.render(open_image(small, max_pixels=10**8), small, rotation=0, max_side=512, quality=90)
    assert out.kept_original and out.data == small
    big = photo(1024, 768, seed=3)
    out = G.render(open_image(big, max_pixels=10**8), big, rotation=None, max_side=512, quality=90)
    assert not out.kept_original and (out.width, out.height) == (512, 384)
    assert Image.open(io.BytesIO(out.data)).size == (512, 384)
    # Rotated: never kept as-is, even when it fits.
    out = G.render(open_image(small, max_pixels=10**8), small, rotation=90, max_side=512, quality=90)
    assert not out.kept_original and (out.width, out.height) == (200, 300)


def test_non_jpeg_is_reencoded_as_rgb_jpeg():
    rgba = io.BytesIO()
    Image.new("RGBA", (40, 30), (0, 0, 255, 0)).save(rgba, "PNG")
    data = rgba.getvalue()
    out = G.render(open_image(data, max_pixels=10**8), data, rotation=None, max_side=64, quality=90)
    im = Image.open(io.BytesIO(out.data))
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (40, 30)


# --------------------------------------------------------------------------- verify


def _reason(fn) -> str:
    with pytest.raises(Rejected) as e:
        fn()
    return e.value.reason


def test_verify_rejections():
    good = photo(64, 48, seed=1)
    assert _reason(lambda: open_image(b"", max_pixels=10**8)) == "empty"
    assert _reason(lambda: open_image(b"<html>Not found</html>", max_pixels=10**8)) == "not_image"
    assert _reason(lambda: open_image(good, max_pixels=64 * 48 - 1)) == "too_many_pixels"
    assert _reason(lambda: open_image(good, max_pixels=10**8, min_side=64)) == "too_small"
    ph = io.BytesIO()
    Image.new("RGB", (500, 374), (240, 240, 240)).save(ph, "PNG")
    assert _reason(lambda: open_image(ph.getvalue(), max_pixels=10**8)) == "placeholder"
    open_image(ph.getvalue(), max_pixels=10**8, reject_placeholder=False)  # allowed when disabled
    assert _reason(lambda: check_md5(good, b64md5(good + b"x"))) == "md5_mismatch"
    check_md5(good, b64md5(good))
    check_md5(good, None)


def test_verify_truncated_and_corrupt():
    data = photo(256, 192, seed=2)
    assert _reason(lambda: full_decode(open_image(data[: len(data) // 2], max_pixels=10**8))) == "truncated"
    # Corrupt entropy data in the middle of the scan: the decode must fail or
    # Pillow must report it; a header-only check would accept it.
    bad = bytearray(data)
    sos = bytes(bad).index(b"\xff\xda")
    bad[sos + 20 : len(bad) - 2] = b"\xff\x00" * ((len(bad) - 2 - sos - 20) // 2) + b"\x00" * (
        (len(bad) - 2 - sos - 20) % 2
    )
    bad = bytes(bad[: sos + 200])  # also cut: must be rejected one way or another
    assert _reason(lambda: full_decode(open_image(bad, max_pixels=10**8))) in ("truncated", "corrupt")
    # The keep-original fast path (1/8-scale decode) still sees truncation.
    assert (
        _reason(
            lambda: G.render(
                open_image(data[:-600], max_pixels=10**8), data[:-600], rotation=0, max_side=1024, quality=90
            )
        )
        == "truncated"
    )


# --------------------------------------------------------------------------- example + tfrecord


def test_example_roundtrip_pure_python():
    feats = {
        "a/bytes": BytesF([b"x\x00y", "é"]),
        "b/float": FloatF([0.25, -1.5]),
        "c/int": IntF([0, 1, -1, 2**40]),
        "d/empty": FloatF([]),
    }
    data = encode_example(feats)
    back = decode_example(data)
    assert back["a/bytes"] == (b"x\x00y", "é".encode())
    assert back["b/float"] == (0.25, -1.5)
    assert back["c/int"] == (0, 1, -1, 2**40)
    assert back["d/empty"] == ()
    # Deterministic: key order does not matter.
    assert encode_example(dict(reversed(list(feats.items())))) == data


def test_detection_features_keys():
    row = image_row(
        "000a1b2c3d4e5f60",
        boxes=[box(1, 0.1, 0.2, 0.3, 0.4, group_of=1), box(2, 0.5, 0.6, 0.7, 0.8)],
        image_labels=[{"label_id": 2, "mid": "/m/01g317", "confidence": 0.0}],
    )
    row["source_id"] = 7
    feats = detection_features(row, b"jpg", 10, 20, [(0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)], "ab")
    d = decode_example(encode_example(feats))
    assert d["image/source_id"] == (b"7",)
    assert d["image/filename"] == (b"000a1b2c3d4e5f60",)
    assert d["image/object/class/label"] == (1, 2)
    assert d["image/object/class/text"] == (b"/m/0k4j", b"/m/01g317")
    assert d["image/object/is_crowd"] == (1, 0) and d["image/object/group_of"] == (1, 0)
    assert d["image/object/depiction"] == (-1, -1)
    assert d["image/class/confidence"] == (0.0,)


def test_tfrecord_framing_and_corruption():
    recs = [b"", b"hello", bytes(range(256)) * 10]
    data = encode_records(recs)
    assert list(iter_records(data)) == recs
    # The CRC mask is TensorFlow's (known value for the 8-byte header of an empty record).
    assert frame_record(b"")[8:12] == struct.pack("<I", masked_crc32c(struct.pack("<Q", 0)))
    broken = bytearray(data)
    broken[-3] ^= 0xFF
    with pytest.raises(DataError, match="CRC"):
        list(iter_records(bytes(broken), "x.tfrecord"))
    with pytest.raises(DataError, match="truncated"):
        list(iter_records(data[:-2], "x.tfrecord"))


@pytest.mark.tf
def test_example_and_tfrecord_readable_by_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    feats = {
        "image/encoded": BytesF([b"\xff\xd8abc"]),
        "image/object/bbox/xmin": FloatF([0.125, 0.5]),
        "image/object/class/label": IntF([3, -2, 2**40]),
        "image/filename": BytesF(["0123abcd"]),
        "image/object/bbox/ymin": FloatF([]),
    }
    data = encode_example(feats)
    ex = tf.train.Example.FromString(data)
    f = ex.features.feature
    assert f["image/encoded"].bytes_list.value == [b"\xff\xd8abc"]
    assert list(f["image/object/bbox/xmin"].float_list.value) == [0.125, 0.5]
    assert list(f["image/object/class/label"].int64_list.value) == [3, -2, 2**40]
    assert list(f["image/object/bbox/ymin"].float_list.value) == []
    # TF's own serialization parses identically with our decoder.
    assert decode_example(ex.SerializeToString())["image/object/class/label"] == (3, -2, 2**40)
    path = tmp_path / "x.tfrecord"
    path.write_bytes(encode_records([data, b"second"]))
    got = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    assert got == [data, b"second"]


# --------------------------------------------------------------------------- fetch helpers + ledger


def test_retry_after_and_backoff():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert backoff_s(1, 0.5, 30, rng=lambda a, b: b) == 0.5
    assert backoff_s(10, 0.5, 30, rng=lambda a, b: b) == 30


def test_source_urls():
    src = ImageSources()
    row = image_row("00ab", "validation", original_url="http://x/a.jpg")
    assert source_url("bucket", row, src) == "s3://open-images-dataset/validation/00ab.jpg"
    assert source_url("original", row, src) == "http://x/a.jpg"
    assert source_url("thumbnail", row, src) is None
    mirror = ImageSources(bucket="mirror", key_template="oi/{split}/{image_id}.jpg")
    assert source_url("bucket", row, mirror) == "s3://mirror/oi/validation/00ab.jpg"


def test_ledger_roundtrip():
    entries = [
        LedgerEntry("a", "ok", "bucket", "s3://b/a", 10, 4, 3),
        LedgerEntry("b", "failed", error="http_404", attempts=["original:http_404"]),
    ]
    assert decode_ledger(encode_ledger(entries)) == entries


# --------------------------------------------------------------------------- fetcher against a real local server


@pytest.mark.integration
@pytest.mark.asyncio
async def test_fetcher_limits_and_final_statuses(image_server):
    from openimages_od.devservices import Reply
    from openimages_od.pipeline.fetch import Fetcher, FetchFailed

    http = {
        "max_body_mb": 0.001,
        "max_redirects": 2,
        "max_retries": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.02,
        "read_timeout_s": 1,
        "total_timeout_s": 2,
    }
    src = ImageSources(http=http)
    f = Fetcher(src, concurrency=4)
    srv = image_server

    async def reason(url):
        with pytest.raises(FetchFailed) as e:
            await f.fetch("original", {"image_id": "x", "split": "train", "original_url": url})
        return e.value.reason

    try:
        assert await reason(srv.add("big.jpg", b"x" * 5000)) == "too_large"
        for i in range(4):
            srv.script(f"r{i}", [Reply(302, headers={"Location": f"/r{i + 1}"})])
        assert await reason(srv.url("r0")) == "too_many_redirects"
        assert await reason(srv.script("e410", [Reply(410)])) == "http_410"
        assert srv.hits["/e410"] == 1
        assert await reason(srv.script("e502", [Reply(502)])) == "http_502"
        assert srv.hits["/e502"] == 3  # 1 + max_retries
        srv.add("ok", b"tiny")
        ok = await f.fetch(
            "original",
            {
                "image_id": "x",
                "split": "train",
                "original_url": srv.script("redir", [Reply(301, headers={"Location": "/ok"})]),
            },
        )
        assert ok.final_url.endswith("/ok") and ok.data == b"tiny"
        assert await reason(None) == "no_url"
    finally:
        await f.close()


@pytest.mark.parametrize("resample", ["box", "bilinear", "lanczos"])
def test_resample_filters_keep_size_and_content(resample):
    # 1000 -> 640 cannot be reached by the JPEG draft alone, so the filter runs.
    src = photo(1000, 750, seed=3)
    out = G.render(
        open_image(src, max_pixels=10**8), src, rotation=None, max_side=640, quality=95, resample=resample
    )
    assert (out.width, out.height) == (640, 480)

    # Same picture at low frequencies (the photos carry pixel noise, which filters treat differently).
    def coarse(data: bytes) -> np.ndarray:
        return np.asarray(
            Image.open(io.BytesIO(data)).convert("RGB").resize((80, 60), Image.Resampling.BOX),
            dtype=np.float32,
        )

    assert np.abs(coarse(out.data) - coarse(src)).mean() < 3.0
    again = G.render(
        open_image(src, max_pixels=10**8), src, rotation=None, max_side=640, quality=95, resample=resample
    )
    assert again.data == out.data  # deterministic


def test_config_rejects_unknown_resample():
    from openimages_od.config import load_config
    from openimages_od.errors import ConfigError

    assert load_config(None, []).image.resample == "box"
    with pytest.raises(ConfigError):
        load_config(None, ["image.resample=nearest"])


def test_embedded_ray_agent_port_is_dynamic_only_inside_the_context():
    # Guards the one patch of Ray internals (distribute._dynamic_agent_port, see its comment
    # for why Ray has no supported option): fails when a Ray upgrade moves them.
    from ray._private.parameter import RayParams

    from openimages_od.pipeline.distribute import _dynamic_agent_port

    with _dynamic_agent_port():
        assert RayParams().dashboard_agent_listen_port == 0
        assert RayParams(dashboard_agent_listen_port=1234).dashboard_agent_listen_port == 1234
    assert RayParams().dashboard_agent_listen_port == 52365
