"""Benchmark: detection quality and throughput of the train path on a synthetic set, on CPU.

One command, end to end through the real stages:

1. ``openimages_od.synth`` generates photos (shapes of 3 classes on textured
   backgrounds) in the Open Images V7 layout, served by a local HTTP server;
2. ``oiod plan`` + ``oiod prepare`` (embedded Ray) write the TFRecord shards;
3. ``oiod train`` trains MobileNetV2 RetinaNet from scratch;
4. ``oiod evaluate`` scores the held-out validation images.

It prints mAP@0.5 (Open Images metric and COCO AP50) on the held-out images,
and the input pipeline's examples/s (Model Garden's parser + augmentation +
anchor labelling alone, no model) next to the model's steps/s x batch: the
ratio shows whether input is the bottleneck (ratio > 1: it is not).

    .venv/bin/python benchmarks/train_quality.py                 # ~12-15 min on 2 cores
    .venv/bin/python benchmarks/train_quality.py --steps 100      # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from openimages_od.config import Config, apply_overrides  # noqa: E402


def bench_config(workdir: Path, source: dict, args: argparse.Namespace) -> Config:
    steps = args.steps
    return Config.model_validate(
        {
            "source": {**source, "images": {"order": ["original", "thumbnail"]}},
            "selection": {"classes": ["Ball", "Traffic sign", "Window"]},
            "output": {"url": f"file://{workdir / 'output'}"},
            "ray": {
                "address": "local",
                "num_actors": 2,
                "num_cpus_per_actor": 0.5,
                "concurrency_per_actor": 16,
                "local_num_cpus": 2,
            },
            "image": {"max_side": 320, "quality": 90},
            "shards": {"images_per_shard": 64},
            "train": {
                "backbone": "mobilenetv2",
                "input_size": args.input_size,
                "batch_size": args.batch,
                "steps": steps,
                "fpn_filters": 64,
                "head_num_filters": 64,
                "head_num_convs": 2,
                "learning_rate": {
                    "schedule": "cosine",
                    "initial": args.lr,
                    "warmup_steps": min(50, steps // 5),
                },
                "augmentation": {"hflip": True, "scale_min": 0.8, "scale_max": 1.25},
                "checkpoint_every": steps,
                "summary_every": max(1, steps // 10),
                "shuffle_buffer": 512,
                "cache_dir": str(workdir / "cache"),
            },
            "evaluate": {
                "split": "validation",
                "metrics": ["coco", "openimages"],
                "batch_size": 8,
                "num_images_to_log": 2,
            },
        }
    )


def build_dataset(workdir: Path, args: argparse.Namespace, server) -> Config:
    """Synthetic photos -> real plan + prepare -> shards under workdir/output."""
    from openimages_od.openimages.plan import run_plan
    from openimages_od.pipeline.distribute import run_prepare
    from openimages_od.synth import generate_dataset

    n = args.images
    val = args.val_images
    ds = generate_dataset(
        workdir / "data",
        n + val,
        base_url=server.url(""),
        splits={"train": n / (n + val), "validation": val / (n + val)},
        min_side=160,
        max_side=320,
        rotation_rate=0.1,
        group_of_rate=0.1,
        seed=args.seed,
    )
    for im in ds.images:
        server.add(f"original/{im.split}/{im.image_id}.jpg", im.jpeg)
        server.add(f"thumb/{im.split}/{im.image_id}.jpg", im.jpeg)
    cfg = bench_config(workdir, ds.source_config(), args)
    run_plan(cfg)
    rc = run_prepare(cfg)
    if rc not in (0, None):
        raise SystemExit(f"prepare failed ({rc})")
    return cfg


def input_examples_per_s(cfg: Config, batches: int = 40) -> float:
    """Model Garden's training input pipeline alone (decode, augment, anchor labels), examples/s."""
    from official.core import task_factory

    from openimages_od.storage_setup import storage_from_config
    from openimages_od.training.experiment import build_experiment
    from openimages_od.training.inputs import (
        committed_shards,
        default_cache_dir,
        load_label_map,
        stage_shards,
    )

    st = storage_from_config(cfg)
    files = stage_shards(committed_shards(cfg, cfg.train.split, st), st, default_cache_dir(cfg) / "shards")
    params = build_experiment(cfg, len(load_label_map(cfg, st)) + 1, files)
    task = task_factory.get_task(params.task)
    ds = task.build_inputs(params.task.train_data)
    it = iter(ds)
    for _ in range(3):  # warm up (file open, shuffle buffer fill)
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.train.batch_size / (time.perf_counter() - t)


