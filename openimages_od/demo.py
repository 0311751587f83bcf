"""``oiod demo``: the whole system on one machine, no cluster, no internet.

1. Generate a small dataset in the real Open Images V7 layout (real MIDs,
   names and hierarchy; generated photos; some stored rotated).
2. Serve the photos from a local HTTP server (OriginalURL / Thumbnail300KURL)
   and, when SeaweedFS is installed, from a local S3 bucket laid out like the
   public ``open-images-dataset`` bucket (a few images left out of the bucket
   so the URL fallback is exercised).
3. Run plan, prepare (embedded Ray, ``file://`` output), train, evaluate,
   export, detect on held-out images, and the HTML report, with the real
   code of each stage; print where everything is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openimages_od.config import Config, apply_overrides, dump_config
from openimages_od.errors import OiodError

log = logging.getLogger(__name__)

DEMO_BUCKET = "oiod-demo-images"


def demo_config(workdir: Path, source: dict, bucket_endpoint: str | None, steps: int) -> dict:
    """The embedded-default config (mirrors configs/local-demo.yaml) for a demo workdir."""
    order = ["bucket", "original", "thumbnail"] if bucket_endpoint else ["original", "thumbnail"]
    images: dict[str, Any] = {"order": order}
    if bucket_endpoint:
        images.update(
            {
                "bucket": DEMO_BUCKET,
                "key_template": "{split}/{image_id}.jpg",
                "s3": {
                    "endpoint_url": bucket_endpoint,
                    "region": "us-east-1",
                    "unsigned": False,
                    "addressing_style": "path",
                    "max_attempts": 2,
                },
            }
        )
    return {
        "source": {**source, "images": images},
        "selection": {"classes": ["Ball", "Traffic sign", "Window"]},
        "output": {"url": f"file://{workdir / 'output'}"},
        "ray": {
            "address": "local",
            "num_actors": 2,
            "num_cpus_per_actor": 0.5,
            "concurrency_per_actor": 16,
            "local_num_cpus": 2,
        },
        "image": {"max_side": 512, "quality": 90},
        "shards": {"images_per_shard": 48},
        # The settings benchmarks/train_quality.py measured (mAP@0.5 ~0.98 at 600 steps on 480 images).
        "train": {
            "backbone": "mobilenetv2",
            "input_size": 128,
            "batch_size": 8,
            "steps": steps,
            "learning_rate": {"schedule": "cosine", "initial": 0.08, "warmup_steps": min(50, steps // 5)},
            "shuffle_buffer": 512,
            "checkpoint_every": max(1, steps // 3),
            "summary_every": max(1, min(50, steps // 5)),
        },
        "evaluate": {"split": "validation", "metrics": ["coco", "openimages"], "timeout_s": 1},
        "export": {"score_threshold": 0.05},
        "serve": {"min_score": 0.3},
    }


@contextlib.contextmanager
def _local_bucket(dataset: Any, skip_every: int = 10) -> Iterator[str | None]:
    """Start SeaweedFS and upload the photos (all but every ``skip_every``-th); yield its endpoint or None."""
    try:
        from openimages_od.devservices import SeaweedFS

        sw = SeaweedFS(workdir=str(dataset.root.parent / "seaweedfs"))
        sw.start()
    except Exception as exc:
        log.warning("local S3 bucket not available (%s); serving photos over HTTP only", exc)
        yield None
        return
    try:
        import os

        for k, v in sw.env().items():
            if k.startswith("AWS_"):
                os.environ[k] = v
        sw.create_bucket(DEMO_BUCKET)
        client = sw.client()
        for i, im in enumerate(sorted(dataset.images, key=lambda im: im.image_id)):
            if i % skip_every == skip_every - 1:
                continue  # missing from the bucket, like some real images: fetched from OriginalURL instead
            client.put_object(Bucket=DEMO_BUCKET, Key=f"{im.split}/{im.image_id}.jpg", Body=im.jpeg)
        yield sw.endpoint
    finally:
        sw.stop()


def _step(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.monotonic()


def run_demo(
    cfg: Config,
    workdir: str | None = None,
    images: int | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Run the whole path on a generated dataset and print a summary.

    Args:
        cfg: ignored except for logging (the demo builds its own config; use ``--set`` to change it).
        workdir: where everything goes (default ``./oiod-demo``; wiped first).
        images: number of generated photos (default 240).
        steps: training steps (default 600).
        overrides: ``--set`` overrides applied to the demo config.
    """
    from openimages_od.devservices import ImageServer
    from openimages_od.synth import generate_dataset

    t_start = time.monotonic()
    root = Path(workdir or "oiod-demo").absolute()
    n_images = images or 240
    n_steps = steps or 600
    if n_images < 8:
        raise OiodError(
            "--images must be at least 8 (the demo needs train and validation images)", exit_code=2
        )
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    with ImageServer() as server:
        t = _step(f"1/8 generate {n_images} photos in the Open Images V7 layout")
        ds = generate_dataset(
            root / "data", n_images, base_url=server.url(""), splits={"train": 0.75, "validation": 0.25}
        )
        for im in ds.images:
            server.add(f"original/{im.split}/{im.image_id}.jpg", im.jpeg)
            server.add(f"thumb/{im.split}/{im.image_id}.jpg", im.jpeg)
        print(
            f"   {len(ds.images)} photos, {sum(im.rotation != 0 for im in ds.images)} stored rotated; "
            f"served at {server.url('')} ({time.monotonic() - t:.1f}s)"
        )

        with _local_bucket(ds) as endpoint:
            if endpoint:
                print(f"   local S3 bucket s3://{DEMO_BUCKET} at {endpoint} (every 10th photo left out)")
            conf = Config.model_validate(demo_config(root, ds.source_config(), endpoint, n_steps))
            if overrides:
                conf = apply_overrides(conf, overrides)
            (root / "demo-config.yaml").write_text(dump_config(conf))
            results = _run_stages(conf, root, ds)

    elapsed = time.monotonic() - t_start
    _print_summary(conf, root, results, elapsed)
    return 0


