"""Our config -> a TF Model Garden RetinaNet ``ExperimentConfig``.

One function, :func:`build_experiment`, maps the project's ``train`` section
(plus the number of classes from the prepare output) onto
``official.vision.configs.retinanet.RetinaNetTask``. The Model Garden defaults
that do not work here are overridden on purpose: no ``gs://`` init checkpoint,
float32 data, no bfloat16 (CPU), no TPU preemption watcher.

Importing this module imports TensorFlow and Model Garden.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any  # List: a Model Garden config field annotation (resolved at runtime)

from openimages_od.config import Config

__all__ = [
    "BACKBONES",
    "build_experiment",
    "config_digest",
    "resolve_mixed_precision",
    "steps_per_loop",
]

# Backbones we expose, mapped to Model Garden's backbone one-of config.
BACKBONES: dict[str, dict[str, Any]] = {
    "mobilenetv2": {"type": "mobilenet", "mobilenet": {"model_id": "MobileNetV2", "filter_size_scale": 1.0}},
    "resnet50": {"type": "resnet", "resnet": {"model_id": 50}},
    "resnet101": {"type": "resnet", "resnet": {"model_id": 101}},
    "spinenet49": {"type": "spinenet", "spinenet": {"model_id": "49", "min_level": 3, "max_level": 7}},
}

MIN_LEVEL = 3
MAX_LEVEL = 7


def config_digest(cfg: Config) -> str:
    """sha256 of the resolved ``train`` section: identifies what a model was trained with."""
    body = json.dumps(cfg.train.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def steps_per_loop(cfg: Config) -> int:
    """Orbit runs ``steps_per_loop`` steps between host round trips.

    Summaries and checkpoints happen only at loop boundaries, so the loop length
    must divide both intervals; it also must not exceed the total steps.
    """
    t = cfg.train
    return max(1, min(math.gcd(t.summary_every, t.checkpoint_every), t.steps))


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` -> ``mixed_float16`` when a GPU is visible, else ``float32``."""
    if setting != "auto":
        return setting
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def _optimizer_config(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    lr = t.learning_rate
    if t.optimizer == "sgd":
        opt = {"type": "sgd", "sgd": {"momentum": t.momentum}}
    else:
        opt = {"type": "adam", "adam": {}}
    if lr.schedule == "cosine":
        sched = {"type": "cosine", "cosine": {"initial_learning_rate": lr.initial, "decay_steps": t.steps}}
    elif lr.schedule == "stepwise":
        sched = {
            "type": "stepwise",
            "stepwise": {"boundaries": list(lr.boundaries), "values": list(lr.values)},
        }
    else:
        sched = {"type": "constant", "constant": {"learning_rate": lr.initial}}
    out: dict[str, Any] = {"optimizer": opt, "learning_rate": sched}
    if lr.warmup_steps > 0:
        out["warmup"] = {
            "type": "linear",
            "linear": {
                "warmup_steps": min(lr.warmup_steps, t.steps),
                "warmup_learning_rate": lr.warmup_learning_rate,
            },
        }
    return out


def build_experiment(
    cfg: Config,
    num_classes: int,
    train_files: list[str] | None = None,
    *,
    mixed_precision: str | None = None,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    nms_iou_threshold: float | None = None,
) -> Any:
    """Build the Model Garden experiment for ``cfg``.

    Args:
        cfg: the project config (``train`` section is used).
        num_classes: label-map size + 1 (class 0 is background).
        train_files: local TFRecord paths for ``task.train_data``.
        mixed_precision: resolved dtype policy (default: resolve ``train.mixed_precision``).
        score_threshold: detection pre-NMS score threshold (default ``export.score_threshold``).
        max_detections: detections kept per image (default ``export.max_detections``).
        nms_iou_threshold: NMS IoU (default ``export.nms_iou_threshold``).

    Returns:
        ``official.core.config_definitions.ExperimentConfig``, validated.
    """
    from official.core import config_definitions as cfg_def
    from official.modeling import optimization
    from official.vision.configs import backbones, common, decoders
    from official.vision.configs import retinanet as rn

    t = cfg.train
    size = t.input_size
    policy = mixed_precision or resolve_mixed_precision(t.mixed_precision)
    backbone = backbones.Backbone(**_backbone_kwargs(t.backbone, backbones))
    # SpineNet has its own multi-scale outputs; the others get an FPN.
    if t.backbone.startswith("spinenet"):
        decoder = decoders.Decoder(type="identity")
    else:
        decoder = decoders.Decoder(type="fpn", fpn=decoders.FPN(num_filters=t.fpn_filters))
    model = rn.RetinaNet(
        num_classes=num_classes,
        input_size=[size, size, 3],
        min_level=MIN_LEVEL,
        max_level=MAX_LEVEL,
        backbone=backbone,
        decoder=decoder,
        head=rn.RetinaNetHead(num_convs=t.head_num_convs, num_filters=t.head_num_filters),
        norm_activation=common.NormActivation(use_sync_bn=False, activation="relu"),
        detection_generator=rn.DetectionGenerator(
            pre_nms_score_threshold=cfg.export.score_threshold
            if score_threshold is None
            else score_threshold,
            nms_iou_threshold=cfg.export.nms_iou_threshold
            if nms_iou_threshold is None
            else nms_iou_threshold,
            max_num_detections=cfg.export.max_detections if max_detections is None else max_detections,
            pre_nms_top_k=1000,
            nms_version="v2",
        ),
    )
    parser = rn.Parser(
        aug_rand_hflip=t.augmentation.hflip,
        aug_scale_min=t.augmentation.scale_min,
        aug_scale_max=t.augmentation.scale_max,
        # Open Images group-of boxes are written as is_crowd; they are real
        # objects and the seed trained on them, so keep them.
        skip_crowd_during_training=False,
        max_num_instances=100,
    )
    train_data = rn.DataConfig(
        input_path=list(train_files or []),
        is_training=True,
        global_batch_size=t.batch_size,
        dtype="float32",
        parser=parser,
        shuffle_buffer_size=t.shuffle_buffer,
        cycle_length=min(8, max(1, len(train_files or []))),
        seed=t.seed,
        drop_remainder=True,
    )
    validation_data = rn.DataConfig(
        is_training=False, global_batch_size=cfg.evaluate.batch_size, dtype="float32"
    )
    task_cls = rn.RetinaNetTask
    extra: dict[str, Any] = {}
    if t.repeat_factor_threshold is not None and train_files:
        from openimages_od.training.sampling import repeat_factors_for

        task_cls = _sampling_task_config()
        extra = {"repeat_factors": repeat_factors_for(cfg, list(train_files), num_classes - 1)}
    task = task_cls(
        **extra,
        model=model,
        train_data=train_data,
        validation_data=validation_data,
        losses=rn.Losses(l2_weight_decay=t.weight_decay),
        init_checkpoint=t.init_checkpoint,
        init_checkpoint_modules=t.init_checkpoint_modules,
        annotation_file=None,
        use_coco_metrics=False,
    )
    spl = steps_per_loop(cfg)
    trainer = cfg_def.TrainerConfig(
        train_steps=t.steps,
        steps_per_loop=spl,
        summary_interval=max(spl, (t.summary_every // spl) * spl),
        checkpoint_interval=max(spl, (t.checkpoint_every // spl) * spl),
        max_to_keep=t.max_checkpoints,
        validation_steps=0,
        validation_interval=t.steps,
        optimizer_config=optimization.OptimizationConfig(_optimizer_config(cfg)),
        preemption_on_demand_checkpoint=False,
    )
    runtime = cfg_def.RuntimeConfig(mixed_precision_dtype=policy)
    exp = cfg_def.ExperimentConfig(task=task, trainer=trainer, runtime=runtime)
    exp.validate()
    return exp


_SAMPLING_TASK: Any = None


def _sampling_task_config() -> Any:
    """A RetinaNet task config with per-class repeat factors, registered (once) with its task class.

    Model Garden's ``RetinaNetTask.build_inputs`` builds its ``InputReader`` without
    a ``sample_fn``; the task class below passes one (repeat-factor sampling, see
    :mod:`.sampling`) and is otherwise Model Garden's. ``train.py`` finds it through
    ``task_factory.get_task`` like any registered task, and ``params.yaml`` records
    the factors used.
    """
    global _SAMPLING_TASK
    if _SAMPLING_TASK is not None:
        return _SAMPLING_TASK
    import contextlib
    import dataclasses

    from official.core import task_factory
    from official.vision.configs import retinanet as rn
    from official.vision.tasks import retinanet as rn_task

    @dataclasses.dataclass
    class RepeatFactorRetinaNetTask(rn.RetinaNetTask):
        # Repeat factor per label-map id (index 0 = background); see openimages_od.training.sampling.
        repeat_factors: list[float] = dataclasses.field(default_factory=list)

    @task_factory.register_task_cls(RepeatFactorRetinaNetTask)
    class RepeatFactorTask(rn_task.RetinaNetTask):
        def build_inputs(self, params: Any, input_context: Any = None) -> Any:
            if not params.is_training or not self.task_config.repeat_factors:
                return super().build_inputs(params, input_context)
            from openimages_od.training.sampling import make_sample_fn

            sample_fn = make_sample_fn(
                list(self.task_config.repeat_factors), params.seed, max(1, params.shuffle_buffer_size)
            )
            factory = rn_task.input_reader_factory
            original = factory.input_reader_generator

            def generator(p: Any, **kwargs: Any) -> Any:
                return original(p, sample_fn=sample_fn, **kwargs)

            # The reader is created inside super().build_inputs; swap the factory for that call only.
            with contextlib.ExitStack() as stack:
                factory.input_reader_generator = generator
                stack.callback(setattr, factory, "input_reader_generator", original)
                return super().build_inputs(params, input_context)

    _SAMPLING_TASK = RepeatFactorRetinaNetTask
    return _SAMPLING_TASK


def _backbone_kwargs(name: str, backbones: Any) -> dict[str, Any]:
    spec = dict(BACKBONES[name])
    kind = spec.pop("type")
    cls = {"mobilenet": backbones.MobileNet, "resnet": backbones.ResNet, "spinenet": backbones.SpineNet}[kind]
    return {"type": kind, kind: cls(**spec[kind])}
