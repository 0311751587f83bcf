"""Benchmark: what a re-plan and a re-shard cost, next to a fresh prepare (issue 11).

One run, one embedded Ray instance (started once, so its start-up is in no figure), a
generated Open Images V7-layout dataset (real MIDs, some photos stored rotated) served by a
local HTTP server that counts requests and answers each after ``--latency-ms`` (a remote
source is never free: Flickr or the public bucket answer in tens to hundreds of ms):

1. **fresh**: plan ``--images`` N images (``selection.max_images``) and prepare them;
2. **re-plan +10%**: plan 1.1 N images into the same output (the seeded cap keeps the first
   N and adds the next ones) and prepare: only the new images are fetched, every other
   record is rebuilt from the image cache (CPU only);
3. **re-shard**: the same images with another ``shards.images_per_shard``: no fetch at all;
4. **baseline**: a fresh prepare of the 1.1 N images into an empty output (what a re-plan
   cost before this issue: everything fetched again).

Target: the re-plan costs no more than fetching the new images plus a CPU-only rebuild,
i.e. its wall time is about ``fresh x 0.1 + rebuild`` and well under the baseline's.

    .venv/bin/python benchmarks/replan_bench.py                 # 1000 images, 50 ms latency
    .venv/bin/python benchmarks/replan_bench.py --images 300    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="N, the images of the first plan (default 1000)")
    ap.add_argument(
        "--latency-ms", type=float, default=50.0, help="source latency per image request (default 50)"
    )
    ap.add_argument("--max-side", type=int, default=512, help="image.max_side (default 512)")
    ap.add_argument("--workdir", help="where to write (default a temp dir, removed at the end)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from openimages_od.config import Config, load_config
    from openimages_od.devservices import ImageServer, Reply
    from openimages_od.layout import Layout
    from openimages_od.openimages.plan import build_plan
    from openimages_od.pipeline.distribute import _connect, run_prepare
    from openimages_od.storage import Storage
    from openimages_od.synth import SynthClass, generate_dataset

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="oiod-replan-bench-"))
    n_new = max(1, round(args.images * 0.1))
    total = args.images + n_new
    classes = (
        SynthClass("/m/0bt9lr", "Dog", "triangle", (140, 90, 40)),
        SynthClass("/m/014j1m", "Apple", "circle", (200, 30, 30)),
        SynthClass("/m/01yrx", "Cat", "rect", (40, 200, 60)),
    )
    t = time.monotonic()
    with ImageServer() as srv:
        ds = generate_dataset(
            work / "ds",
            int(total * 1.05) + 2,
            splits={"train": 1.0},
            classes=classes,
            base_url=srv.url("").rstrip("/"),
            min_side=480,
            max_side=800,
            rotation_rate=0.15,
            seed=1,
        )
        for im in ds.images:
            srv.script(
                f"original/{im.split}/{im.image_id}.jpg", [Reply(200, im.jpeg, delay_s=args.latency_ms / 1e3)]
            )
        print(f"generated {len(ds.images)} photos in {time.monotonic() - t:.1f} s ({work})")

        def cfg(out: str, max_images: int, per_shard: int) -> Config:
            base = load_config(
                None,
                [
                    f"output.url={work / out}",
                    "source.images.order=[original]",
                    f"image.max_side={args.max_side}",
                    "ray.num_actors=2",
                    "ray.num_cpus_per_actor=1",
                    "ray.concurrency_per_actor=32",
                    "ray.progress=false",
                    "ray.local_num_cpus=2",
                    "ray.object_store_memory_mb=200",
                    "selection.classes=[Dog, Apple, Cat]",
                    f"selection.max_images={max_images}",
                    f"shards.images_per_shard={per_shard}",
                ],
            )
            d = base.model_dump(mode="json")
            d["source"] = {**d["source"], **ds.source_config(["train"])}
            return Config.model_validate(d)

        _connect(cfg("out", args.images, 100))  # Ray once, outside every timer

        def run(name: str, c: Config) -> dict:
            hits0 = sum(srv.hits.values())
            t0 = time.monotonic()
            build_plan(c)
            t1 = time.monotonic()
            run_prepare(c)
            t2 = time.monotonic()
            report = Storage().read_json(Layout.from_config(c).prepare_report)
            r = {
                "name": name,
                "images": report["totals"]["images"],
                "fetches": sum(srv.hits.values()) - hits0,
                "from_cache": report["this_run"]["cache_hits"],
                "plan_s": round(t1 - t0, 2),
                "prepare_s": round(t2 - t1, 2),
            }
            print(
                f"  {name:<26} {r['images']:>6} images  {r['fetches']:>6} fetched  {r['from_cache']:>6} from cache  "
                f"plan {r['plan_s']:6.2f} s  prepare {r['prepare_s']:7.2f} s",
                flush=True,
            )
            return r

        print(f"source latency {args.latency_ms:g} ms/request, max_side {args.max_side}, 2 actors on 2 CPUs")
        fresh = run(f"fresh prepare (N={args.images})", cfg("out", args.images, 100))
        replan = run(f"re-plan +10% ({total})", cfg("out", total, 100))
        reshard = run("re-shard (same images)", cfg("out", total, 40))
        base = run(f"baseline: fresh {total}", cfg("baseline", total, 100))

    import ray

    ray.shutdown()
    per_image = fresh["prepare_s"] / max(1, fresh["images"])
    target = per_image * replan["fetches"] + reshard["prepare_s"]
    rows = {
        "fresh_prepare_s": fresh["prepare_s"],
        "replan_prepare_s": replan["prepare_s"],
        "replan_fetches": replan["fetches"],
        "new_images": total - args.images,
        "reshard_prepare_s": reshard["prepare_s"],
        "reshard_fetches": reshard["fetches"],
        "baseline_prepare_s": base["prepare_s"],
        "replan_vs_baseline": round(replan["prepare_s"] / max(1e-9, base["prepare_s"]), 3),
        "reshard_vs_baseline": round(reshard["prepare_s"] / max(1e-9, base["prepare_s"]), 3),
        "replan_target_s": round(target, 2),
    }
    print()
    print(
        f"re-plan: {replan['fetches']} fetches for {total - args.images} new images, "
        f"{replan['prepare_s']:.2f} s = {rows['replan_vs_baseline']:.2f}x the baseline's {base['prepare_s']:.2f} s "
        f"(target: new images' fetch {per_image * replan['fetches']:.2f} s + CPU-only rebuild "
        f"{reshard['prepare_s']:.2f} s = {target:.2f} s)"
    )
    print(
        f"re-shard: {reshard['fetches']} fetches, {reshard['prepare_s']:.2f} s = "
        f"{rows['reshard_vs_baseline']:.2f}x the baseline"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "runs": [fresh, replan, reshard, base], "figures": rows}, indent=2
            )
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