def _run_stages(conf: Config, root: Path, ds: Any) -> dict[str, Any]:
    from openimages_od.cli import resolve  # the same functions the CLI subcommands call

    tc = conf.train
    stages = [
        ("plan", "2/8 plan: parse metadata, select classes, label map, shard plan"),
        ("prepare", "3/8 prepare: fetch, verify, rotate, resize, write TFRecord shards (embedded Ray)"),
        ("train", f"4/8 train: RetinaNet ({tc.backbone}, {tc.input_size}px) for {tc.steps} steps on CPU"),
        ("evaluate", "5/8 evaluate: COCO and Open Images mAP on the validation split"),
        ("export", "6/8 export: SavedModel + label map + model.json"),
    ]
    results: dict[str, Any] = {}
    for command, title in stages:
        t = _step(title)
        results[command] = resolve(command)(conf)
        print(f"   done in {time.monotonic() - t:.1f}s")

    t = _step("7/8 detect: held-out validation photos")
    from openimages_od.serving.detect import run_detect

    held_out = sorted(ds.split_images("validation"), key=lambda im: im.image_id)[:4]
    paths = [str(ds.bucket_dir / "validation" / f"{im.image_id}.jpg") for im in held_out]
    det_dir = root / "detections"
    det_cfg = apply_overrides(conf, [f"serve.model={conf.export_dir}"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_detect(det_cfg, images=paths, out=str(det_dir))
    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.strip().startswith("{")]
    (det_dir / "detections.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (det_dir / "detections.jsonl").write_text(buf.getvalue())
    results["detect"] = lines
    print(
        f"   {len(lines)} images, {sum(len(x.get('detections', [])) for x in lines)} boxes "
        f"-> {det_dir} ({time.monotonic() - t:.1f}s)"
    )

    t = _step("8/8 report: report.html")
    from openimages_od.report import run_report

    results["report"] = run_report(conf)
    print(f"   done in {time.monotonic() - t:.1f}s")
    return results


def _latest_metrics(conf: Config) -> dict | None:
    from openimages_od.storage_setup import storage_from_config

    st = storage_from_config(conf)
    found = [
        o.url
        for o in st.list(conf.output_path("eval") + "/")
        if o.url.rsplit("/", 1)[-1].startswith("metrics-")
    ]
    if not found:
        return None

    def step_of(u: str) -> int:
        try:
            return int(u.rsplit("metrics-", 1)[1].split(".")[0])
        except ValueError:
            return -1

    return st.read_json(max(found, key=step_of))


def _print_summary(conf: Config, root: Path, results: dict[str, Any], elapsed: float) -> None:
    out = root / "output"
    metrics = _latest_metrics(conf) or {}
    print("\n" + "=" * 72)
    print(f"oiod demo finished in {elapsed / 60:.1f} min. Everything is under {root}")
    rows = [
        ("generated dataset (V7 layout)", root / "data"),
        ("config used", root / "demo-config.yaml"),
        ("label map", out / "label_map.pbtxt"),
        ("plan + stats", out / "plan"),
        ("TFRecord shards", out / "tfrecords"),
        ("prepare report", out / "prepare_report.json"),
        ("checkpoints + TensorBoard", out / "model"),
        ("metrics", out / "eval"),
        ("SavedModel", out / "export" / "saved_model"),
        ("annotated detections", root / "detections"),
        ("HTML report", out / "report.html"),
    ]
    for label, path in rows:
        print(f"  {label:<30} {path}")
    summary = _headline(metrics)
    if summary:
        print(f"  {'metrics':<30} {summary}")
    print(f"\nLook at it:  tensorboard --logdir {out / 'model'}    |    open {out / 'report.html'}")
    print(f"Serve it:    oiod serve --model {out / 'export'}   then open http://127.0.0.1:8080/")
    print("=" * 72)


def _headline(metrics: dict) -> str:
    parts = []
    for key, label in (("coco", "COCO"), ("openimages", "OpenImages")):
        sec = metrics.get(key)
        if isinstance(sec, dict):
            for k in ("AP50", "AP", "mAP@0.5", "mAP"):
                if isinstance(sec.get(k), (int, float)):
                    parts.append(f"{label} {k}={sec[k]:.3f}")
                    break
    return ", ".join(parts)
