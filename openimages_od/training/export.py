"""``oiod export``: SavedModel + ``label_map.pbtxt`` + ``model.json``.

Layout under ``export.dir`` (local or ``s3://``; a remote destination is
exported locally first, then uploaded file by file with ``saved_model.pb``
last so a reader never sees a half-uploaded model)::

    saved_model/            signatures serving_default (image_bytes) and serving_images (images)
    label_map.pbtxt
    model.json              classes, input_size, backbone, config_digest, step, signatures, dataset
    config.resolved.yaml

See :mod:`openimages_od.training.detector` for the signature contract.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from openimages_od.config import Config, join_url, save_resolved
from openimages_od.layout import Layout
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import Storage, local_path
from openimages_od.storage_setup import storage_from_config

__all__ = ["export_saved_model", "model_json", "run_export", "trained_on"]

log = logging.getLogger(__name__)


def model_json(
    label_map: LabelMap,
    *,
    input_size: int,
    backbone: str,
    config_digest: str,
    step: int | None,
    dataset: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``model.json`` document that describes an export.

    ``dataset`` is :func:`openimages_od.dataset.dataset_summary` of the lockfile the model was
    trained on (``{model_dir}/dataset.json``): its ``digest`` answers "what exactly did this model see?".
    """
    from openimages_od.training.detector import SIGNATURES

    return {
        "classes": label_map.to_json(),
        "input_size": input_size,
        "backbone": backbone,
        "config_digest": config_digest,
        "step": step,
        "signatures": SIGNATURES,
        "dataset": dataset,
    }


def trained_on(cfg: Config, storage: Storage) -> dict[str, Any] | None:
    """The dataset summary of ``{model_dir}/dataset.json`` (None for a model trained before lockfiles)."""
    from openimages_od.dataset import dataset_summary

    try:
        return dataset_summary(storage.read_json(Layout.from_config(cfg).model_dataset))
    except (FileNotFoundError, ValueError):
        return None


def export_saved_model(
    cfg: Config,
    label_map: LabelMap,
    dest_dir: str | Path,
    checkpoint: str | None = None,
    step: int | None = None,
    dataset: dict[str, Any] | None = None,
) -> Path:
    """Write ``saved_model/``, ``label_map.pbtxt`` and ``model.json`` to a local folder.

    Usable from tests with a tiny untrained model: with ``checkpoint=None`` the
    weights are freshly initialised (the signatures are the same).

    Args:
        cfg: config (``train`` decides the architecture, ``export`` the NMS settings).
        label_map: classes; the detector has ``label_map.num_classes`` outputs (highest id + 1).
        dest_dir: local folder (created).
        checkpoint: local checkpoint prefix to load, or None.
        step: training step recorded in ``model.json``.
        dataset: the dataset summary recorded in ``model.json``.

    Returns:
        ``dest_dir`` as a Path.
    """
    import json

    import tensorflow as tf

    from openimages_od.training.detector import DetectorModule, build_model, restore_model
    from openimages_od.training.experiment import build_experiment, config_digest

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    params = build_experiment(cfg, num_classes=label_map.num_classes, mixed_precision="float32")
    model = build_model(params, cfg.train.input_size)
    if checkpoint:
        restore_model(model, checkpoint)
    module = DetectorModule(model, cfg.train.input_size)
    sm_dir = dest / "saved_model"
    if sm_dir.exists():
        shutil.rmtree(sm_dir)
    tf.saved_model.save(module, str(sm_dir), signatures=module.signatures())
    (dest / "label_map.pbtxt").write_text(label_map.to_pbtxt())
    doc = model_json(
        label_map,
        input_size=cfg.train.input_size,
        backbone=cfg.train.backbone,
        config_digest=config_digest(cfg),
        step=step,
        dataset=dataset,
    )
    (dest / "model.json").write_text(json.dumps(doc, indent=2) + "\n")
    return dest


def _model_label_map(cfg: Config, storage: Storage) -> LabelMap | None:
    """The label map the model was trained with (``{model_dir}/label_map.pbtxt``): the output's may
    have been re-planned since, and a model's ids only mean what they meant when it was trained."""
    url = join_url(cfg.model_dir, "label_map.pbtxt")
    try:
        return LabelMap.from_pbtxt(storage.read_text(url), url)
    except FileNotFoundError:
        return None


def _upload_dir(storage: Storage, local: Path, url: str) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    # saved_model.pb and model.json last: their presence means the rest is there.
    last = {"saved_model.pb", "model.json"}
    for p in [f for f in files if f.name not in last] + [f for f in files if f.name in last]:
        storage.upload_file(p, join_url(url, p.relative_to(local).as_posix()))


def run_export(cfg: Config, checkpoint: str | None = None) -> int:
    """Export the latest (or the given) checkpoint to ``export.dir``.

    Args:
        cfg: the project config.
        checkpoint: a checkpoint prefix or folder (local or ``s3://``); default the latest in ``model_dir``.

    Returns:
        0 on success.

    Raises:
        DataError: no checkpoint or no label map.
    """
    from openimages_od.training.checkpoints import resolve_checkpoint
    from openimages_od.training.inputs import load_label_map

    storage = storage_from_config(cfg)
    label_map = _model_label_map(cfg, storage) or load_label_map(cfg, storage)
    ckpt, step = resolve_checkpoint(cfg, storage, checkpoint)
    dataset = trained_on(cfg, storage)
    t0 = time.monotonic()
    dest_url = cfg.export_dir
    lp = local_path(dest_url)
    if lp is not None:
        # Build beside the destination, then swap saved_model/ in one rename.
        lp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=lp))
        try:
            export_saved_model(cfg, label_map, staging, ckpt, step, dataset)
            old = lp / "saved_model"
            if old.exists():
                shutil.rmtree(old)
            for name in ("saved_model", "label_map.pbtxt", "model.json"):
                os.replace(staging / name, lp / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="oiod-export-") as tmp:
            export_saved_model(cfg, label_map, tmp, ckpt, step, dataset)
            _upload_dir(storage, Path(tmp), dest_url)
    save_resolved(cfg, dest_url, storage)
    log.info("exported step %s to %s in %.1f s", step, dest_url, time.monotonic() - t0)
    return 0
