"""``oiod evaluate``: COCO mAP and the Open Images metric for a checkpoint.

For each checkpoint the evaluator runs the same inference graph the export
serves (:class:`~openimages_od.training.detector.DetectorModule`) over the
committed shards of ``evaluate.split`` and writes:

* ``{output}/eval/metrics-{step}.json``: overall and per-class figures;
* ``{output}/eval/analysis-{step}.json`` and ``outcomes-{step}.csv``: the
  error analysis (:mod:`.analysis`);
* TensorBoard scalars and a few images (ground truth green, detections red)
  under ``{model_dir}/eval``.

:class:`Scorer` holds the metric code; ``--predictions FILE``
(:func:`evaluate_predictions`) feeds it a predictions file instead of a model,
so external detectors are scored exactly like ours.

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
from typing import Any

import numpy as np

from openimages_od.config import Config, save_resolved
from openimages_od.errors import ConfigError, DataError
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import Storage

__all__ = ["Evaluator", "parse_ground_truth", "run_evaluate"]

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
    positive: set[int] | None
    negative: set[int] | None
    image_id: str = ""
    encoded: bytes = field(default=b"", repr=False)
    source_id: int | None = None


def parse_ground_truth(serialized: bytes) -> GroundTruth:
    """Ground truth of one serialized tf.Example with the shard contract's keys (no TensorFlow needed).

    ``group_of`` is True only where ``image/object/group_of`` (or, without it,
    ``is_crowd``) is 1: the shards write -1 for "unknown". Image-level labels
    with confidence >= 0.5 are verified present, the others verified absent; an
    image without them has ``positive``/``negative`` None (scored on its box
    classes only).
    """
    from openimages_od.pipeline.example import decode_example
    from openimages_od.training.oid_metric import as_group_of

    f = decode_example(serialized)

    def floats(k: str) -> np.ndarray:
        return np.asarray(f.get(k, ()), dtype=np.float64)

    w = int(f["image/width"][0])
    h = int(f["image/height"][0])
    ymin, xmin, ymax, xmax = (floats(f"image/object/bbox/{k}") for k in ("ymin", "xmin", "ymax", "xmax"))
    boxes = np.stack([ymin * h, xmin * w, ymax * h, xmax * w], axis=1) if len(ymin) else np.zeros((0, 4))
    labels = np.asarray(f.get("image/object/class/label", ()), dtype=np.int64)
    raw_group = f.get("image/object/group_of") or f.get("image/object/is_crowd") or [0] * len(labels)
    positive = negative = None
    if "image/class/label" in f:
        image_labels = list(f["image/class/label"])
        conf = list(f.get("image/class/confidence", ())) or [1.0] * len(image_labels)
        positive = {int(c) for c, s in zip(image_labels, conf) if s >= 0.5}
        negative = {int(c) for c, s in zip(image_labels, conf) if s < 0.5}
    name = bytes(f["image/filename"][0]).decode() if "image/filename" in f else ""
    sid = bytes(f["image/source_id"][0]).decode() if "image/source_id" in f else ""
    return GroundTruth(
        w,
        h,
        boxes,
        labels,
        as_group_of(raw_group),
        positive,
        negative,
        name,
        bytes(f["image/encoded"][0]),
        int(sid) if sid.isdigit() else None,
    )


def iter_batches(files: list[str], batch_size: int, max_images: int | None = None) -> Any:
    """Serialized examples of ``files`` in order, in lists of ``batch_size`` (TFRecord framing checked).

    The same order and the same ``max_images`` cut for ``evaluate`` and
    ``predict``, so both see the same images.
    """
    import mmap

    from openimages_od.pipeline.tfrecord import iter_records

    batch: list[bytes] = []
    n = 0
    for path in files:
        if max_images is not None and n >= max_images:
            break
        with open(path, "rb") as fh:
            if Path(path).stat().st_size == 0:
                continue
            # Memory-mapped, so a large shard is not read into memory at once.
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for rec in iter_records(data, source=path):  # type: ignore[arg-type]
                    if max_images is not None and n >= max_images:
                        break
                    batch.append(rec)
                    n += 1
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
    if batch:
        yield batch


class Scorer:
    """The metric code shared by ``oiod evaluate`` and ``oiod evaluate --predictions``.

    Every image goes to the Open Images metric, COCO and the error analysis
    with the same pixel boxes, so the two commands give the same figures for
    the same detections.

    Args:
        cfg: the project config (``evaluate`` section).
        label_map: the classes.
        hierarchy: class relations for the Open Images metric, or None.
    """

    def __init__(self, cfg: Config, label_map: LabelMap, hierarchy: Any = None) -> None:
        from openimages_od.training.analysis import ErrorAnalysis
        from openimages_od.training.coco_metric import CocoAccumulator
        from openimages_od.training.oid_metric import OpenImagesMetric

        ec = cfg.evaluate
        self.ec = ec
        self.hierarchy = hierarchy
        names = {c.id: c.name for c in label_map}
        ids = [c.id for c in label_map]
        self.oid = OpenImagesMetric(
            ids, hierarchy, ec.iou_threshold, names, group_of_weight=ec.group_of_weight
        )
        self.coco = CocoAccumulator(ids, names)
        self.analysis = ErrorAnalysis(
            ids, names, ec.iou_threshold, ec.analysis_min_score, worst_per_class=ec.analysis_worst_images
        )
        self.num_images = 0

    def add(self, g: GroundTruth, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """One image's detections: pixel boxes ``[ymin, xmin, ymax, xmax]``, scores, label-map ids."""
        from openimages_od.training.oid_metric import ImageDetections, ImageGroundTruth

        self.oid.add_image(
            ImageGroundTruth(g.boxes, g.labels, g.group_of, g.positive, g.negative),
            ImageDetections(boxes, scores, labels),
        )
        self.coco.add_image(g.width, g.height, g.boxes, g.labels, g.group_of, boxes, scores, labels)
        self.analysis.add(
            g.image_id, g.width, g.height, g.boxes, g.labels, g.group_of, boxes, scores, labels, g.encoded
        )
        self.num_images += 1

    def metrics(self) -> dict[str, Any]:
        """``{"coco": ..., "openimages": ...}`` for the sections in ``evaluate.metrics``."""
        out: dict[str, Any] = {}
        if "coco" in self.ec.metrics:
            out["coco"] = self.coco.result()
        if "openimages" in self.ec.metrics:
            r = self.oid.result()
            out["openimages"] = {
                "mAP": r["mAP"],
                "iou_threshold": r["iou_threshold"],
                "group_of_weight": r["group_of_weight"],
                "hierarchy": self.hierarchy is not None,
                "num_classes_scored": r["num_classes_scored"],
                "per_class": {str(cid): v for cid, v in r["per_class"].items()},
            }
        return out

    def write_analysis(self, storage: Storage, eval_url: str, suffix: str) -> None:
        """``analysis{suffix}.json`` (counts, confusion, worst images) and ``outcomes{suffix}.csv``."""
        from openimages_od.config import join_url

        storage.write_json(join_url(eval_url, f"analysis{suffix}.json"), self.analysis.result())
        storage.write_text(join_url(eval_url, f"outcomes{suffix}.csv"), self.analysis.outcomes_csv())


