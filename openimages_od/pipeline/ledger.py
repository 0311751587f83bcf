"""Per-image ledger: one JSON line per plan row, in plan order.

``{output}/ledger/{split}/{split}-{i:05d}-of-{n:05d}.jsonl``, written after
the shard file and before its ``.stats.json``. Each line::

    {"image_id": "...", "status": "ok" | "failed", "source": "bucket" | "original" | "thumbnail" | null,
     "url": "...", "bytes": 123, "width": 640, "height": 480, "kept_original": false,
     "error": null | "http_404", "attempts": ["bucket:s3_not_found", ...], "reused": false,
     "from_cache": false}

``error`` is the reason from the last source tried that had a URL; ``attempts`` lists every
source's failure in order. ``from_cache`` is true when the record was rebuilt from the image
cache (no request; ``source``/``url``/``bytes`` then describe the fetch that filled the cache),
false when the image was fetched from its source in this run; ``reused`` when
``--retry-failed`` kept the record of the shard being rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LedgerEntry", "decode_ledger", "encode_ledger"]


@dataclass
class LedgerEntry:
    image_id: str
    status: str  # "ok" | "failed"
    source: str | None = None
    url: str | None = None
    bytes: int = 0
    width: int = 0
    height: int = 0
    kept_original: bool = False
    error: str | None = None
    attempts: list[str] = field(default_factory=list)
    reused: bool = False
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def encode_ledger(entries: Iterable[LedgerEntry]) -> bytes:
    return "".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in entries).encode()


def decode_ledger(data: bytes) -> list[LedgerEntry]:
    out = []
    known = set(LedgerEntry.__dataclass_fields__)
    for line in data.decode().splitlines():
        if line.strip():
            d: dict[str, Any] = json.loads(line)
            out.append(LedgerEntry(**{k: v for k, v in d.items() if k in known}))
    return out
