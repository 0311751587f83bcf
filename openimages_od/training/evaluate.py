"""``oiod evaluate``: COCO mAP and the Open Images metric for a checkpoint.

For each checkpoint the evaluator runs the same inference graph the export
serves (:class:`~openimages_od.training.detector.DetectorModule`) over the
committed shards of ``evaluate.split`` and writes:

* ``{output}/eval/metrics-{step}.json``: overall and per-class figures;
* TensorBoard scalars and a few images (ground truth green, detections red)
  under ``{model_dir}/eval``.

``--continuous`` polls ``model_dir`` every ``evaluate.poll_interval_s`` for a
new checkpoint (like the seed's ``eval.py``), and stops when the final
training step has been evaluated, after ``evaluate.timeout_s`` without a new
checkpoint, or on SIGTERM/SIGINT (the evaluation in progress is abandoned and
the process exits 0).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from openimages_od.config import Config, save_resolved
from openimages_od.errors import DataError
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import Storage

__all__ = ["run_evaluate", "Evaluator", "parse_ground_truth"]

log = logging.getLogger(__name__)

VIS_SCORE = 0.3


class _Abandoned(Exception):
    """The stop event fired during an evaluation."""


@dataclass
class GroundTruth:
    """One image's annotations from its tf.Example (boxes in pixels)."""

    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    group_of: np.ndarray
    positive: Optional[set[int]]
    negative: Optional[set[int]]
    image_id: str = ""
    encoded: bytes = field(default=b"", repr=False)


def parse_ground_truth(serialized: bytes) -> GroundTruth:
    """Ground truth of one serialized tf.Example with the shard contract's keys."""
    import tensorflow as tf

    ex = tf.train.Example.FromString(serialized)
    f = ex.features.feature

    def ints(k: str) -> list[int]:
        return list(f[k].int64_list.value) if k in f else []

    def floats(k: str) -> list[float]:
        return list(f[k].float_list.value) if k in f else []

    w = ints("image/width")[0]
    h = ints("image/height")[0]
    ymin, xmin = np.array(floats("image/object/bbox/ymin")), np.array(floats("image/object/bbox/xmin"))
    ymax, xmax = np.array(floats("image/object/bbox/ymax")), np.array(floats("image/object/bbox/xmax"))
    boxes = np.stack([ymin * h, xmin * w, ymax * h, xmax * w], axis=1) if len(ymin) else np.zeros((0, 4))
    labels = np.array(ints("image/object/class/label"), dtype=np.int64)
    group = ints("image/object/group_of") or ints("image/object/is_crowd") or [0] * len(labels)
    positive = negative = None
    image_labels = ints("image/class/label")
    if "image/class/label" in f:
        conf = floats("image/class/confidence") or [1.0] * len(image_labels)
        positive = {c for c, s in zip(image_labels, conf) if s >= 0.5}
        negative = {c for c, s in zip(image_labels, conf) if s < 0.5}
    name = f["image/filename"].bytes_list.value[0].decode() if "image/filename" in f else ""
    return GroundTruth(w, h, boxes, labels, np.array(group, dtype=bool), positive, negative, name,
                       f["image/encoded"].bytes_list.value[0])