def model_steps_per_s(model_dir: Path) -> float:
    """Orbit's own ``steps_per_second`` summaries, skipping the first loop (graph tracing)."""
    import tensorflow as tf

    vals = []
    for f in sorted((model_dir / "train").glob("events.out.tfevents.*")):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value:
                if v.tag == "steps_per_second":
                    vals.append(
                        (e.step, float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value)
                    )
    vals.sort()
    body = [v for _, v in vals[1:]] or [v for _, v in vals]
    return sum(body) / len(body) if body else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=480, help="training images")
    p.add_argument("--val-images", type=int, default=80, help="held-out images")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.08)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep outputs here (default: a temp dir, removed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = p.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from openimages_od.devservices import ImageServer

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="oiod-trainbench-")).absolute()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    t_all = time.monotonic()
    try:
        with ImageServer() as server:
            t = time.monotonic()
            cfg = build_dataset(workdir, args, server)
            t_data = time.monotonic() - t
        if args.overrides:
            cfg = apply_overrides(cfg, args.overrides)

        import ray

        if ray.is_initialized():  # free the 2 cores for TensorFlow
            ray.shutdown()

        from openimages_od.training.evaluate import run_evaluate
        from openimages_od.training.train import run_train

        t = time.monotonic()
        run_train(cfg)
        t_train = time.monotonic() - t
        t = time.monotonic()
        run_evaluate(cfg)
        t_eval = time.monotonic() - t
        in_eps = input_examples_per_s(cfg)
        sps = model_steps_per_s(workdir / "output" / "model")
        metrics = json.loads((workdir / "output" / "eval" / f"metrics-{cfg.train.steps}.json").read_text())
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    oi = metrics["openimages"]
    model_eps = sps * cfg.train.batch_size
    print()
    print(
        f"train_quality: {args.images} train / {args.val_images} held-out images, {cfg.train.steps} steps, "
        f"batch {cfg.train.batch_size}, {cfg.train.input_size} px, {cfg.train.backbone} (from scratch), CPU"
    )
    print(f"  data (generate + plan + prepare)   {t_data:7.1f} s")
    print(f"  train                              {t_train:7.1f} s")
    print(f"  evaluate                           {t_eval:7.1f} s")
    print(f"  total                              {time.monotonic() - t_all:7.1f} s")
    print(f"  Open Images mAP@0.5 (held-out)     {oi['mAP']:.4f}   (target >= 0.5)")
    for v in oi["per_class"].values():
        print(
            f"      {v['name']:<14} AP@0.5 {v['ap'] if v['ap'] is None else round(v['ap'], 4)}  "
            f"(gt {v['num_gt']})"
        )
    print(f"  COCO AP50 / AP                     {metrics['coco']['AP50']:.4f} / {metrics['coco']['AP']:.4f}")
    print(f"  input pipeline                     {in_eps:7.1f} examples/s")
    print(
        f"  model                              {sps:7.2f} steps/s x {cfg.train.batch_size} = {model_eps:.1f} examples/s"
    )
    print(
        f"  input / model ratio                {in_eps / model_eps:7.2f}x  (> 1: input is not the bottleneck)"
    )
    return 0 if (oi["mAP"] or 0) >= 0.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