class Evaluator:
    """Holds the model and the evaluation data; evaluates one checkpoint at a time.

    Args:
        cfg: the project config.
        storage: storage layer.
        stop: when set, the evaluation in progress is abandoned.
    """

    def __init__(self, cfg: Config, storage: Storage, stop: threading.Event | None = None) -> None:
        from openimages_od.dataset import dataset_shards, dataset_summary
        from openimages_od.training.inputs import (
            default_cache_dir,
            load_hierarchy,
            load_label_map,
            stage_shards,
        )
        from openimages_od.training.oid_metric import hierarchy_from_json

        self.cfg = cfg
        self.storage = storage
        self.stop = stop or threading.Event()
        self.label_map: LabelMap = load_label_map(cfg, storage)
        urls, dataset = dataset_shards(cfg, storage, cfg.evaluate.split)
        self.dataset = dataset_summary(
            dataset
        )  # which dataset these metrics score (named in every metrics file)
        self.files = stage_shards(urls, storage, default_cache_dir(cfg) / "shards")
        tree = load_hierarchy(cfg, storage)
        self.hierarchy = (
            hierarchy_from_json(tree, {c.mid: c.id for c in self.label_map}) if tree is not None else None
        )
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
            self._module = build_eval_module(self.cfg, len(self.label_map))
        return self._module

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Abandoned()

    def evaluate(self, checkpoint: str, step: int | None) -> dict:
        """Evaluate one local checkpoint prefix; write metrics JSON and summaries; return the metrics."""
        import tensorflow as tf

        from openimages_od.training.detector import restore_model

        module = self._build()
        restore_model(module.model, checkpoint)
        if step is None:
            step = _read_global_step(checkpoint)
        ec = self.cfg.evaluate
        scorer = Scorer(self.cfg, self.label_map, self.hierarchy)
        vis: list[tuple[GroundTruth, np.ndarray, np.ndarray, np.ndarray]] = []
        t0 = time.monotonic()
        for batch in iter_batches(self.files, ec.batch_size, ec.max_images):
            self._check_stop()
            gts = [parse_ground_truth(s) for s in batch]
            out = module.detect_bytes(tf.constant([g.encoded for g in gts]))
            out = {k: v.numpy() for k, v in out.items()}
            for i, g in enumerate(gts):
                k = int(out["num_detections"][i])
                boxes = out["detection_boxes"][i, :k] * np.array([g.height, g.width, g.height, g.width])
                scores = out["detection_scores"][i, :k]
                labels = out["detection_classes"][i, :k]
                scorer.add(g, boxes, scores, labels)
                if len(vis) < ec.num_images_to_log:
                    vis.append((g, out["detection_boxes"][i, :k], scores, labels))
        if scorer.num_images == 0:
            raise DataError(f"no images in the {ec.split!r} shards")
        self._check_stop()
        metrics: dict[str, Any] = {
            "step": step,
            "checkpoint": checkpoint,
            "split": ec.split,
            "num_images": scorer.num_images,
            "eval_seconds": round(time.monotonic() - t0, 3),
            "dataset": self.dataset,
            **scorer.metrics(),
        }
        self._write(metrics, step or 0, vis)
        scorer.write_analysis(self.storage, self.cfg.output_path("eval"), f"-{step or 0}")
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


