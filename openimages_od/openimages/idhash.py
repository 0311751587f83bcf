"""``blake2b(ImageID, digest_size=8)`` of many ImageIDs at once, in compiled code.

The plan's shard and source-id rule is the 8-byte BLAKE2b digest of each ImageID read
big-endian (:func:`~openimages_od.openimages.planwrite.shards_and_source_ids`). ``hashlib``
costs a Python call per image (0.6 s of GIL-bound time for the V6 benchmark's 650k images,
run beside the image-index read, whose own Python work it then slows). Here the same function
(RFC 7693, one compression for an ID of up to 128 bytes, no key) runs over the Arrow buffers
of the whole column in numba-compiled code without the GIL. The tests compare it with
``hashlib`` on IDs of every length up to a block and beyond.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from openimages_od.openimages import jit

__all__ = ["available", "blake2b8_keys"]

_IV = np.array(
    [
        0x6A09E667F3BCC908,
        0xBB67AE8584CAA73B,
        0x3C6EF372FE94F82B,
        0xA54FF53A5F1D36F1,
        0x510E527FADE682D1,
        0x9B05688C2B3E6C1F,
        0x1F83D9ABFB41BD6B,
        0x5BE0CD19137E2179,
    ],
    np.uint64,
)
# The ten message permutations; rounds 10 and 11 reuse the first two (RFC 7693, 3.1).
_PERMUTATIONS = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
]
_SIGMA = np.array([_PERMUTATIONS[r % 10] for r in range(12)], np.int64)  # one row per round
MAX_BYTES = 128  # one BLAKE2b block; longer IDs go through hashlib


def _rotr(x: Any, n: int) -> Any:
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


def _g(a: Any, b: Any, c: Any, d: Any, x: Any, y: Any) -> tuple[Any, Any, Any, Any]:
    """BLAKE2b's mixing function G on one column or diagonal of the state."""
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


def _digests(data: np.ndarray, offs: np.ndarray, iv: np.ndarray, sigma: np.ndarray, out: np.ndarray) -> None:
    """``out[i]``: the 8-byte BLAKE2b digest of ``data[offs[i]:offs[i+1]]`` read big-endian
    (every message at most :data:`MAX_BYTES` long). The state lives in sixteen scalars."""
    m = np.zeros(16, np.uint64)
    h0 = iv[0] ^ np.uint64(0x01010000 ^ 8)  # parameter block: digest length 8, no key, fanout/depth 1
    for i in range(len(offs) - 1):
        s = offs[i]
        n = offs[i + 1] - s
        m[:] = 0
        for j in range(n):
            m[j >> 3] |= np.uint64(data[s + j]) << np.uint64(8 * (j & 7))
        v0, v1, v2, v3, v4, v5, v6, v7 = h0, iv[1], iv[2], iv[3], iv[4], iv[5], iv[6], iv[7]
        v8, v9, v10, v11 = iv[0], iv[1], iv[2], iv[3]
        v12 = iv[4] ^ np.uint64(n)  # bytes compressed so far (the high word stays 0)
        v13 = iv[5]
        v14 = ~iv[6]  # the last block
        v15 = iv[7]
        for r in range(12):
            v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[sigma[r, 0]], m[sigma[r, 1]])
            v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[sigma[r, 2]], m[sigma[r, 3]])
            v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[sigma[r, 4]], m[sigma[r, 5]])
            v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[sigma[r, 6]], m[sigma[r, 7]])
            v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[sigma[r, 8]], m[sigma[r, 9]])
            v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[sigma[r, 10]], m[sigma[r, 11]])
            v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[sigma[r, 12]], m[sigma[r, 13]])
            v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[sigma[r, 14]], m[sigma[r, 15]])
        h = h0 ^ v0 ^ v8
        # The digest is h's 8 bytes little-endian; read big-endian, that is h byte-swapped.
        swapped = np.uint64(0)
        for k in range(8):
            swapped = (swapped << np.uint64(8)) | ((h >> np.uint64(8 * k)) & np.uint64(0xFF))
        out[i] = swapped


def ensure_compiled() -> None:
    """Swap the functions above for their compiled versions and load them (numba's disk cache)."""

    def build() -> None:
        global _rotr, _g, _digests
        _rotr, _g, _digests = jit.njit(_rotr), jit.njit(_g), jit.njit(_digests)
        _digests(np.zeros(1, np.uint8), np.zeros(1, np.int64), _IV, _SIGMA, np.zeros(0, np.uint64))

    jit.compile_once(__name__, build)


def available() -> bool:
    """Whether the compiled hash can run (numba is installed)."""
    return jit.available()


def blake2b8_keys(ids: pa.Array) -> np.ndarray | None:
    """``int.from_bytes(blake2b(id.encode(), digest_size=8).digest(), "big")`` of each ImageID as
    uint64, or None where this cannot answer (no numba, nulls, an ID over :data:`MAX_BYTES` bytes)."""
    if not available():
        return None
    ensure_compiled()
    ids = ids.cast(pa.string())
    n = len(ids)
    if ids.null_count:
        return None
    out = np.zeros(n, np.uint64)
    if n == 0:
        return out
    offs = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset : ids.offset + n + 1].astype(np.int64)
    if int((offs[1:] - offs[:-1]).max()) > MAX_BYTES:
        return None
    data_buf = ids.buffers()[2]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(1, np.uint8)
    _digests(data, offs, _IV, _SIGMA, out)
    return out
