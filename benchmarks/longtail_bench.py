"""Benchmark: repeat-factor sampling on a long-tailed dataset, same CPU budget, side by side.

One command, through the real stages: ``openimages_od.synth`` generates a
long-tailed training set (``--rare`` classes drawn ``--ratio`` times less
often than the others) and a class-balanced held-out set, served by a local
HTTP server; ``oiod plan`` + ``oiod prepare`` write the shards (and the plan
statistics the sampler reads its class frequencies from); then the same
MobileNetV2 RetinaNet is trained twice from the same seed for the same
number of steps and batch size (the same CPU budget), once as is and once
with repeat-factor sampling (``train.repeat_factor_threshold``), and both are
evaluated on the held-out images. It prints mean AP@0.5 and the rare classes'
AP for both runs and their ratio (RFS / baseline).

    .venv/bin/python benchmarks/longtail_bench.py                # ~20-30 min on 2 idle cores
    .venv/bin/python benchmarks/longtail_bench.py --steps 150    # quick look

With three classes the threshold must be far above LVIS's 0.001 (chosen for
1,200 classes): the default 0.5 oversamples a class found in under half of
the training images, so the rare class (in ~5% of images) gets r ~ 3.
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

CLASSES = ["Ball", "Traffic sign", "Window"]


def bench_config(workdir: Path, source: dict, args: argparse.Namespace) -> Config:
    steps = args.steps
    return Config.model_validate(
        {
            "source": {**source, "images": {"order": ["original", "thumbnail"]}},
            "selection": {"classes": CLASSES},
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
                "seed": args.seed,
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
                "num_images_to_log": 0,
                "analysis_worst_images": 0,
            },
        }
    )


def build_dataset(workdir: Path, args: argparse.Namespace, server) -> Config:
    """Long-tailed train + balanced validation -> real plan + prepare -> shards."""
    from openimages_od.openimages.plan import run_plan
    from openimages_od.pipeline.distribute import run_prepare
    from openimages_od.synth import generate_dataset

    weights = {c: (1.0 if c in args.rare else float(args.ratio)) for c in CLASSES}
    train = generate_dataset(
        workdir / "train-data",
        args.images,
        base_url=server.url(""),
        splits={"train": 1.0},
        min_side=160,
        max_side=320,
        rotation_rate=0.0,
        group_of_rate=0.1,
        seed=args.seed,
        class_weights=weights,
    )
    val = generate_dataset(
        workdir / "val-data",
        args.val_images,
        base_url=server.url(""),
        splits={"validation": 1.0},
        min_side=160,
        max_side=320,
        rotation_rate=0.0,
        group_of_rate=0.1,
        seed=args.seed + 1000,
    )
    for im in train.images + val.images:
        server.add(f"original/{im.split}/{im.image_id}.jpg", im.jpeg)
        server.add(f"thumb/{im.split}/{im.image_id}.jpg", im.jpeg)
    source = train.source_config(["train"])
    source["splits"].update(val.source_config(["validation"])["splits"])
    cfg = bench_config(workdir, source, args)
    run_plan(cfg)
    rc = run_prepare(cfg)
    if rc not in (0, None):
        raise SystemExit(f"prepare failed ({rc})")
    return cfg


def train_and_evaluate(cfg: Config, name: str, overrides: list[str]) -> tuple[dict, float]:
    from openimages_od.training.evaluate import run_evaluate
    from openimages_od.training.train import run_train

    run_cfg = apply_overrides(cfg, [f"train.model_dir={cfg.output_root}/model-{name}", *overrides])
    t = time.monotonic()
    run_train(run_cfg)
    seconds = time.monotonic() - t
    run_evaluate(run_cfg)
    m = json.loads(
        Path(
            run_cfg.output_path("eval", f"metrics-{cfg.train.steps}.json").removeprefix("file://")
        ).read_text()
    )
    return m, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=480, help="training images (long-tailed)")
    p.add_argument("--val-images", type=int, default=120, help="held-out images (balanced)")
    p.add_argument("--rare", nargs="+", default=["Window"], choices=CLASSES, help="the rare classes")
    p.add_argument("--ratio", type=float, default=20.0, help="how much rarer the rare classes are drawn")
    p.add_argument("--threshold", type=float, default=0.5, help="repeat-factor threshold t")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.08)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep outputs here (default: a temp dir, removed)")
    args = p.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from openimages_od.devservices import ImageServer

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="oiod-longtail-")).absolute()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    try:
        with ImageServer() as server:
            cfg = build_dataset(workdir, args, server)
        import ray

        if ray.is_initialized():  # free the cores for TensorFlow
            ray.shutdown()
        stats = json.loads((workdir / "output" / "plan" / "stats.json").read_text())
        runs = {}
        for name, extra in (("baseline", []), ("rfs", [f"train.repeat_factor_threshold={args.threshold}"])):
            runs[name] = train_and_evaluate(cfg, name, extra)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    tr = stats["splits"]["train"]
    print()
    print(
        f"longtail_bench: {args.images} train images (rare {args.rare} drawn {args.ratio:g}x less), "
        f"{args.val_images} balanced held-out, {args.steps} steps x batch {args.batch}, {args.input_size} px, "
        f"mobilenetv2 from scratch, CPU; RFS threshold t={args.threshold}"
    )
    print(
        "  training images per class: "
        + ", ".join(
            f"{mid}={v['images']} ({v['images'] / tr['images']:.1%})" for mid, v in tr["classes"].items()
        )
    )
    base, rfs = runs["baseline"][0], runs["rfs"][0]

    def rare_ap(m: dict) -> float:
        aps = [
            v["ap"]
            for v in m["openimages"]["per_class"].values()
            if v["name"] in args.rare and v["ap"] is not None
        ]
        return sum(aps) / len(aps) if aps else float("nan")

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a else "n/a"

    rows = [
        ("Open Images mAP@0.5", base["openimages"]["mAP"], rfs["openimages"]["mAP"]),
        ("rare-class AP@0.5", rare_ap(base), rare_ap(rfs)),
        ("COCO AP50", base["coco"]["AP50"], rfs["coco"]["AP50"]),
    ]
    for v in base["openimages"]["per_class"].values():
        name = v["name"]
        other = next(x for x in rfs["openimages"]["per_class"].values() if x["name"] == name)
        rows.append((f"  AP {name}", v["ap"] or 0.0, other["ap"] or 0.0))
    print(f"  {'':24} {'baseline':>10} {'RFS':>10} {'RFS/baseline':>13}")
    for label, a, b in rows:
        print(f"  {label:24} {a:10.4f} {b:10.4f} {ratio(a, b):>13}")
    print(
        f"  {'train seconds':24} {runs['baseline'][1]:10.1f} {runs['rfs'][1]:10.1f} "
        f"{ratio(runs['baseline'][1], runs['rfs'][1]):>13}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
