"""A catalogue of hostile upstream behaviours, served by :class:`openimages_od.devservices.ImageServer`.

Each entry is an image URL and the ledger reason the prepare pipeline must
record for it. The expectations assume :data:`HOSTILE_HTTP` (short timeouts,
one retry, a 1 MiB body limit). Used by the fetcher tests
(``test_fetch_hostile.py``) and the prepare run over every hostile behaviour.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass

from pipeline_helpers import photo

from openimages_od.devservices import ImageServer, Reply

HOSTILE_HTTP = [
    "source.images.http.connect_timeout_s=2",
    "source.images.http.read_timeout_s=1",
    "source.images.http.total_timeout_s=1.5",
    "source.images.http.backoff_base_s=0.05",
    "source.images.http.backoff_max_s=0.1",
    "source.images.http.max_retries=1",
    "source.images.http.max_retry_after_s=0.2",
    "source.images.http.max_redirects=3",
    "source.images.http.max_body_mb=1",
]
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Hostile:
    """One hostile image source.

    Attributes:
        name: what it does.
        url: the image URL to put in the plan.
        reason: the failure reason expected in the ledger (None: the image must land).
        stage: ``fetch`` when the fetcher itself fails, ``verify`` when the bytes arrive but are rejected.
    """

    name: str
    url: str
    reason: str | None
    stage: str = "fetch"


def tall_jpeg(body: bytes, factor: int = 4) -> bytes:
    """The JPEG with its SOF height multiplied: the header claims more rows than the scan holds."""
    d = bytearray(body)
    i = d.find(b"\xff\xc0")
    if i < 0:
        raise ValueError("not a baseline JPEG")
    h = struct.unpack(">H", d[i + 5 : i + 7])[0]
    d[i + 5 : i + 7] = struct.pack(">H", min(65535, h * factor))
    return bytes(d)


def bomb(n: int = 64 * MAX_BODY, kind: str = "gzip") -> bytes:
    """``n`` zero bytes compressed (a 64 MiB gzip bomb is about 64 KB)."""
    if kind == "gzip":
        return gzip.compress(b"\0" * n, compresslevel=9)
    return zlib.compress(b"\0" * n, 9)


def install(srv: ImageServer, prefix: str = "h") -> list[Hostile]:
    """Register every hostile behaviour (and a few good images next to them) on ``srv``."""
    good = photo(160, 120, seed=11)
    p = prefix.strip("/")
    out: list[Hostile] = []

    def add(name: str, replies: list[Reply], reason: str | None, stage: str = "fetch") -> None:
        out.append(Hostile(name, srv.script(f"{p}/{name}", replies), reason, stage))

    def redirect(to: str) -> list[Reply]:
        return [Reply(302, headers={"Location": to})]

    # Redirects to other schemes, malformed, loops, chains.
    add("redirect-ftp", redirect("ftp://ftp.example/x.jpg"), "bad_redirect")
    add("redirect-file", redirect("file:///etc/passwd"), "bad_redirect")
    add("redirect-data", redirect("data:image/jpeg;base64,/9j/4AAQ"), "bad_redirect")
    add("redirect-gopher", redirect("gopher://127.0.0.1:70/"), "bad_redirect")
    add("redirect-malformed", redirect("http://[::1"), "bad_redirect")
    add("redirect-no-host", redirect("https:///x.jpg"), "bad_redirect")
    add("redirect-loop-a", redirect(f"/{p}/redirect-loop-b"), "redirect_loop")
    srv.script(f"{p}/redirect-loop-b", redirect(f"/{p}/redirect-loop-a"))
    for i in range(5):
        srv.script(f"{p}/chain{i}", redirect(f"/{p}/chain{i + 1}"))
    out.append(Hostile("redirect-chain", srv.url(f"{p}/chain0"), "too_many_redirects"))
    # URLs that are not http(s) at all, or not URLs.
    out.append(Hostile("url-ftp", "ftp://ftp.example/x.jpg", "bad_url"))
    out.append(Hostile("url-file", "file:///etc/passwd", "bad_url"))
    out.append(Hostile("url-malformed", "http://[::1/x.jpg", "bad_url"))
    out.append(Hostile("url-not-a-url", "not a url at all", "bad_url"))
    # Slow and failing upstreams.
    add("stall", [Reply(200, good, delay_s=4)], "timeout")  # > total_timeout_s, short enough for teardown
    add("drip", [Reply(200, good, drip_s=0.2, drip_bytes=64)], "timeout")
    add("always-429", [Reply(429, headers={"Retry-After": "3600"})], "http_429")
    add("always-503", [Reply(503)], "http_503")
    add("always-truncated", [Reply(200, good, truncate_at=200)], "truncated")
    # Sizes and encodings.
    add("content-length-huge", [Reply(200, b"\0" * (MAX_BODY + 10))], "too_large")
    add("gzip-bomb", [Reply(200, bomb(kind="gzip"), content_encoding="gzip")], "too_large")
    add("deflate-bomb", [Reply(200, bomb(kind="deflate"), content_encoding="deflate")], "too_large")
    add("brotli-unasked", [Reply(200, b"\x1b\x00\x00junk", content_encoding="br")], "bad_encoding")
    add(
        "gzip-garbage",
        [Reply(200, b"\x1f\x8b\x08\x00garbage-not-deflate", content_encoding="gzip")],
        "bad_encoding",
    )
    # The bytes arrive but are not a usable image.
    add(
        "html-as-200",
        [Reply(200, b"<html><body>gone</body></html>", content_type="text/html")],
        "not_image",
        "verify",
    )
    add("jpeg-taller-than-data", [Reply(200, tall_jpeg(good))], "truncated", "verify")
    add("jpeg-cut-with-eoi", [Reply(200, good[: len(good) // 2] + b"\xff\xd9")], "truncated", "verify")
    # Good images among them, one of them gzip-encoded (allowed, and inflated).
    add("good-plain", [Reply(200, good)], None)
    add("good-gzip", [Reply(200, gzip.compress(good), content_encoding="gzip")], None)
    add("good-after-redirect", redirect(f"/{p}/good-plain"), None)
    return out
