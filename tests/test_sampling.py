"""Repeat-factor sampling: the LVIS factors by hand, the tf.data stage, and training with it on."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from openimages_od.training.sampling import (
    class_repeat_factors,
    frequencies_from_stats,
    image_repeat_factor,
    repeat_factor_table,
)

sys.path.insert(0, str(Path(__file__).parent))


def test_lvis_repeat_factors_by_hand():
    # t = 0.01: a class in half the images -> 1; in exactly 1% -> sqrt(1) = 1; in 0.01% -> sqrt(100) = 10;
    # in 0.25% -> sqrt(4) = 2.
    r = class_repeat_factors({1: 0.5, 2: 0.01, 3: 0.0001, 4: 0.0025, 5: 0.0}, 0.01)
    assert r == {1: 1.0, 2: 1.0, 3: pytest.approx(10.0), 4: pytest.approx(2.0), 5: 1.0}
    assert image_repeat_factor([1, 4], r) == pytest.approx(2.0)  # the rarest class decides
    assert image_repeat_factor([1, 3, 4], r) == pytest.approx(10.0)
    assert image_repeat_factor([], r) == 1.0
    assert repeat_factor_table(r, 5) == [1.0, 1.0, 1.0, pytest.approx(10.0), pytest.approx(2.0), 1.0]


def test_frequencies_from_plan_stats():
    stats = {
        "splits": {
            "train": {
                "images": 200,
                "classes": {"/m/a": {"images": 100, "boxes": 900}, "/m/b": {"images": 5, "boxes": 5}},
            }
        }
    }
    f = frequencies_from_stats(stats, "train", {"/m/a": 1, "/m/b": 2})
    assert f == {1: 0.5, 2: 0.025}
    assert class_repeat_factors(f, 0.1)[2] == pytest.approx(math.sqrt(4))


@pytest.mark.tf
def test_sample_fn_repeats_by_factor_deterministically():
    import tensorflow as tf

    from openimages_od.training.sampling import make_sample_fn

    # ids: 0 common (factor 1), 1 rare (factor 3), 2 mid (factor 1.5), 3 no boxes (factor 1).
    table = [1.0, 1.0, 3.0, 1.5]
    examples = {"id": [0, 1, 2, 3], "groundtruth_classes": tf.ragged.constant([[1], [1, 2], [3], []])}

    def run(seed: int, passes: int = 400) -> list[int]:
        ds = tf.data.Dataset.from_tensor_slices(examples["id"])
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(examples["groundtruth_classes"])))
        ds = ds.map(lambda i, c: {"id": i, "groundtruth_classes": c}).repeat(passes)
        ds = ds.apply(make_sample_fn(table, seed, shuffle_buffer=8))
        return [int(x["id"]) for x in ds]

    a = run(7)
    assert a == run(7)  # deterministic per seed
    assert a != run(8)
    counts = {i: a.count(i) / 400 for i in range(4)}
    assert counts[0] == 1.0 and counts[3] == 1.0
    assert counts[1] == 3.0  # integer factor: always 3 copies
    assert 1.4 < counts[2] < 1.6  # 1.5: one copy plus a second half of the time (stochastic rounding)


@pytest.mark.tf
@pytest.mark.integration
def test_training_with_repeat_factor_sampling(tmp_path, monkeypatch):
    import json

    from training_helpers import build_output, tiny_overrides

    import openimages_od.training.sampling as sampling
    from openimages_od.config import load_config
    from openimages_od.training.train import run_train

    out = build_output(tmp_path / "out", num_images=16)
    # No plan here: frequencies are counted over the shards. t = 0.9 oversamples every class.
    cfg = load_config(None, tiny_overrides(f"file://{out}", steps=2) + ["train.repeat_factor_threshold=0.9"])
    used = []  # a spy: the real sample_fn runs, we only record that the training input pipeline asked for it
    real = sampling.make_sample_fn
    monkeypatch.setattr(sampling, "make_sample_fn", lambda *a, **k: used.append(a) or real(*a, **k))
    assert run_train(cfg) == 0
    assert len(used) == 1 and used[0][1] == cfg.train.seed
    params = (out / "model" / "params.yaml").read_text()
    assert "repeat_factors:" in params
    import yaml

    factors = yaml.safe_load(params)["task"]["repeat_factors"]
    assert len(factors) == 4 and factors[0] == 1.0 and all(f > 1.0 for f in factors[1:])
    assert json.loads(json.dumps(factors))  # plain numbers
