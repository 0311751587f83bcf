"""``oiod predict``: batch inference over a split or a list of images, locally or on Ray actors.

The model is either an export (``--model URL``: the SavedModel ``oiod
export`` wrote, with the NMS settings baked in at export) or a training
checkpoint (``--checkpoint P``, default the latest in ``model_dir``), built
exactly as ``oiod evaluate`` builds it, so predicting a split and scoring the
file with ``oiod evaluate --predictions`` reproduces ``oiod evaluate``.

Inputs: the committed shards of a split (``--split``, default
``evaluate.split``; the same images in the same order, and the same
``evaluate.max_images`` cut, as ``oiod evaluate``), or images given as local
paths or URLs (``--images``, or ``--image-list FILE`` with one per line); a
listed image's ImageID is its file name without the extension.

Outputs, under ``--out`` (default ``{output}/predictions/{split or "images"}``):
``predictions.csv`` (the Open Images challenge format) and
``predictions.coco.json`` (COCO results), see :mod:`.predictions`, and
``predict.json`` (what was run). Both files are written whole and atomically.

With ``--ray``, each of ``ray.num_actors`` actors loads the model once and
takes whole shards (or chunks of listed images); the driver writes the files
in input order, so the output does not depend on the worker count.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from openimages_od.config import Config, RayConfig, join_url, save_resolved
from openimages_od.errors import ConfigError, DataError
from openimages_od.openimages.ids import source_id as stable_source_id
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import Storage
from openimages_od.storage_setup import storage_from_config
from openimages_od.training.predictions import ImagePrediction, challenge_csv, coco_json

if TYPE_CHECKING:
    from openimages_od.serving.model import ExportedModel

__all__ = ["Chunk", "Predictor", "predict_actor_count", "run_predict"]

log = logging.getLogger(__name__)

IMAGES_PER_CHUNK = 64


@dataclass
class Chunk:
    """A unit of work: one shard file (URL) or a list of image URLs."""

    index: int
    shard: str | None = None
    images: list[str] | None = None


class Predictor:
    """A loaded model that turns chunks into :class:`ImagePrediction` lists.

    Args:
        cfg: the project config.
        model: an exported model URL, or None to use ``checkpoint``.
        checkpoint: a checkpoint prefix/folder (None = the latest in ``model_dir``).
    """

    def __init__(self, cfg: Config, model: str | None = None, checkpoint: str | None = None) -> None:
        self.cfg = cfg
        self.storage = storage_from_config(cfg)
        self.batch_size = cfg.evaluate.batch_size
        # Exactly one of the two is set: an exported SavedModel, or a restored training module.
        self._exported: ExportedModel | None = None
        self._module: Any = None
        if model:
            from openimages_od.serving.model import ExportedModel

            self._exported = ExportedModel.load(model, self.storage, warmup=False)
            self.labels = self._exported.labels
            self.describe = {"model": model, **self._exported.describe()}
        else:
            from openimages_od.training.checkpoints import resolve_checkpoint
            from openimages_od.training.detector import restore_model
            from openimages_od.training.evaluator import build_eval_module
            from openimages_od.training.inputs import load_label_map

            self.labels = load_label_map(cfg, self.storage)
            ckpt, step = resolve_checkpoint(cfg, self.storage, checkpoint)
            self._module = build_eval_module(cfg, len(self.labels))
            restore_model(self._module.model, ckpt)
            self.describe = {"checkpoint": ckpt, "step": step}

    def _detect(self, encoded: list[bytes]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self._exported is not None:
            return [
                (r.boxes[: r.num], r.scores[: r.num], r.classes[: r.num])
                for r in self._exported.predict(encoded)
            ]
        import tensorflow as tf

        out = {k: v.numpy() for k, v in self._module.detect_bytes(tf.constant(encoded)).items()}
        res = []
        for i in range(len(encoded)):
            k = int(out["num_detections"][i])
            res.append(
                (
                    out["detection_boxes"][i, :k],
                    out["detection_scores"][i, :k],
                    out["detection_classes"][i, :k],
                )
            )
        return res

    def run(self, chunk: Chunk, max_images: int | None = None) -> list[ImagePrediction]:
        """Predictions for one chunk (at most ``max_images`` images)."""
        out: list[ImagePrediction] = []
        for batch in self._batches(chunk, max_images):
            dets = self._detect([b[4] for b in batch])
            for (iid, sid, w, h, _), (boxes, scores, classes) in zip(batch, dets):
                out.append(
                    ImagePrediction(
                        iid, sid, w, h, np.asarray(boxes), np.asarray(scores), np.asarray(classes, np.int64)
                    )
                )
        return out

    def _batches(
        self, chunk: Chunk, max_images: int | None
    ) -> Iterator[list[tuple[str, int, int, int, bytes]]]:
        if chunk.shard is not None:
            from openimages_od.training.inputs import default_cache_dir, stage_shards
            from openimages_od.training.scoring import iter_batches, parse_ground_truth

            files = stage_shards([chunk.shard], self.storage, default_cache_dir(self.cfg) / "shards")
            for batch in iter_batches(files, self.batch_size, max_images):
                gts = [parse_ground_truth(s) for s in batch]
                yield [
                    (
                        g.image_id,
                        g.source_id if g.source_id is not None else stable_source_id(g.image_id),
                        g.width,
                        g.height,
                        g.encoded,
                    )
                    for g in gts
                ]
            return
        rows: list[tuple[str, int, int, int, bytes]] = []
        for url in (chunk.images or [])[: max_images if max_images is not None else None]:
            data = self.storage.read_bytes(url)
            w, h = _image_size(data, url)
            iid = url.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
            rows.append((iid, stable_source_id(iid), w, h, data))
            if len(rows) == self.batch_size:
                yield rows
                rows = []
        if rows:
            yield rows


def _image_size(data: bytes, url: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{url}: not a readable image ({exc})") from None


def _chunks(cfg: Config, storage: Storage, split: str | None, images: Sequence[str]) -> list[Chunk]:
    if images:
        return [
            Chunk(i, images=list(images[s : s + IMAGES_PER_CHUNK]))
            for i, s in enumerate(range(0, len(images), IMAGES_PER_CHUNK))
        ]
    from openimages_od.training.inputs import committed_shards

    return [
        Chunk(i, shard=u) for i, u in enumerate(committed_shards(cfg, split or cfg.evaluate.split, storage))
    ]


def _run_local(
    cfg: Config,
    chunks: list[Chunk],
    model: str | None,
    checkpoint: str | None,
    max_images: int | None,
) -> tuple[list[ImagePrediction], dict]:
    pred = Predictor(cfg, model, checkpoint)
    out: list[ImagePrediction] = []
    for c in chunks:
        left = None if max_images is None else max_images - len(out)
        if left is not None and left <= 0:
            break
        out.extend(pred.run(c, left))
    return out, pred.describe


def _run_ray(
    cfg: Config,
    chunks: list[Chunk],
    model: str | None,
    checkpoint: str | None,
    max_images: int | None,
) -> tuple[list[ImagePrediction], dict]:
    from openimages_od.pipeline.distribute import _connect, _ray

    ray = _ray()
    started = _connect(cfg)
    try:
        cfg_data = cfg.model_dump(mode="json")

        class PredictActor:  # pragma: no cover - runs in Ray workers (covered by the integration test)
            def __init__(self) -> None:
                self.p = Predictor(Config.model_validate(cfg_data), model, checkpoint)

            def run(self, chunk: Chunk, limit: int | None) -> tuple[list[ImagePrediction], dict]:
                return self.p.run(chunk, limit), self.p.describe

        # ray.remote called, not used as a decorator: the actor class it returns is not PredictActor.
        actor_cls = ray.remote(num_cpus=cfg.ray.num_cpus_per_actor, max_restarts=1, max_task_retries=2)(
            PredictActor
        )
        n = predict_actor_count(cfg.ray, ray.nodes(), len(chunks))
        actors = [actor_cls.remote() for _ in range(n)]
        refs = [actors[i % len(actors)].run.remote(c, max_images) for i, c in enumerate(chunks)]
        results = ray.get(refs)  # in chunk order, whatever finished first
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    out: list[ImagePrediction] = []
    for preds, _ in results:
        out.extend(preds)
    if max_images is not None:
        out = out[:max_images]  # the same cut as the local run and `oiod evaluate`
    return out, {**(results[0][1] if results else {}), "workers": n}


def predict_actor_count(rc: RayConfig, nodes: list[dict[str, Any]], num_chunks: int) -> int:
    """How many prediction actors to start: ``ray.num_actors`` if set, else what the alive nodes hold.

    A node holds ``ray.actors_per_node`` actors, or as many as its CPUs allow at
    ``ray.num_cpus_per_actor`` each (the rule prepare sizes its download actors by); never more
    actors than chunks, never fewer than one.

    Args:
        rc: the ``ray`` config section.
        nodes: ``ray.nodes()`` (dicts with ``Alive`` and ``Resources``).
        num_chunks: the units of work.
    """
    if rc.num_actors:
        n = rc.num_actors
    else:
        n = 0
        for node in nodes:
            if not node.get("Alive"):
                continue
            fit = int(float(node.get("Resources", {}).get("CPU", 0)) / rc.num_cpus_per_actor + 1e-9)
            n += min(fit, rc.actors_per_node) if rc.actors_per_node else fit
    return max(1, min(n, num_chunks))


def run_predict(
    cfg: Config,
    model: str | None = None,
    checkpoint: str | None = None,
    split: str | None = None,
    images: Sequence[str] | None = None,
    image_list: str | None = None,
    out: str | None = None,
    ray: bool = False,
) -> int:
    """Predict a split or a list of images; write the challenge CSV and COCO JSON.

    Args:
        cfg: the project config.
        model: exported model URL (default: a checkpoint).
        checkpoint: checkpoint prefix or folder (default: the latest in ``model_dir``).
        split: the split to predict (default ``evaluate.split``); ignored with ``images``.
        images: image paths or URLs.
        image_list: a file (URL) listing images, one a line.
        out: output folder URL (default ``{output}/predictions/{split}``).
        ray: run on ``ray.num_actors`` Ray actors instead of in this process.

    Returns:
        0 on success.

    Raises:
        ConfigError: both a model and a checkpoint, or both a split and images.
        DataError: no shards, an unreadable image, no checkpoint or model.
    """
    storage = storage_from_config(cfg)
    if model and checkpoint:
        raise ConfigError("give --model (an export) or --checkpoint, not both")
    listed = list(images or [])
    if image_list:
        listed += [
            ln.strip()
            for ln in storage.read_text(image_list).splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
    if listed and split:
        raise ConfigError("give --split or --images/--image-list, not both")
    name = "images" if listed else (split or cfg.evaluate.split)
    dest = out or cfg.output_path("predictions", name)
    chunks = _chunks(cfg, storage, split, listed)
    max_images = None if listed else cfg.evaluate.max_images
    t0 = time.monotonic()
    runner = _run_ray if ray else _run_local
    preds, described = runner(cfg, chunks, model, checkpoint, max_images)
    labels = _labels(cfg, storage, model)
    storage.write_text(join_url(dest, "predictions.csv"), challenge_csv(preds, labels))
    storage.write_text(join_url(dest, "predictions.coco.json"), coco_json(preds, labels))
    n_det = int(sum(len(p.scores) for p in preds))
    info = {
        "source": "images" if listed else {"split": name},
        "num_images": len(preds),
        "num_detections": n_det,
        "seconds": round(time.monotonic() - t0, 3),
        "workers": 1,  # _run_ray's description says how many actors ran
        **described,
    }
    storage.write_json(join_url(dest, "predict.json"), info)
    save_resolved(cfg, dest, storage)
    log.info("predicted %d images (%d detections) in %.1f s -> %s", len(preds), n_det, info["seconds"], dest)
    print(join_url(dest, "predictions.csv"))
    print(join_url(dest, "predictions.coco.json"))
    return 0


def _labels(cfg: Config, storage: Storage, model: str | None) -> LabelMap:
    if model:
        return LabelMap.from_pbtxt(
            storage.read_text(join_url(model, "label_map.pbtxt")), join_url(model, "label_map.pbtxt")
        )
    from openimages_od.training.inputs import load_label_map

    return load_label_map(cfg, storage)
