"""ImageID keys: the uint64 value of a 16-hex-digit ImageID, set membership and a seeded rank.

The plan compares and ranks millions of ImageIDs; doing it on integer keys read straight from
Arrow buffers avoids a Python string per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["IdSet", "hex_keys", "id_keys", "lower_hex_keys", "rank", "sorted_unique", "strings"]

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_LOWER = np.zeros(256, dtype=np.uint8)  # 0xFF for 0-9 and a-f
_LOWER[list(b"0123456789abcdef")] = 0xFF
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def strings(values: list[str]) -> pa.Array:
    """``pa.array(values, pa.string())`` built from buffers: ``pa.array`` imports pandas (when
    installed) on its first call, ~0.5 s that a plan would otherwise pay before its first row."""
    raw = [v.encode() for v in values]
    offsets = np.zeros(len(raw) + 1, np.int32)
    if raw:
        np.cumsum([len(b) for b in raw], out=offsets[1:])
    return pa.Array.from_buffers(
        pa.string(), len(raw), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(raw))]
    )


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` for integer arrays, by one sort: numpy 2.3's plain ``np.unique`` takes a
    hash-table path that is ~10x slower on integers (0.58 s vs 0.05 s for 650k int64 keys)."""
    s = np.sort(a, kind="stable")
    if len(s) < 2:
        return s
    keep = np.empty(len(s), bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _key_parts(ids: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keys, ok, lower)`` of each ImageID: its uint64 value (0 where not 16 hex digits), whether it
    is 16 hex digits, and whether it is 16 *lowercase* hex digits (where the key is a bijection).

    Reads the string bytes straight from the Arrow buffers: no Python string per row.
    """
    n = len(ids)
    keys = np.zeros(n, np.uint64)
    if n == 0:
        return keys, np.zeros(0, bool), np.zeros(0, bool)
    ids = ids.cast(pa.string())
    if ids.null_count:
        ids = pc.fill_null(ids, "")
    offs = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset : ids.offset + n + 1]
    is16 = (offs[1:] - offs[:-1]) == 16
    all16 = bool(is16.all())
    sub = ids if all16 else ids.filter(pa.array(is16))
    ok = is16.copy()
    lower = is16.copy()
    if len(sub):
        if not all16:
            offs = np.frombuffer(sub.buffers()[1], np.int32)[sub.offset : sub.offset + len(sub) + 1]
        raw = np.frombuffer(sub.buffers()[2], np.uint8)[offs[0] : offs[-1]].reshape(-1, 16)
        nib = _HEX[raw]
        # A byte that is not a hex digit maps to 255: its high nibble is set. Eight bytes at a time.
        high = nib.view(np.uint64)
        hexok = ((high[:, 0] | high[:, 1]) & _HIGH_NIBBLES) == 0
        low = _LOWER[raw].view(np.uint64)
        is_lower = (low[:, 0] & low[:, 1]) == _ALL_ONES  # every byte 0-9 or a-f
        # Two nibbles per byte, the 8 bytes read as one big-endian integer: a few whole-array
        # steps instead of sixteen shifts of a uint64 array.
        k = ((nib[:, 0::2] << 4) | (nib[:, 1::2] & 15)).view(">u8").ravel().astype(np.uint64)
        k[~hexok] = 0
        if all16:
            keys, ok, lower = k, hexok, is_lower
        else:
            idx = np.flatnonzero(is16)
            keys[idx] = k
            ok[idx] = hexok
            lower[idx] = is_lower
    return keys, ok, lower


def id_keys(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, ok)``: the uint64 value of each 16-hex-digit ImageID (0 where not one) and where it is one.

    Reads the string bytes straight from the Arrow buffers: no Python string per row.
    """
    keys, ok, _ = _key_parts(ids)
    return keys, ok


def lower_hex_keys(ids: pa.Array) -> np.ndarray | None:
    """The uint64 keys of ``ids`` when every one is 16 lowercase hex digits, else None.

    For such IDs the key is a bijection that keeps string order, so sorting, deduplicating and
    grouping the keys is doing it to the strings (what Open Images files hold; uppercase or
    malformed IDs take the string path).
    """
    if not len(ids):
        return np.zeros(0, np.uint64)
    keys, _, lower = _key_parts(ids)
    return keys if bool(lower.all()) else None


def hex_keys(ids: pa.Array) -> np.ndarray:
    """uint64 value of 16-hex-digit ImageIDs (validated upstream), vectorised."""
    return id_keys(ids)[0]


class IdSet:
    """Membership and position of ImageIDs in a fixed list, built once (``pc.is_in`` rebuilds its
    hash table per call, which dominated streaming a 1.7M-row index against 650k wanted IDs).

    When every listed ID is 16 lowercase hex digits (Open Images files), IDs are compared as
    integer keys: a probe matches only when it is lowercase too, so the answers are those of
    string equality. Otherwise the string kernels answer.
    """

    def __init__(self, wanted: pa.Array) -> None:
        self.wanted = wanted.cast(pa.string())
        keys = lower_hex_keys(self.wanted)
        self.exact = keys is not None
        if keys is not None:
            self._order = np.argsort(keys, kind="stable")  # equal keys: the first listed first
            self.keys = keys[self._order]

    def index_of(self, ids: pa.Array) -> np.ndarray:
        """The position in the list of each ID's first occurrence (int64; -1 where absent)."""
        if not self.exact:
            return np.asarray(pc.fill_null(pc.index_in(ids, value_set=self.wanted), -1), np.int64)
        if not len(self.keys):
            return np.full(len(ids), -1, np.int64)
        keys, _, lower = _key_parts(ids)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = lower & (self.keys[pos] == keys)
        return np.where(hit, self._order[pos], -1)

    def contains(self, ids: pa.Array) -> np.ndarray:
        """Whether each ID is in the list."""
        if not self.exact:
            return pc.is_in(ids, value_set=self.wanted).to_numpy(zero_copy_only=False)
        if not len(self.keys):
            return np.zeros(len(ids), bool)
        keys, _, lower = _key_parts(ids)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return lower & (self.keys[pos] == keys)


def rank(ids: pa.Array, seed: int) -> np.ndarray:
    """A seeded, order-independent pseudo-random rank per image (splitmix64 of the ID)."""
    x = hex_keys(ids) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x
