"""``oiod evaluate``: COCO mAP and the Open Images metric for a checkpoint.

For each checkpoint the evaluator (:class:`~openimages_od.training.evaluator.Evaluator`) runs the
same inference graph the export serves (:class:`~openimages_od.training.detector.DetectorModule`)
over the committed shards of ``evaluate.split`` and writes:

* ``{output}/eval/metrics-{step}.json``: overall and per-class figures;
* ``{output}/eval/analysis-{step}.json`` and ``outcomes-{step}.csv``: the
  error analysis (:mod:`.analysis`);
* TensorBoard scalars and a few images (ground truth green, detections red)
  under ``{model_dir}/eval``.

:class:`~openimages_od.training.scoring.Scorer` holds the metric code; ``--predictions FILE``
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
from collections.abc import Callable
from types import FrameType
from typing import Any

from openimages_od.config import Config, save_resolved
from openimages_od.errors import ConfigError, DataError
from openimages_od.storage_setup import storage_from_config
from openimages_od.training.evaluator import Abandoned, Evaluator
from openimages_od.training.scoring import Scorer, iter_batches, parse_ground_truth

__all__ = ["Evaluator", "evaluate_predictions", "run_evaluate"]

log = logging.getLogger(__name__)


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

    storage = storage_from_config(cfg)
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
    storage = storage_from_config(cfg)
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    try:
        evaluator = Evaluator(cfg, storage, stop)
        save_resolved(cfg, cfg.output_path("eval"), storage)
        if checkpoint or not continuous:
            ckpt, step = resolve_checkpoint(cfg, storage, checkpoint)
            try:
                m = evaluator.evaluate(ckpt, step)
            except Abandoned:
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
                except Abandoned:
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


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop`` (main thread only); returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old: dict[int, Any] = {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.warning("received signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore
