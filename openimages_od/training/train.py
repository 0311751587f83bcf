"""``oiod train``: a TF Model Garden RetinaNet trained from the committed shards.

Model Garden's Orbit trainer (``official.core.train_lib.run_experiment``)
writes checkpoints and TensorBoard summaries to ``model_dir``; a restarted job
restores the latest checkpoint and continues the step count. When
``model_dir`` is remote (``s3://``) the job trains in a local folder that is
pulled at start and pushed after every checkpoint (see :mod:`.sync`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from openimages_od.config import Config, save_resolved
from openimages_od.storage import Storage

__all__ = ["run_train", "prepare_model_dir"]

log = logging.getLogger(__name__)


def prepare_model_dir(cfg: Config, storage: Storage, *, pull: bool = True) -> tuple[str, Optional[Any]]:
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


def run_train(cfg: Config) -> int:
    """Train (or resume training) the detector described by ``cfg.train``.

    Args:
        cfg: the project config; the label map and shards come from ``output.url``.

    Returns:
        0 on success.

    Raises:
        DataError: no label map or no committed shards for ``train.split``.
    """
    from openimages_od.training.inputs import committed_shards, default_cache_dir, load_label_map, stage_shards

    storage = Storage.from_config(cfg)
    label_map = load_label_map(cfg, storage)
    shard_urls = committed_shards(cfg, cfg.train.split, storage)
    files = stage_shards(shard_urls, storage, default_cache_dir(cfg) / "shards")

    import tensorflow as tf  # noqa: F401  (heavy import after the cheap checks)
    import orbit
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

    params = build_experiment(cfg, num_classes=len(label_map) + 1, train_files=files)
    if params.runtime.mixed_precision_dtype not in (None, "float32"):
        performance.set_mixed_precision_policy(params.runtime.mixed_precision_dtype)
    if chief:
        save_resolved(cfg, cfg.model_dir, storage)
        storage.write_text(
            cfg.model_dir.rstrip("/") + "/params.yaml",
            yaml.safe_dump(params.as_dict(), sort_keys=False, default_flow_style=False),
        )
        storage.write_text(cfg.model_dir.rstrip("/") + "/label_map.pbtxt", label_map.to_pbtxt())

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
    log.info("training %s for %d steps (batch %d, %s, %d replicas) into %s",
             cfg.train.backbone, cfg.train.steps, cfg.train.batch_size,
             params.runtime.mixed_precision_dtype, strategy.num_replicas_in_sync, cfg.model_dir)
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