def build_eval_module(cfg: Config, num_labels: int) -> Any:
    """The inference module evaluation uses (score threshold ``evaluate.min_score`` or 0.05, 100 detections).

    ``oiod predict --checkpoint`` builds the same one, so its predictions are
    exactly the detections ``oiod evaluate`` scores.
    """
    from openimages_od.training.detector import DetectorModule, build_model
    from openimages_od.training.experiment import build_experiment

    params = build_experiment(
        cfg,
        num_classes=num_labels + 1,
        mixed_precision="float32",
        score_threshold=cfg.evaluate.min_score or 0.05,
        max_detections=100,
    )
    return DetectorModule(build_model(params, cfg.train.input_size), cfg.train.input_size)


def _draw(g: GroundTruth, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Any:
    import tensorflow as tf

    image = tf.image.convert_image_dtype(
        tf.io.decode_image(g.encoded, channels=3, expand_animations=False), tf.float32
    )
    norm = np.array([g.height, g.width, g.height, g.width], dtype=np.float32)
    gt = (g.boxes / norm).astype(np.float32) if len(g.boxes) else np.zeros((0, 4), np.float32)
    if len(gt):
        image = tf.image.draw_bounding_boxes(image[None], gt[None], np.array([[0.0, 1.0, 0.0, 1.0]]))[0]
    pred = boxes[scores >= VIS_SCORE].astype(np.float32)
    if len(pred):
        image = tf.image.draw_bounding_boxes(image[None], pred[None], np.array([[1.0, 0.0, 0.0, 1.0]]))[0]
    return image


def _read_global_step(checkpoint: str) -> int | None:
    import tensorflow as tf

    try:
        for name, _ in tf.train.list_variables(checkpoint):
            if name.startswith("global_step"):
                return int(tf.train.load_variable(checkpoint, name))
    except (tf.errors.OpError, ValueError):
        pass
    return None


def evaluate_predictions(cfg: Config, predictions: str, fmt: str = "auto", out: str | None = None) -> dict:
    """Score a predictions file against the ground truth of ``evaluate.split`` with the metric code of
    ``oiod evaluate`` (no model, no TensorFlow).

    The ground truth is read from the committed shards of the split (the planned
    images as prepared, in the same order and with the same ``evaluate.max_images``
    cut as ``oiod evaluate``). Predictions are matched by ImageID (challenge CSV) or
    by ``source_id`` (COCO JSON); images without predictions count as detecting
    nothing; predictions for other images or classes are counted and ignored.

    Args:
        cfg: the project config.
        predictions: URL of a challenge CSV or COCO results JSON.
        fmt: ``auto``, ``csv`` or ``coco``.
        out: folder for ``metrics.json``, ``analysis.json`` and ``outcomes.csv``
            (default ``{output}/eval/external/{file name}``).

    Returns:
        The metrics document (also written as ``metrics.json``).

    Raises:
        DataError: unreadable or malformed file, no shards, no label map.
    """
    from openimages_od.config import join_url
    from openimages_od.training.inputs import default_cache_dir, load_hierarchy, load_label_map, stage_shards
    from openimages_od.training.oid_metric import hierarchy_from_json
    from openimages_od.training.predictions import read_predictions

    storage = Storage.from_config(cfg)
    ec = cfg.evaluate
    label_map = load_label_map(cfg, storage)
    tree = load_hierarchy(cfg, storage)
    hierarchy = hierarchy_from_json(tree, {c.mid: c.id for c in label_map}) if tree is not None else None
    from openimages_od.dataset import dataset_shards, dataset_summary

    urls, dataset = dataset_shards(cfg, storage, ec.split)
    files = stage_shards(urls, storage, default_cache_dir(cfg) / "shards")
    try:
        text = storage.read_text(predictions)
    except FileNotFoundError:
        raise DataError(f"predictions file not found: {predictions}") from None
    gts = [
        parse_ground_truth(s) for batch in iter_batches(files, ec.batch_size, ec.max_images) for s in batch
    ]
    if not gts:
        raise DataError(f"no images in the {ec.split!r} shards")
    dims = {g.image_id: (g.width, g.height, g.source_id) for g in gts}
    preds = read_predictions(text, predictions, label_map, dims, fmt)
    scorer = Scorer(cfg, label_map, hierarchy)
    t0 = time.monotonic()
    for g in gts:
        boxes, scores, labels = preds.get(g.image_id)
        scorer.add(g, boxes, scores, labels)
    dest = out or cfg.output_path("eval", "external", predictions.rstrip("/").rsplit("/", 1)[-1])
    metrics: dict[str, Any] = {
        "predictions": predictions,
        "format": preds.format,
        "split": ec.split,
        "num_images": scorer.num_images,
        "num_predictions": preds.num_read,
        "images_with_predictions": len(preds.by_image),
        "ignored": {"unknown_images": preds.unknown_images, "unknown_labels": preds.unknown_labels},
        "eval_seconds": round(time.monotonic() - t0, 3),
        "dataset": dataset_summary(dataset),
        **scorer.metrics(),
    }
    if preds.unknown_images or preds.unknown_labels:
        log.warning(
            "%s: ignored %d predictions for images outside the %r split and %d of classes outside the "
            "label map",
            predictions,
            preds.unknown_images,
            ec.split,
            preds.unknown_labels,
        )
    storage.write_json(join_url(dest, "metrics.json"), metrics)
    scorer.write_analysis(storage, dest, "")
    return metrics


def run_evaluate(
    cfg: Config,
    continuous: bool = False,
    checkpoint: str | None = None,
    predictions: str | None = None,
    predictions_format: str = "auto",
) -> int:
    """Evaluate the latest (or given) checkpoint, or keep evaluating new ones with ``continuous``,
    or score a predictions file.

    Args:
        cfg: the project config.
        continuous: watch ``model_dir`` for new checkpoints.
        checkpoint: evaluate this checkpoint (prefix or folder, local or ``s3://``) once.
        predictions: score this challenge CSV / COCO JSON instead of running a model.
        predictions_format: ``auto``, ``csv`` or ``coco``.

    Returns:
        0 (also when stopped by SIGTERM).

    Raises:
        DataError: no shards for ``evaluate.split``, no label map, or (not continuous) no checkpoint.
    """
    from openimages_od.training.checkpoints import (
        checkpoint_step,
        fetch_checkpoint,
        latest_checkpoint_url,
        resolve_checkpoint,
    )

    if predictions:
        if continuous or checkpoint:
            raise ConfigError(
                "--predictions scores a file: it cannot be combined with --continuous or --checkpoint"
            )
        m = evaluate_predictions(cfg, predictions, predictions_format)
        _log_summary(m)
        return 0
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
        last_step: int | None = None
        last_url: str | None = None
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
    log.info(
        "%s: COCO AP %s, Open Images mAP@0.5 %s (%d images)",
        m.get("predictions") or f"step {m.get('step')}",
        "n/a" if coco is None else f"{coco:.4f}",
        "n/a" if oi is None else f"{oi:.4f}",
        m.get("num_images", 0),
    )
    what = f"predictions {m['predictions']}" if "predictions" in m else f"step {m.get('step')}"
    print(f"{what}: coco_AP={coco} openimages_mAP={oi} images={m.get('num_images')}", flush=True)


def _install_stop_handlers(stop: threading.Event):
    """SIGTERM/SIGINT set ``stop`` (main thread only); returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {}

    def handler(signum, frame):
        log.warning("received signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore
