"""Repeat-factor sampling (LVIS; Gupta et al. 2019) for Open Images' long tail.

For each class ``c`` with ``f_c`` the fraction of training images that
contain it, the class repeat factor is ``r_c = max(1, sqrt(t / f_c))``; an
image's repeat factor is the largest ``r_c`` over the classes of its boxes
(1 for an image with none). Classes rarer than the threshold ``t`` are
oversampled; the others are untouched.

In the input pipeline each decoded example is emitted ``floor(r) + (u <
frac(r))`` times, with ``u`` drawn from a ``tf.data.Dataset.random`` stream
seeded by ``train.seed`` (stochastic rounding, as Detectron2's
``RepeatFactorTrainingSampler``, redrawn on every pass over the data), then
shuffled so the copies do not sit in one batch. Given the seed, the stream of
examples is the same from run to run; with multi-worker training every worker
applies it to its own shard of the files.

Frequencies come from the plan's statistics (``plan/stats.json``: per split,
images per class) when they exist, otherwise from one pass over the shards.

:func:`class_repeat_factors` and :func:`image_repeat_factor` are pure; only
:func:`make_sample_fn` imports TensorFlow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from openimages_od.errors import DataError

__all__ = [
    "class_repeat_factors",
    "frequencies_from_shards",
    "frequencies_from_stats",
    "image_repeat_factor",
    "make_sample_fn",
    "repeat_factor_table",
    "repeat_factors_for",
]

log = logging.getLogger(__name__)


def class_repeat_factors(image_fraction: Mapping[int, float], threshold: float) -> dict[int, float]:
    """``r_c = max(1, sqrt(t / f_c))`` per class id (a class never seen gets 1: nothing to repeat)."""
    out = {}
    for cid, f in image_fraction.items():
        out[int(cid)] = max(1.0, math.sqrt(threshold / f)) if f > 0 else 1.0
    return out


def image_repeat_factor(classes: Iterable[int], factors: Mapping[int, float]) -> float:
    """An image's repeat factor: the largest factor of its classes (1 with no boxes)."""
    return max((factors.get(int(c), 1.0) for c in classes), default=1.0)


def repeat_factor_table(factors: Mapping[int, float], num_ids: int) -> list[float]:
    """Factors indexed by label-map id (index 0, background, and unknown ids: 1)."""
    table = [1.0] * (num_ids + 1)
    for cid, r in factors.items():
        if 0 <= cid <= num_ids:
            table[cid] = float(r)
    return table


def frequencies_from_stats(
    stats: Mapping[str, Any], split: str, mid_to_id: Mapping[str, int]
) -> dict[int, float]:
    """Image fraction per label id from ``plan/stats.json`` (``splits[split].classes[mid].images``).

    Raises:
        DataError: the split or its per-class counts are missing.
    """
    sp = (stats.get("splits") or {}).get(split)
    if not sp or "classes" not in sp or not sp.get("images"):
        raise DataError(f"plan/stats.json has no per-class image counts for split {split!r}")
    n = float(sp["images"])
    return {mid_to_id[m]: v["images"] / n for m, v in sp["classes"].items() if m in mid_to_id}


def frequencies_from_shards(files: list[str], num_ids: int) -> dict[int, float]:
    """Image fraction per label id counted over local TFRecord shards (no TensorFlow)."""
    from openimages_od.pipeline.example import decode_example
    from openimages_od.training.scoring import iter_batches

    counts = np.zeros(num_ids + 1, np.int64)
    n = 0
    for batch in iter_batches(files, 256):
        for rec in batch:
            labels = decode_example(rec, ["image/object/class/label"]).get("image/object/class/label", ())
            for c in set(int(x) for x in labels):
                if 0 < c <= num_ids:
                    counts[c] += 1
            n += 1
    if n == 0:
        raise DataError("no examples to count class frequencies from")
    return {c: counts[c] / n for c in range(1, num_ids + 1)}


def make_sample_fn(table: list[float], seed: int | None, shuffle_buffer: int) -> Any:
    """A Model Garden ``sample_fn``: repeat each decoded example by its image's repeat factor."""
    import tensorflow as tf

    factors = tf.constant(table, tf.float32)
    n = len(table)

    def repeat_count(example: dict, rnd: tf.Tensor) -> tf.Tensor:
        classes = tf.cast(example["groundtruth_classes"], tf.int32)
        classes = tf.where((classes >= 0) & (classes < n), classes, 0)
        r = tf.reduce_max(tf.concat([tf.gather(factors, classes), [1.0]], 0))
        # u in [0, 1) from the seeded random stream: deterministic per seed, new draws every pass.
        u = tf.cast(tf.math.floormod(rnd, 1 << 24), tf.float32) / float(1 << 24)
        whole = tf.floor(r)
        return tf.cast(whole + tf.cast(u < r - whole, tf.float32), tf.int64)

    def sample_fn(ds: tf.data.Dataset) -> tf.data.Dataset:
        rnd = tf.data.Dataset.random(seed=seed)
        ds = tf.data.Dataset.zip((ds, rnd))
        ds = ds.flat_map(lambda ex, r: tf.data.Dataset.from_tensors(ex).repeat(repeat_count(ex, r)))
        return ds.shuffle(shuffle_buffer, seed=seed)

    return sample_fn


def repeat_factors_for(cfg: Any, train_files: list[str], num_ids: int) -> list[float]:
    """The repeat-factor table for ``cfg.train`` (threshold ``train.repeat_factor_threshold``).

    Frequencies from ``plan/stats.json`` for ``train.split``, else counted over ``train_files``.
    """
    from openimages_od.storage import ObjectNotFound
    from openimages_od.storage_setup import storage_from_config
    from openimages_od.training.inputs import load_label_map

    storage = storage_from_config(cfg)
    label_map = load_label_map(cfg, storage)
    t = float(cfg.train.repeat_factor_threshold)
    try:
        stats = storage.read_json(cfg.output_path("plan", "stats.json"))
        freq = frequencies_from_stats(stats, cfg.train.split, {c.mid: c.id for c in label_map})
        where = "plan/stats.json"
    except (ObjectNotFound, DataError) as exc:
        log.info("class frequencies from the shards (%s)", exc)
        freq = frequencies_from_shards(train_files, num_ids)
        where = "the shards"
    factors = class_repeat_factors(freq, t)
    boosted = {
        label_map.by_id[c].name: round(r, 3) for c, r in factors.items() if r > 1 and c in label_map.by_id
    }
    log.info(
        "repeat-factor sampling (t=%g, frequencies from %s): %d of %d classes oversampled %s",
        t,
        where,
        len(boosted),
        len(factors),
        dict(list(boosted.items())[:10]),
    )
    return repeat_factor_table(factors, num_ids)
