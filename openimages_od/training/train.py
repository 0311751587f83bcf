"""``oiod train``: a TF Model Garden RetinaNet trained from the committed shards.

Model Garden's Orbit trainer (``official.core.train_lib.run_experiment``)
writes checkpoints and TensorBoard summaries to ``model_dir``; a restarted job
restores the latest checkpoint and continues the step count. When
``model_dir`` is remote (``s3://``) the job trains in a local folder that is
pulled at start and pushed after every checkpoint (see :mod:`.sync`).

What a model saw is on record: the shards read are exactly those of the
output's ``dataset.json`` (checked against the current plan and label map,
each shard's sha256 verified after staging), and a copy of that lockfile goes
to ``{model_dir}/dataset.json``. A ``model_dir`` whose checkpoints were trained
on another label map is refused (its class ids mean other classes) unless
``train.fine_tune`` is set: then its checkpoints move to
``{model_dir}/previous/{label map digest}/`` and the latest one initializes
the new model (the whole model when the class count is the same, else the
backbone).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from openimages_od.config import Config, join_url, save_resolved
from openimages_od.errors import DataError
from openimages_od.layout import Layout, text_digest
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import ObjectNotFound, Storage
from openimages_od.storage_setup import storage_from_config

__all__ = ["check_model_dir", "prepare_model_dir", "run_train"]

log = logging.getLogger(__name__)


def prepare_model_dir(cfg: Config, storage: Storage, *, pull: bool = True) -> tuple[str, Any | None]:
    """The local folder TF writes to, and a :class:`DirSync` when ``model_dir`` is remote.

    Args:
        cfg: config (``train.model_dir``, ``train.cache_dir``).
        storage: storage layer.
        pull: fetch the remote contents first (to resume).
    """
    from openimages_od.storage import local_path
    from openimages_od.training.sync import DirSync

    lp = local_path(cfg.model_dir)
    if lp is not None:
        lp.mkdir(parents=True, exist_ok=True)
        return str(lp), None
    base = Path(os.path.expanduser(cfg.train.cache_dir)).absolute() if cfg.train.cache_dir else None
    work = DirSync.local_work_dir(cfg.model_dir, base)
    work.mkdir(parents=True, exist_ok=True)
    syncer = DirSync(storage, work, cfg.model_dir, exclude=["eval"])
    if pull:
        syncer.pull()
    return str(work), syncer


def _model_dir_label_map(cfg: Config, storage: Storage) -> tuple[str, LabelMap | None] | None:
    """(digest, label map) the model_dir was trained on, or None when it names none."""
    try:
        text = storage.read_text(join_url(cfg.model_dir, "label_map.pbtxt"))
    except ObjectNotFound:
        return None
    try:
        return text_digest(text), LabelMap.from_pbtxt(text)
    except DataError:
        return text_digest(text), None


def check_model_dir(cfg: Config, storage: Storage, label_map: LabelMap) -> tuple[str, str] | None:
    """Refuse to resume a model_dir trained on another label map, or set it aside for fine-tuning.

    Returns:
        None to train (or resume) as configured, or ``(checkpoint URL, init modules)``
        when ``train.fine_tune`` moved an old model's checkpoints aside to start from them.

    Raises:
        DataError: the model_dir has checkpoints of another label map and ``train.fine_tune`` is off.
    """
    from openimages_od.training.checkpoints import latest_checkpoint_url

    seen = _model_dir_label_map(cfg, storage)
    current = text_digest(label_map.to_pbtxt())
    if seen is None or seen[0] == current:
        return None
    latest = latest_checkpoint_url(cfg.model_dir, storage)
    if latest is None:
        return None  # nothing trained yet: the new label map simply replaces the old one
    old_digest, old_map = seen
    if not cfg.train.fine_tune:
        raise DataError(
            f"{cfg.model_dir} holds a model trained on another label map (digest {old_digest[:12]}, "
            f"{len(old_map) if old_map else '?'} classes; now {current[:12]}, {len(label_map)} classes): resuming "
            f"it would give its class ids other meanings. Train into a new train.model_dir, or set "
            f"train.fine_tune=true to start from its latest checkpoint ({latest.rsplit('/', 1)[-1]})"
        )
    dest = join_url(cfg.model_dir, "previous", old_digest[:12])
    moved = 0
    for o in storage.list(cfg.model_dir.rstrip("/") + "/"):
        name = o.url.rsplit("/", 1)[-1]
        if o.url.rsplit("/", 1)[0].rstrip("/") != cfg.model_dir.rstrip("/"):
            continue  # only the top level: checkpoints, never earlier previous/ or eval/
        if name == "checkpoint" or name.startswith("ckpt-") or name in ("label_map.pbtxt", "dataset.json"):
            storage.write_bytes(join_url(dest, name), storage.read_bytes(o.url))
            moved += 1
    for o in storage.list(cfg.model_dir.rstrip("/") + "/"):
        name = o.url.rsplit("/", 1)[-1]
        if o.url.rsplit("/", 1)[0].rstrip("/") == cfg.model_dir.rstrip("/") and (
            name == "checkpoint" or name.startswith("ckpt-")
        ):
            storage.delete(o.url)
    _forget_local_checkpoints(cfg)
    same_head = old_map is not None and old_map.num_classes == label_map.num_classes
    modules = "all" if same_head else "backbone"
    log.warning(
        "fine-tuning: moved %d files of the model trained on label map %s to %s; starting from its "
        "latest checkpoint (%s)",
        moved,
        old_digest[:12],
        dest,
        modules,
    )
    return join_url(dest, latest.rsplit("/", 1)[-1]), modules


def _forget_local_checkpoints(cfg: Config) -> None:
    """A remote model_dir's local work folder must not bring the moved checkpoints back."""
    from openimages_od.storage import local_path
    from openimages_od.training.sync import DirSync

    if local_path(cfg.model_dir) is not None:
        return
    base = Path(os.path.expanduser(cfg.train.cache_dir)).absolute() if cfg.train.cache_dir else None
    work = DirSync.local_work_dir(cfg.model_dir, base)
    if work.is_dir():
        for p in work.iterdir():
            if p.is_file() and (p.name == "checkpoint" or p.name.startswith("ckpt-")):
                p.unlink()


