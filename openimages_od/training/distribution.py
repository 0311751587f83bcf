"""Distribution strategy from the config and the environment.

* one device (CPU or a single GPU): the default strategy;
* several local GPUs: ``MirroredStrategy``;
* several nodes: ``MultiWorkerMirroredStrategy`` configured by ``TF_CONFIG``.
  On an indexed Kubernetes Job, ``TF_CONFIG`` is derived from the
  environment when absent: ``JOB_COMPLETION_INDEX`` (this worker's index),
  ``OIOD_NUM_WORKERS``, ``OIOD_WORKER_SERVICE`` (the headless service DNS
  name), ``OIOD_WORKER_PORT`` and ``OIOD_JOB_NAME`` (or the pod hostname,
  ``{job}-{index}-{suffix}``): worker ``i`` is ``{job}-{i}.{service}:{port}``.

:func:`tf_config_from_env` is pure (no TensorFlow import) so it is unit-tested.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from openimages_od.errors import ConfigError

__all__ = ["build_strategy", "ensure_tf_config", "is_chief", "tf_config_from_env"]

log = logging.getLogger(__name__)


def tf_config_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The multi-worker cluster description, or None for single-node training.

    ``TF_CONFIG`` wins when set. Otherwise an indexed Kubernetes Job is
    recognised by ``JOB_COMPLETION_INDEX`` + ``OIOD_NUM_WORKERS`` > 1.

    Raises:
        ConfigError: ``TF_CONFIG`` is not valid JSON, or the Job variables are inconsistent.
    """
    env = os.environ if env is None else env
    raw = env.get("TF_CONFIG")
    if raw:
        try:
            conf = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"TF_CONFIG is not valid JSON ({exc.msg})") from None
        if not isinstance(conf, dict) or "cluster" not in conf or "task" not in conf:
            raise ConfigError("TF_CONFIG must have 'cluster' and 'task' keys")
        return conf
    n_raw = env.get("OIOD_NUM_WORKERS")
    if not n_raw:
        return None
    try:
        n = int(n_raw)
    except ValueError:
        raise ConfigError(f"OIOD_NUM_WORKERS={n_raw!r} is not an integer") from None
    if n <= 1:
        return None
    idx_raw = env.get("JOB_COMPLETION_INDEX")
    if idx_raw is None:
        raise ConfigError("OIOD_NUM_WORKERS > 1 needs JOB_COMPLETION_INDEX (an indexed Kubernetes Job)")
    try:
        index = int(idx_raw)
    except ValueError:
        raise ConfigError(f"JOB_COMPLETION_INDEX={idx_raw!r} is not an integer") from None
    if not 0 <= index < n:
        raise ConfigError(f"JOB_COMPLETION_INDEX={index} is outside 0..{n - 1}")
    service = env.get("OIOD_WORKER_SERVICE")
    if not service:
        raise ConfigError("OIOD_NUM_WORKERS > 1 needs OIOD_WORKER_SERVICE (the headless service name)")
    port = env.get("OIOD_WORKER_PORT", "2222")
    if not port.isdigit():
        raise ConfigError(f"OIOD_WORKER_PORT={port!r} is not a port number")
    job = env.get("OIOD_JOB_NAME")
    if not job:
        host = env.get("HOSTNAME") or socket.gethostname()
        # Indexed Job pods are named {job}-{index}-{random}.
        m = re.match(rf"^(.*)-{index}-[a-z0-9]+$", host)
        if not m:
            raise ConfigError(f"cannot derive the Job name from hostname {host!r}; set OIOD_JOB_NAME")
        job = m.group(1)
    workers = [f"{job}-{i}.{service}:{port}" for i in range(n)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def ensure_tf_config(env: dict | None = None) -> dict[str, Any] | None:
    """Derive ``TF_CONFIG`` from the Job environment and export it (TF reads the variable)."""
    conf = tf_config_from_env(env)
    if conf is not None and not os.environ.get("TF_CONFIG"):
        os.environ["TF_CONFIG"] = json.dumps(conf)
    return conf


def is_chief(conf: dict[str, Any] | None) -> bool:
    """The chief writes checkpoints, summaries and ``params.yaml``: worker 0 unless a ``chief`` task exists."""
    if not conf:
        return True
    task = conf.get("task", {})
    if "chief" in conf.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def build_strategy(kind: str = "auto") -> Any:
    """A ``tf.distribute.Strategy`` for ``train.distribution``.

    Args:
        kind: ``auto`` (multi-worker when a cluster is configured, mirrored on
            several GPUs, else the default strategy), ``one_device``, ``mirrored``
            or ``multi_worker``.
    """
    import tensorflow as tf

    conf = ensure_tf_config()
    if kind == "multi_worker" and conf is None:
        raise ConfigError(
            "train.distribution=multi_worker needs TF_CONFIG or an indexed Job environment "
            "(JOB_COMPLETION_INDEX, OIOD_NUM_WORKERS, OIOD_WORKER_SERVICE)"
        )
    if kind == "multi_worker" or (kind == "auto" and conf is not None):
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    device = "/gpu:0" if gpus else "/cpu:0"
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy(device)
    return tf.distribute.get_strategy()
