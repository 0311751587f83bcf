"""Evaluating one training checkpoint with TensorFlow, for ``oiod evaluate``.

:class:`Evaluator` builds the inference module once (:func:`build_eval_module`, the graph the
export serves), restores each checkpoint into it, scores the committed shards of
``evaluate.split`` with :class:`~openimages_od.training.scoring.Scorer`, and writes
``eval/metrics-{step}.json``, the error analysis and TensorBoard scalars and images.
TensorFlow is imported inside the methods, so importing this module stays cheap.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from openimages_od.config import Config
from openimages_od.errors import DataError
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import Storage
from openimages_od.training.scoring import GroundTruth, Scorer, iter_batches, parse_ground_truth

__all__ = ["Abandoned", "Evaluator", "build_eval_module"]

VIS_SCORE = 0.3


class Abandoned(Exception):
    """The stop event fired during an evaluation (the evaluation in progress is dropped)."""


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
            raise Abandoned()

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