def run_train(cfg: Config) -> int:
    """Train (or resume training) the detector described by ``cfg.train``.

    Args:
        cfg: the project config; the label map and shards come from ``output.url``.

    Returns:
        0 on success.

    Raises:
        DataError: no label map or no committed shards for ``train.split``.
    """
    from openimages_od.dataset import dataset_shards, verify_files
    from openimages_od.training.checkpoints import fetch_checkpoint
    from openimages_od.training.inputs import default_cache_dir, load_label_map, stage_shards

    storage = storage_from_config(cfg)
    label_map = load_label_map(cfg, storage)
    shard_urls, dataset = dataset_shards(cfg, storage, cfg.train.split)
    files = stage_shards(shard_urls, storage, default_cache_dir(cfg) / "shards")
    verify_files(files, dataset, cfg.train.split)
    init = check_model_dir(cfg, storage, label_map)
    if init is not None:
        ckpt = fetch_checkpoint(init[0], storage, default_cache_dir(cfg) / "checkpoints")
        cfg = cfg.model_copy(
            update={
                "train": cfg.train.model_copy(
                    update={"init_checkpoint": ckpt, "init_checkpoint_modules": init[1]}
                )
            }
        )

    import orbit
    import tensorflow as tf  # noqa: F401  (heavy import after the cheap checks)
    import yaml
    from official.core import task_factory, train_lib
    from official.modeling import performance

    from openimages_od.training import distribution
    from openimages_od.training.experiment import build_experiment

    strategy = distribution.build_strategy(cfg.train.distribution)
    conf = distribution.tf_config_from_env()
    chief = distribution.is_chief(conf)
    work_dir, syncer = prepare_model_dir(cfg, storage, pull=chief)
    if not chief:
        syncer = None

    params = build_experiment(cfg, num_classes=label_map.num_classes, train_files=files)
    if params.runtime.mixed_precision_dtype not in (None, "float32"):
        performance.set_mixed_precision_policy(params.runtime.mixed_precision_dtype)
    if chief:
        save_resolved(cfg, cfg.model_dir, storage)
        storage.write_text(
            cfg.model_dir.rstrip("/") + "/params.yaml",
            yaml.safe_dump(params.as_dict(), sort_keys=False, default_flow_style=False),
        )
        storage.write_text(cfg.model_dir.rstrip("/") + "/label_map.pbtxt", label_map.to_pbtxt())
        storage.write_json(Layout.from_config(cfg).model_dataset, dataset)

    class _Controller(orbit.Controller):
        # Push to remote model_dir right after each checkpoint is written.
        def _maybe_save_checkpoint(self, check_interval: bool = True) -> bool:
            saved = super()._maybe_save_checkpoint(check_interval)
            if saved and syncer is not None:
                syncer.push()
            return saved

    with strategy.scope():
        task = task_factory.get_task(params.task, logging_dir=work_dir)
    t0 = time.monotonic()
    log.info(
        "training %s for %d steps (batch %d, %s, %d replicas) into %s",
        cfg.train.backbone,
        cfg.train.steps,
        cfg.train.batch_size,
        params.runtime.mixed_precision_dtype,
        strategy.num_replicas_in_sync,
        cfg.model_dir,
    )
    train_lib.run_experiment(
        distribution_strategy=strategy,
        task=task,
        mode="train",
        params=params,
        model_dir=work_dir,
        save_summary=chief,
        controller_cls=_Controller,
    )
    if syncer is not None:
        syncer.push()
    log.info("training finished in %.1f s", time.monotonic() - t0)
    return 0