class Evaluator:
    """Holds the model and the evaluation data; evaluates one checkpoint at a time.

    Args:
        cfg: the project config.
        storage: storage layer.
        stop: when set, the evaluation in progress is abandoned.
    """

    def __init__(self, cfg: Config, storage: Storage, stop: Optional[threading.Event] = None) -> None:
        from openimages_od.dataset import dataset_shards, dataset_summary
        from openimages_od.training.inputs import default_cache_dir, load_hierarchy, load_label_map, stage_shards
        from openimages_od.training.oid_metric import hierarchy_from_json

        self.cfg = cfg
        self.storage = storage
        self.stop = stop or threading.Event()
        self.label_map: LabelMap = load_label_map(cfg, storage)
        urls, dataset = dataset_shards(cfg, storage, cfg.evaluate.split)
        self.dataset = dataset_summary(dataset)  # which dataset these metrics score (named in every metrics file)
        self.files = stage_shards(urls, storage, default_cache_dir(cfg) / "shards")
        tree = load_hierarchy(cfg, storage)
        self.hierarchy = (hierarchy_from_json(tree, {c.mid: c.id for c in self.label_map})
                          if tree is not None else None)
        self._module: Any = None
        self._summary_dir, self._syncer = self._eval_dir()

    def _eval_dir(self) -> tuple[str, Any]:
        from openimages_od.config import join_url
        from openimages_od.storage import local_path
        from openimages_od.training.sync import DirSync

        url = join_url(self.cfg.model_dir, "eval")
        lp = local_path(url)
        if lp is not None:
            lp.mkdir(parents=True, exist_ok=True)
            return str(lp), None
        work = DirSync.local_work_dir(url)
        work.mkdir(parents=True, exist_ok=True)
        return str(work), DirSync(self.storage, work, url)

    def _build(self) -> Any:
        if self._module is None:
            from openimages_od.training.detector import DetectorModule, build_model
            from openimages_od.training.experiment import build_experiment, padded_size

            params = build_experiment(self.cfg, num_classes=self.label_map.num_classes, mixed_precision="float32",
                                      score_threshold=self.cfg.evaluate.min_score or 0.05, max_detections=100)
            padded = padded_size(self.cfg.train.input_size)
            self._module = DetectorModule(build_model(params, padded), self.cfg.train.input_size, padded)
        return self._module

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Abandoned()

    def evaluate(self, checkpoint: str, step: Optional[int]) -> dict:
        """Evaluate one local checkpoint prefix; write metrics JSON and summaries; return the metrics."""
        import tensorflow as tf

        from openimages_od.training.coco_metric import CocoAccumulator
        from openimages_od.training.detector import restore_model
        from openimages_od.training.oid_metric import ImageDetections, ImageGroundTruth, OpenImagesMetric

        module = self._build()
        restore_model(module.model, checkpoint)
        if step is None:
            step = _read_global_step(checkpoint)
        ec = self.cfg.evaluate
        names = {c.id: c.name for c in self.label_map}
        ids = [c.id for c in self.label_map]
        oid = OpenImagesMetric(ids, self.hierarchy, ec.iou_threshold, names)
        coco = CocoAccumulator(ids, names)
        vis: list[tuple[GroundTruth, np.ndarray, np.ndarray, np.ndarray]] = []
        t0 = time.monotonic()
        n = 0
        ds = tf.data.TFRecordDataset(self.files).batch(ec.batch_size)
        if ec.max_images:
            ds = tf.data.TFRecordDataset(self.files).take(ec.max_images).batch(ec.batch_size)
        for batch in ds:
            self._check_stop()
            gts = [parse_ground_truth(s) for s in batch.numpy()]
            out = module.detect_bytes(tf.constant([g.encoded for g in gts]))
            out = {k: v.numpy() for k, v in out.items()}
            for i, g in enumerate(gts):
                k = int(out["num_detections"][i])
                boxes = out["detection_boxes"][i, :k] * np.array([g.height, g.width, g.height, g.width])
                scores = out["detection_scores"][i, :k]
                labels = out["detection_classes"][i, :k]
                oid.add_image(ImageGroundTruth(g.boxes, g.labels, g.group_of, g.positive, g.negative),
                              ImageDetections(boxes, scores, labels))
                coco.add_image(g.width, g.height, g.boxes, g.labels, g.group_of, boxes, scores, labels)
                if len(vis) < ec.num_images_to_log:
                    vis.append((g, out["detection_boxes"][i, :k], scores, labels))
                n += 1
        if n == 0:
            raise DataError(f"no images in the {ec.split!r} shards")
        self._check_stop()
        metrics: dict[str, Any] = {"step": step, "checkpoint": checkpoint, "split": ec.split, "num_images": n,
                                   "eval_seconds": round(time.monotonic() - t0, 3), "dataset": self.dataset}
        if "coco" in ec.metrics:
            metrics["coco"] = coco.result()
        if "openimages" in ec.metrics:
            r = oid.result()
            metrics["openimages"] = {
                "mAP": r["mAP"], "iou_threshold": r["iou_threshold"],
                "hierarchy": self.hierarchy is not None, "num_classes_scored": r["num_classes_scored"],
                "per_class": {str(cid): v for cid, v in r["per_class"].items()},
            }
        self._write(metrics, step or 0, vis)
        return metrics

    def _write(self, metrics: dict, step: int, vis: list) -> None:
        import tensorflow as tf

        self.storage.write_json(self.cfg.output_path("eval", f"metrics-{step}.json"), metrics)
        writer = tf.summary.create_file_writer(self._summary_dir)
        with writer.as_default(step=step):
            for k, v in (metrics.get("coco") or {}).items():
                tf.summary.scalar(f"coco/{k}", v)
            oi = metrics.get("openimages")
            if oi:
                if oi["mAP"] is not None:
                    tf.summary.scalar("openimages/mAP@0.5", oi["mAP"])
                for v in oi["per_class"].values():
                    if v["ap"] is not None:
                        tf.summary.scalar(f"openimages_per_class/{v['name']}", v["ap"])
            for i, (g, boxes, scores, labels) in enumerate(vis):
                tf.summary.image(f"detections/{i}", _draw(g, boxes, scores, labels)[None])
        writer.flush()
        writer.close()
        if self._syncer is not None:
            self._syncer.push()


def _draw(g: GroundTruth, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Any:
    import tensorflow as tf

    image = tf.image.convert_image_dtype(tf.io.decode_image(g.encoded, channels=3, expand_animations=False),
                                         tf.float32)
    norm = np.array([g.height, g.width, g.height, g.width], dtype=np.float32)
    gt = (g.boxes / norm).astype(np.float32) if len(g.boxes) else np.zeros((0, 4), np.float32)
    if len(gt):
        image = tf.image.draw_bounding_boxes(image[None], gt[None], np.array([[0.0, 1.0, 0.0, 1.0]]))[0]
    pred = boxes[scores >= VIS_SCORE].astype(np.float32)
    if len(pred):
        image = tf.image.draw_bounding_boxes(image[None], pred[None], np.array([[1.0, 0.0, 0.0, 1.0]]))[0]
    return image


def _read_global_step(checkpoint: str) -> Optional[int]:
    import tensorflow as tf

    try:
        for name, _ in tf.train.list_variables(checkpoint):
            if name.startswith("global_step"):
                return int(tf.train.load_variable(checkpoint, name))
    except (tf.errors.OpError, ValueError):
        pass
    return None


def run_evaluate(cfg: Config, continuous: bool = False, checkpoint: Optional[str] = None) -> int:
    """Evaluate the latest (or given) checkpoint, or keep evaluating new ones with ``continuous``.

    Args:
        cfg: the project config.
        continuous: watch ``model_dir`` for new checkpoints.
        checkpoint: evaluate this checkpoint (prefix or folder, local or ``s3://``) once.

    Returns:
        0 (also when stopped by SIGTERM).

    Raises:
        DataError: no shards for ``evaluate.split``, no label map, or (not continuous) no checkpoint.
    """
    from openimages_od.training.checkpoints import (checkpoint_step, fetch_checkpoint, latest_checkpoint_url,
                                                    resolve_checkpoint)

    storage = Storage.from_config(cfg)
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    try:
        evaluator = Evaluator(cfg, storage, stop)
        save_resolved(cfg, cfg.output_path("eval"), storage)
        if checkpoint or not continuous:
            ckpt, step = resolve_checkpoint(cfg, storage, checkpoint)
            try:
                m = evaluator.evaluate(ckpt, step)
            except _Abandoned:
                log.warning("stopped: evaluation of %s abandoned", ckpt)
                return 0
            _log_summary(m)
            return 0
        ec = cfg.evaluate
        last_step: Optional[int] = None
        last_url: Optional[str] = None
        last_new = time.monotonic()
        log.info("watching %s for checkpoints (every %.0f s)", cfg.model_dir, ec.poll_interval_s)
        while not stop.is_set():
            url = latest_checkpoint_url(cfg.model_dir, storage)
            if url is not None and url != last_url:
                step = checkpoint_step(url)
                try:
                    local = fetch_checkpoint(url, storage)
                except (DataError, FileNotFoundError) as exc:  # deleted by max_to_keep meanwhile
                    log.warning("checkpoint %s vanished before it was read (%s)", url, exc)
                    stop.wait(min(ec.poll_interval_s, 1.0))
                    continue
                try:
                    m = evaluator.evaluate(local, step)
                except _Abandoned:
                    log.warning("stopped: evaluation of %s abandoned", url)
                    break
                _log_summary(m)
                last_url, last_step, last_new = url, m.get("step"), time.monotonic()
                if last_step is not None and last_step >= cfg.train.steps:
                    log.info("reached the final training step %d; stopping", cfg.train.steps)
                    break
                continue
            if ec.timeout_s is not None and time.monotonic() - last_new > ec.timeout_s:
                log.info("no new checkpoint for %.0f s; stopping", ec.timeout_s)
                break
            stop.wait(ec.poll_interval_s)
        return 0
    finally:
        restore()


def _log_summary(m: dict) -> None:
    coco = (m.get("coco") or {}).get("AP")
    oi = (m.get("openimages") or {}).get("mAP")
    log.info("step %s: COCO AP %s, Open Images mAP@0.5 %s (%d images)", m.get("step"),
             "n/a" if coco is None else f"{coco:.4f}", "n/a" if oi is None else f"{oi:.4f}", m.get("num_images", 0))
    print(f"step {m.get('step')}: coco_AP={coco} openimages_mAP={oi} images={m.get('num_images')}", flush=True)


def _install_stop_handlers(stop: threading.Event):  # noqa: ANN202
    """SIGTERM/SIGINT set ``stop`` (main thread only); returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {}

    def handler(signum, frame):  # noqa: ANN001, ARG001
        log.warning("received signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore
