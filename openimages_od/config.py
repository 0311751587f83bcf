"""Typed, strict, layered configuration.

Layers, later wins: built-in defaults (the field defaults below), then a YAML
file (``--config``), then ``--set dotted.key=value`` overrides. Every section
forbids unknown keys. Errors name the layer (file path with line, or
``--set``), the dotted key and what was expected, and exit with code 2.

String values may reference environment variables as ``${NAME}`` or
``${NAME:-default}``; they are expanded when the config is loaded, and
:func:`dump_config` (so ``config.resolved.yaml``) writes the reference back
instead of the value, so secrets stay in the environment and never reach the
file unless the user writes them there. Validation errors show the reference,
not the value.

Hostile files are refused before any work: YAML aliases that expand past
:data:`MAX_YAML_NODES` nodes (a "billion laughs" alias bomb), recursive
aliases, nesting deeper than :data:`MAX_YAML_DEPTH`, files over
:data:`MAX_CONFIG_BYTES`. Split names must be safe path components and
``key_template`` may use only ``{split}`` and ``{image_id}`` without format specs.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from openimages_od.errors import ConfigError

__all__ = [
    "Config",
    "S3Options",
    "apply_overrides",
    "dump_config",
    "load_config",
    "save_resolved",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Split names become path components (plan/{split}/..., tfrecords/{split}/..., keys).
_SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_split_name(v: str) -> str:
    if not _SPLIT_NAME_RE.match(v):
        raise ValueError(
            f"split name {v[:80]!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes a path component)"
        )
    return v


SplitName = Annotated[str, AfterValidator(_check_split_name)]


# --------------------------------------------------------------------------- shared


class S3Options(_Section):
    """How to reach an S3-compatible store (AWS, SeaweedFS, MinIO, GCS interop)."""

    endpoint_url: str | None = Field(None, description="Endpoint URL; null = AWS (or AWS_ENDPOINT_URL).")
    region: str | None = Field(None, description="Region name; null = the credential chain's default.")
    unsigned: bool = Field(
        False, description="Anonymous requests (public buckets such as open-images-dataset)."
    )
    profile: str | None = Field(None, description="Named profile from ~/.aws/config.")
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts for transient errors (capped exponential backoff)."
    )
    multipart_threshold_mb: int = Field(64, ge=5)
    max_pool_connections: int = Field(32, ge=1)


# --------------------------------------------------------------------------- source


class SplitSource(_Section):
    """Metadata files of one split (train, validation, test)."""

    boxes: str = Field(..., description="Box annotations CSV (any release layout).")
    images: str | None = Field(None, description="Image index CSV (URLs, MD5, size, Rotation).")
    image_labels: str | None = Field(
        None, description="Human-verified image-level labels CSV (for Open Images mAP)."
    )


class HttpOptions(_Section):
    """HTTP fetching of OriginalURL / Thumbnail300KURL (and http metadata)."""

    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    total_timeout_s: float = Field(90.0, gt=0)
    max_redirects: int = Field(5, ge=0, le=30)
    max_retries: int = Field(3, ge=0, le=20)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(60.0, ge=0, description="Longest Retry-After honoured.")
    max_body_mb: float = Field(50.0, gt=0)
    per_host_limit: int = Field(16, ge=1)
    user_agent: str = "openimages-od/0.1 (+https://github.com/openimages-od)"


class ImageSources(_Section):
    """Where image bytes come from, tried in ``order`` per image."""

    order: list[Literal["bucket", "original", "thumbnail"]] = Field(
        default_factory=lambda: ["bucket", "original", "thumbnail"]
    )
    bucket: str = Field("open-images-dataset", description="Bucket holding {split}/{image_id}.jpg.")
    key_template: str = Field("{split}/{image_id}.jpg", description="Object key; fields: split, image_id.")
    # An explicit AWS endpoint: botocore would otherwise apply AWS_ENDPOINT_URL (set
    # on clusters for the output store) to the public image bucket too.
    s3: S3Options = Field(
        default_factory=lambda: S3Options(
            unsigned=True, region="us-east-1", endpoint_url="https://s3.us-east-1.amazonaws.com"
        )
    )
    http: HttpOptions = Field(default_factory=HttpOptions)

    @field_validator("order")
    @classmethod
    def _order_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one of bucket, original, thumbnail")
        if len(set(v)) != len(v):
            raise ValueError("must not repeat a source")
        return v

    @field_validator("key_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        # Parsed, not tried: a format spec such as {image_id:>999999999} would allocate gigabytes.
        if len(v) > 512:
            raise ValueError("must be at most 512 characters")
        try:
            parts = list(string.Formatter().parse(v))
        except ValueError as exc:
            raise ValueError(f"is not a valid template ({exc})") from None
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            if name not in ("split", "image_id"):
                raise ValueError(f"may only use the fields {{split}} and {{image_id}} (got {{{name[:40]}}})")
            if spec or conversion:
                raise ValueError(
                    f"{{{name}}} may not have a conversion or format spec "
                    f"(got {{{name}{'!' + conversion if conversion else ''}{':' + spec[:20] if spec else ''}}})"
                )
        return v


class SourceConfig(_Section):
    """Metadata and image locations (local paths, file://, http(s)://, s3://)."""

    version: Literal["auto", "v2", "v3", "v4", "v5", "v6", "v7"] = Field(
        "auto", description="Release; layouts are detected from headers, this only documents intent."
    )
    class_descriptions: str | None = Field(None, description="MID,DisplayName CSV (with or without header).")
    hierarchy: str | None = Field(None, description="Box hierarchy JSON (V4+).")
    trainable_classes: str | None = Field(
        None, description="V2 trainable class list (one MID a line) or a label map .pbtxt."
    )
    splits: dict[SplitName, SplitSource] = Field(default_factory=dict)
    s3: S3Options = Field(default_factory=S3Options, description="Options for s3:// metadata URLs.")
    images: ImageSources = Field(default_factory=ImageSources)


# --------------------------------------------------------------------------- selection


class AttributeFilters(_Section):
    """Keep boxes by attribute: null keeps all, true keeps only 1, false keeps only 0 (-1 = unknown is kept unless ``drop_unknown``)."""

    is_group_of: bool | None = None
    is_depiction: bool | None = None
    is_occluded: bool | None = None
    is_truncated: bool | None = None
    is_inside: bool | None = None
    drop_unknown: bool = False


class SelectionConfig(_Section):
    """Which classes, boxes and images to keep."""

    classes: list[str] = Field(
        default_factory=list, description="Display names or MIDs; empty = all boxable."
    )
    include_subclasses: bool = Field(
        False, description="Add hierarchy descendants (Subcategory) of each class."
    )
    trainable_only: bool = Field(
        False, description="Restrict to the V2 trainable set (source.trainable_classes)."
    )
    filters: AttributeFilters = Field(default_factory=AttributeFilters)
    splits: list[SplitName] = Field(
        default_factory=list, description="Splits to plan; empty = all in source.splits."
    )
    max_images: int | None = Field(None, ge=1, description="Cap per split.")
    max_images_per_class: int | None = Field(None, ge=1)
    min_boxes_per_image: int = Field(1, ge=0)
    seed: int = 0
    expand_hierarchy: bool = Field(
        False, description="Add ancestor labels to each box (as the OID evaluation does)."
    )
    strict: bool = Field(False, description="Stop at the first malformed row instead of counting it.")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    label_map: str | None = Field(
        None,
        description="A label map .pbtxt whose ids to use (e.g. the shipped OID label map); null = ids stay "
        "stable across re-plans of the output: existing classes keep theirs, new ones are appended.",
    )
    image_ids: list[str] | str | None = Field(
        None,
        description="Restrict the plan to these images: a list of ImageIDs, or a file (path or URL; one id a "
        "line, # comments and blank lines allowed, or a CSV with an ImageID column). Combined with classes: "
        "the images in the list that have a box of a selected class. Listed ids found in no planned split "
        "are counted and listed in plan/stats.json.",
    )
    keep_all_labels: bool = Field(
        False,
        description="Choose images by the selected classes, but keep every box on a chosen image (the "
        "attribute filters and min_confidence still apply); the label map grows by the other classes found, "
        "appended after the existing ids. FiftyOne's only_matching=False.",
    )

    @field_validator("image_ids")
    @classmethod
    def _image_id_list(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, list):
            for i, x in enumerate(v):
                if not re.fullmatch(r"[0-9a-fA-F]{16}", x):
                    raise ValueError(f"item {i}: {x!r} is not an ImageID (16 hex digits)")
        elif isinstance(v, str) and not v.strip():
            raise ValueError("an empty string: give a file path/URL, a list of ImageIDs, or null")
        return v


# --------------------------------------------------------------------------- output


class OutputConfig(_Section):
    """Root URL under which every stage writes."""

    url: str = Field("file://./oiod-output", description="file://, a path, or s3://bucket/prefix.")
    s3: S3Options = Field(default_factory=S3Options)
    image_cache: bool = Field(
        True,
        description="Keep verified, upright, resized image bytes so a re-plan or re-shard never fetches an "
        "image twice.",
    )
    cache_url: str | None = Field(
        None,
        description="Image cache root (path, file:// or s3://, same S3 options); null = {output.url}/cache.",
    )
    lock_ttl_s: float = Field(
        120.0,
        ge=5,
        description="Lease of the output lock held by plan/prepare on s3:// (renewed every third).",
    )

    @field_validator("url")
    @classmethod
    def _writable_scheme(cls, v: str) -> str:
        if re.match(r"^https?://", v):
            raise ValueError("must be a local path, file:// or s3:// URL (http is read-only)")
        if not v:
            raise ValueError("must not be empty")
        return v


# --------------------------------------------------------------------------- ray


class RayConfig(_Section):
    """Where prepare runs and how wide.

    By default the number of download actors follows the cluster: every alive
    node gets ``actors_per_node`` actors (or as many as its CPUs allow at
    ``num_cpus_per_actor`` each), nodes that join during the run get theirs,
    and ``num_actors`` is an explicit override of the total.
    """

    address: str = Field(
        "local", description="'local' (embedded), 'auto' (join), or ray://host:port / host:port."
    )
    num_actors: int | None = Field(
        None,
        ge=1,
        description="Total download actors (override); null = derived from the nodes' CPUs, elastic.",
    )
    actors_per_node: int | None = Field(
        None, ge=1, description="Download actors per node; null = the node's CPUs / num_cpus_per_actor."
    )
    num_cpus_per_actor: float = Field(0.5, gt=0)
    concurrency_per_actor: int = Field(32, ge=1, description="Concurrent image fetches inside one actor.")
    decode_threads_per_actor: int = Field(
        1, ge=1, description="Threads for decode/resize/encode in one actor."
    )
    max_shards_in_flight_per_actor: int = Field(2, ge=1)
    max_shard_retries: int = Field(3, ge=0)
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs for the embedded instance (null = all).")
    object_store_memory_mb: int = Field(512, ge=78)
    local_worker_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="Unix niceness of the workers of an embedded instance (Ray's own default, 15, makes the "
        "download workers lose every CPU contest on a shared machine).",
    )
    namespace: str = "openimages-od"
    progress: bool = True
    actor_start_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Warn about a download actor not started after this long (the run goes on waiting; "
        "see join_timeout_s).",
    )
    join_timeout_s: float = Field(
        900.0,
        gt=0,
        description="Fail when no download actor could run for this long (no worker node joined, or all were lost); "
        "until then the run waits for nodes.",
    )
    node_loss_timeout_s: float = Field(
        30.0,
        gt=0,
        description="An actor that answers no heartbeat for this long is treated as lost with its node: its shards "
        "are rescheduled on the other nodes.",
    )
    shard_timeout_s: float | None = Field(
        None, gt=0, description="Cancel and retry a shard running longer than this (null = no limit)."
    )
    request_resources: bool = Field(
        True,
        description="On a cluster, ask the Ray autoscaler (if any) for CPUs for the pending shards' actors.",
    )
    forward_env: list[str] = Field(
        default_factory=list,
        description="Driver environment variables copied into the actors' runtime_env (non-secret settings only: "
        "the Ray dashboard shows runtime_env). Credentials reach workers through their own environment.",
    )

    @field_validator("forward_env")
    @classmethod
    def _no_secrets_forwarded(cls, v: list[str]) -> list[str]:
        secret = [n for n in v if SECRET_ENV_NAME.search(n)]
        if secret:
            raise ValueError(
                f"{secret} look like credentials; runtime_env is shown by the Ray dashboard, so give the workers "
                "credentials through their own environment (the pod's env from a Secret; an embedded instance "
                "inherits the driver's environment)"
            )
        return v


# Names of environment variables that hold credentials (never copied into a runtime_env).
SECRET_ENV_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|(^|_)KEY($|_)|ACCESS_KEY", re.I
)


# --------------------------------------------------------------------------- image


class ImageConfig(_Section):
    """Verification and resizing."""

    max_side: int = Field(1024, ge=16, description="Longest side after resize; never upscales.")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality when re-encoding.")
    keep_original_if_fits: bool = Field(
        True, description="Keep source bytes when already small enough, JPEG and upright."
    )
    max_pixels: int = Field(100_000_000, ge=1, description="Decompression-bomb limit (width*height).")
    min_side: int = Field(8, ge=1)
    verify_md5: bool = Field(True, description="Check OriginalMD5 when the original was fetched.")
    reject_placeholder: bool = Field(True, description="Reject Flickr's 'photo unavailable' placeholder.")
    exif: Literal["rotation_wins", "exif_wins", "ignore"] = Field(
        "rotation_wins",
        description="If the plan gives a Rotation, apply it and ignore EXIF; else follow EXIF orientation.",
    )
    resample: Literal["box", "bilinear", "lanczos"] = Field(
        "box",
        description="Downscale filter after the JPEG draft: box (area average, fastest), bilinear, lanczos (slowest).",
    )


# --------------------------------------------------------------------------- shards


class ShardsConfig(_Section):
    """Shard sizing (the unit of work and retry)."""

    images_per_shard: int = Field(1000, ge=1)
    compression: Literal["none"] = "none"


# --------------------------------------------------------------------------- train / eval / export


class LearningRateConfig(_Section):
    schedule: Literal["cosine", "stepwise", "constant"] = "cosine"
    initial: float = Field(0.01, gt=0)
    warmup_steps: int = Field(100, ge=0)
    warmup_learning_rate: float = Field(0.0, ge=0)
    boundaries: list[int] = Field(default_factory=list, description="stepwise: step boundaries.")
    values: list[float] = Field(default_factory=list, description="stepwise: rates (len(boundaries)+1).")


class AugmentationConfig(_Section):
    hflip: bool = True
    scale_min: float = Field(0.8, gt=0)
    scale_max: float = Field(1.25, gt=0)


class TrainConfig(_Section):
    """TF Model Garden RetinaNet training."""

    model_dir: str | None = Field(None, description="Checkpoints + TensorBoard; null = {output.url}/model.")
    backbone: Literal["mobilenetv2", "resnet50", "resnet101", "spinenet49"] = "mobilenetv2"
    input_size: int = Field(384, ge=128, description="Square model input; a multiple of 128 (2**max_level).")
    batch_size: int = Field(8, ge=1, description="Global batch size.")
    steps: int = Field(20000, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(4e-5, ge=0)
    learning_rate: LearningRateConfig = Field(default_factory=LearningRateConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    init_checkpoint: str | None = Field(None, description="Fine-tune from this checkpoint (backbone or all).")
    init_checkpoint_modules: Literal["all", "backbone"] = "backbone"
    fine_tune: bool = Field(
        False,
        description="model_dir holds a model trained on another label map: start from its latest checkpoint "
        "(moved to model_dir/previous/) instead of refusing to train.",
    )
    mixed_precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    distribution: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    fpn_filters: int = Field(64, ge=8)
    head_num_convs: int = Field(2, ge=1)
    head_num_filters: int = Field(64, ge=8)
    checkpoint_every: int = Field(500, ge=1)
    summary_every: int = Field(50, ge=1)
    max_checkpoints: int = Field(5, ge=1)
    split: SplitName = "train"
    shuffle_buffer: int = Field(256, ge=1)
    cache_dir: str | None = Field(None, description="Local staging for s3:// shards; null = a temp dir.")
    seed: int | None = 0
    repeat_factor_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Repeat-factor sampling (LVIS): oversample images of classes in fewer than this fraction "
        "of training images (r = max(1, sqrt(t / f))); null = off. 0.001 is LVIS's value.",
    )

    @field_validator("input_size")
    @classmethod
    def _multiple_of_stride(cls, v: int) -> int:
        # RetinaNet's coarsest level (P7) has stride 128; Model Garden pads inputs to it.
        if v % 128:
            raise ValueError(
                f"must be a multiple of 128 (RetinaNet's P7 stride), e.g. {max(128, v // 128 * 128)} "
                f"or {(v // 128 + 1) * 128}"
            )
        return v


class EvaluateConfig(_Section):
    """COCO and Open Images mAP."""

    split: SplitName = "validation"
    metrics: list[Literal["coco", "openimages"]] = Field(default_factory=lambda: ["coco", "openimages"])
    iou_threshold: float = Field(0.5, gt=0, le=1)
    batch_size: int = Field(4, ge=1)
    max_images: int | None = Field(None, ge=1)
    num_images_to_log: int = Field(4, ge=0)
    poll_interval_s: float = Field(30.0, gt=0)
    timeout_s: float | None = Field(
        None, gt=0, description="--continuous: stop after this long with no new checkpoint."
    )
    min_score: float = Field(0.0, ge=0, le=1)
    group_of_weight: float = Field(
        1.0,
        ge=0,
        description="Open Images metric: weight of a group-of box (1 = challenge; 0 = ignore them).",
    )
    analysis_min_score: float = Field(
        0.3, ge=0, le=1, description="Error analysis: predictions at or above this score get a TP/FP reason."
    )
    analysis_worst_images: int = Field(
        3, ge=0, description="Error analysis: worst images kept (drawn) per class."
    )


class ExportConfig(_Section):
    """SavedModel export."""

    dir: str | None = Field(None, description="Destination; null = {output.url}/export.")
    max_detections: int = Field(100, ge=1)
    score_threshold: float = Field(0.05, ge=0, le=1)
    nms_iou_threshold: float = Field(0.5, gt=0, le=1)


class ServeConfig(_Section):
    """HTTP detection service."""

    model: str | None = Field(None, description="Exported model dir (path or s3://); null = export.dir.")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_batch: int = Field(8, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    batching: bool = True
    min_score: float = Field(0.5, ge=0, le=1)
    max_detections: int = Field(100, ge=1)
    max_body_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(50_000_000, ge=1)
    fetch_timeout_s: float = Field(10.0, gt=0)
    max_redirects: int = Field(3, ge=0)
    allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs/hosts exempt from the SSRF guard (in-cluster use)."
    )
    auth_token_env: str | None = Field(None, description="Env var holding a bearer token; null = no auth.")
    output_dir: str | None = Field(
        None, description="Where `output` in a request may store annotated images."
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="SIGTERM: how long in-flight requests may take to drain."
    )
    access_log: bool = Field(True, description="Structured JSON access log lines on stderr.")
    max_instances: int = Field(64, ge=1, description="Most images in one TF Serving-style :predict request.")
    allowed_image_prefixes: list[str] = Field(
        default_factory=list,
        description="s3://bucket/prefix/ locations a request's image may name; empty = s3:// images refused.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's headers (also the keep-alive idle timeout).",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Time a client has to send a request's body (408 after)."
    )
    max_connections: int = Field(
        512,
        ge=8,
        description="Open client connections; idle ones are closed first "
        "when full (capped below the process's file limit).",
    )
    work_timeout_s: float = Field(
        30.0, gt=0, description="Limit for one image check, drawing or output write."
    )
    fetch_workers: int = Field(8, ge=1, description="Threads for storage work of image fetches (s3 signing).")
    cpu_workers: int = Field(
        2, ge=1, description="Threads for image checks/conversion and for drawing (each)."
    )
    output_workers: int = Field(4, ge=1, description="Threads (and S3 connections) for `output` writes.")

    @field_validator("allowed_image_prefixes")
    @classmethod
    def _s3_prefixes(cls, v: list[str]) -> list[str]:
        out = []
        for p in v:
            bucket, _, key = p.removeprefix("s3://").partition("/")
            if not p.startswith("s3://") or not bucket or any(s in (".", "..") for s in key.split("/")[:-1]):
                raise ValueError(
                    f"{p!r} is not an s3://bucket[/prefix/] location (only s3:// image sources exist)"
                )
            out.append(
                p if p.endswith("/") else p + "/"
            )  # a folder: s3://b/img never admits s3://b/img-private/
        return out

    @model_validator(mode="after")
    def _token_env_is_a_name(self) -> ServeConfig:
        # A model-level check so the error never quotes the value: people paste the token itself here.
        v = self.auth_token_env
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", v):
            raise ValueError(
                "auth_token_env must be the NAME of an environment variable that holds the token "
                "(letters, digits and '_'), not the token itself; the value given is not shown"
            )
        return self


# --------------------------------------------------------------------------- root


class Config(_Section):
    """The whole configuration."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    # Dotted path -> (the ${VAR} text as written, the value it expanded to), for dump_config.
    _env_refs: dict[tuple, tuple[str, Any]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        lr = self.train.learning_rate
        if lr.schedule == "stepwise" and len(lr.values) != len(lr.boundaries) + 1:
            raise ValueError(
                "train.learning_rate: stepwise needs len(values) == len(boundaries) + 1 "
                f"(got {len(lr.values)} values, {len(lr.boundaries)} boundaries)"
            )
        if self.train.augmentation.scale_min > self.train.augmentation.scale_max:
            raise ValueError("train.augmentation: scale_min must be <= scale_max")
        unknown = [s for s in self.selection.splits if self.source.splits and s not in self.source.splits]
        if unknown:
            raise ValueError(
                f"selection.splits names {unknown} not in source.splits ({sorted(self.source.splits)})"
            )
        return self

    # Derived locations, one place so every stage agrees.
    @property
    def output_root(self) -> str:
        return normalize_root(self.output.url)

    def output_path(self, *parts: str) -> str:
        """Join ``parts`` under ``output.url``."""
        return join_url(self.output_root, *parts)

    @property
    def model_dir(self) -> str:
        return normalize_root(self.train.model_dir) if self.train.model_dir else self.output_path("model")

    @property
    def export_dir(self) -> str:
        return normalize_root(self.export.dir) if self.export.dir else self.output_path("export")

    @property
    def serve_model(self) -> str:
        return normalize_root(self.serve.model) if self.serve.model else self.export_dir


def normalize_root(url: str) -> str:
    """Turn a relative or absolute path or file:// URL into an absolute URL-ish root.

    Local paths become absolute ``file://`` URLs; s3:// and http(s):// are kept.
    """
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        return url.rstrip("/")
    path = url[len("file://") :] if url.startswith("file://") else url
    return "file://" + str(Path(os.path.expanduser(path)).absolute()).rstrip("/")


def join_url(root: str, *parts: str) -> str:
    out = root.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


# --------------------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(
    value: Any, where: str, refs: dict[tuple, tuple[str, Any]] | None = None, path: tuple = ()
) -> Any:
    """Expand ``${VAR}`` references; ``refs`` records each expanded path with its reference."""
    if isinstance(value, dict):
        return {
            k: _expand_env(v, f"{where}.{k}" if where else str(k), refs, path + (k,))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]", refs, path + (i,)) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        out = _expand_str(value, where)
        if refs is not None and _ENV_RE.search(value):
            refs[path] = (value, out)
        return out
    return value


def _expand_str(value: str, where: str) -> Any:
    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (referenced as ${{{name}}})")

    expanded = _ENV_RE.sub(repl, value)
    # "${X:-}" meaning "unset" maps to null so optional fields can be left out.
    return None if expanded == "" and value.strip().startswith("${") else expanded


#: Most nodes a config document may expand to (aliases counted as often as they are used).
MAX_YAML_NODES = 100_000
#: Deepest nesting of mappings/sequences.
MAX_YAML_DEPTH = 64
#: Largest config file read.
MAX_CONFIG_BYTES = 4 << 20


def _check_yaml_node(root: Any, where: str) -> None:
    """Refuse alias bombs, recursive aliases and deep nesting before anything is constructed.

    The composed node graph shares aliased nodes; the size it would expand to is
    counted with one visit per distinct node (memoised), so the check itself is
    linear in the document.

    Raises:
        ConfigError: naming ``where`` and the line of the offending node.
    """
    size: dict[int, int] = {}
    active: set[int] = set()
    # Iterative post-order walk: (node, depth, children_done).
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            if isinstance(node, yaml.MappingNode):
                kids = [n for kv in node.value for n in kv]
            else:
                kids = list(node.value)
            total = 1 + sum(size[id(k)] for k in kids)
            size[nid] = total
            if total > MAX_YAML_NODES:
                line = node.start_mark.line + 1
                raise ConfigError(
                    f"{where}:{line}: the document expands to more than {MAX_YAML_NODES} "
                    "nodes (YAML aliases used as a bomb?)"
                )
            continue
        if nid in size:
            continue
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            size[nid] = 1
            continue
        if nid in active:
            raise ConfigError(
                f"{where}:{node.start_mark.line + 1}: a YAML alias refers to itself (recursive)"
            )
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(
                f"{where}:{node.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels"
            )
        active.add(nid)
        stack.append((node, depth, True))
        kids = [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else node.value
        for k in kids:
            if id(k) not in size:
                stack.append((k, depth + 1, False))


def safe_yaml_load(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses alias bombs, recursion and deep nesting first.

    Raises:
        ConfigError: the text is not valid YAML or is hostile (naming ``where`` and the line).
    """
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}{loc}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_index(text: str) -> dict[str, int]:
    """Map dotted key paths in a YAML document to 1-based line numbers."""
    out: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{prefix}.{i}")

    walk(node, "")
    return out


def _deep_merge(base: dict, upd: dict, origin: dict[str, str], label: str, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in upd.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, origin, label, key)
        else:
            out[k] = copy.deepcopy(v)
            origin[key] = label
            if isinstance(v, dict):
                for sub in _flatten_keys(v, key):
                    origin[sub] = label
    return out


def _flatten_keys(d: dict, prefix: str) -> list[str]:
    keys = []
    for k, v in d.items():
        key = f"{prefix}.{k}"
        keys.append(key)
        if isinstance(v, dict):
            keys.extend(_flatten_keys(v, key))
    return keys


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = safe_yaml_load(raw, f"--set {key}") if raw.strip() else ""
    except ConfigError as exc:
        if "not valid YAML" not in str(exc):
            raise  # hostile, not merely unquoted text
        value = raw
    return key.split("."), value


def _describe_type(err: dict) -> str:
    t = err.get("type", "")
    msg = err.get("msg", "")
    ctx = err.get("ctx") or {}
    if t == "extra_forbidden":
        return "unknown key"
    if t == "missing":
        return "required key is missing"
    if t.endswith("_type") or t.endswith("_parsing"):
        expected = t.replace("_parsing", "").replace("_type", "")
        expected = {
            "int": "an integer",
            "float": "a number",
            "bool": "a boolean (true/false)",
            "string": "a string",
            "list": "a list",
            "dict": "a mapping",
            "model": "a mapping",
        }.get(expected, expected)
        return f"expected {expected}"
    if t == "literal_error":
        return f"expected one of {ctx.get('expected', '')}"
    return msg[0].lower() + msg[1:] if msg else t


def _format_errors(
    exc: ValidationError,
    origin: dict[str, str],
    allowed: dict[str, list[str]],
    refs: dict[tuple, tuple[str, Any]] | None = None,
) -> str:
    lines = []
    for err in exc.errors():
        ref = (refs or {}).get(tuple(err["loc"]))
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc)
        where = "built-in defaults"
        for i in range(len(loc), 0, -1):
            cand = ".".join(loc[:i])
            if cand in origin:
                where = origin[cand]
                break
        if not dotted:  # model-level (cross-field) error
            lines.append(f"{err['msg'].removeprefix('Value error, ')}")
            continue
        desc = _describe_type(err)
        if err.get("type") == "extra_forbidden":
            parent = ".".join(loc[:-1])
            got = err.get("input")
            while isinstance(got, dict) and len(got) == 1:  # name the full key that was given
                k, got = next(iter(got.items()))
                dotted = f"{dotted}.{k}"
            close = difflib.get_close_matches(loc[-1], allowed.get(parent, []), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            desc = f"unknown key{hint}"
        got = err.get("input")
        got_s = (
            ""
            if err.get("type") in ("extra_forbidden", "missing") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        if ref is not None:  # the value came from the environment: show where, never what
            got_s = f" (from {ref[0]})"
        lines.append(f"{where}: {dotted}: {desc.removeprefix('value error, ')}{got_s}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    out = {prefix: list(model.model_fields)}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_allowed_keys(ann, f"{prefix}.{name}" if prefix else name))
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate the layered configuration.

    Args:
        path: YAML file (or None for defaults only).
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: naming the file or ``--set``, the dotted key and what was expected.
    """
    origin: dict[str, str] = {}
    merged: dict = {}
    if path is not None:
        p = Path(path)
        try:
            if p.is_file() and p.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(
                    f"{p}: {p.stat().st_size} bytes; a config file may be at most {MAX_CONFIG_BYTES}"
                )
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        data = safe_yaml_load(text, str(p))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{p}: expected a mapping of sections at the top level, got {type(data).__name__}"
            )
        lines = _line_index(text)
        file_origin: dict[str, str] = {}
        merged = _deep_merge(merged, data, file_origin, str(p))
        origin.update({k: f"{p}:{lines[k]}" if k in lines else str(p) for k in file_origin})
    merged = _merge_overrides(merged, overrides or [], origin)
    refs: dict[tuple, tuple[str, Any]] = {}
    try:
        merged = _expand_env(merged, "", refs)
    except ConfigError as exc:
        raise ConfigError(f"{path or '--set'}: {exc}") from None
    cfg = _validate(merged, origin, refs)
    cfg._env_refs = refs
    return cfg


def _merge_overrides(data: dict, overrides: list[str], origin: dict[str, str]) -> dict:
    """Layer ``dotted.key=value`` strings over ``data``, recording their origin."""
    for item in overrides:
        keys, value = _parse_override(item)
        # A --set must land in a mapping: "a.b=1" where a is a scalar is an error.
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, dict) and k in node and not isinstance(node[k], dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = node.get(k, {}) if isinstance(node, dict) else {}
        upd: dict = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            upd = {k: upd}
        data = _deep_merge(data, upd, origin, f"--set {item}")
    return data


def _validate(data: dict, origin: dict[str, str], refs: dict[tuple, tuple[str, Any]] | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, _allowed_keys(Config), refs or {})) from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of ``cfg`` with ``dotted.key=value`` overrides applied and validated."""
    origin: dict[str, str] = {}
    out = _validate(_merge_overrides(cfg.model_dump(mode="json"), overrides, origin), origin, cfg._env_refs)
    out._env_refs = dict(cfg._env_refs)  # dump_config only restores those whose value is unchanged
    return out


def _with_references(data: Any, refs: dict[tuple, tuple[str, Any]]) -> Any:
    """``data`` with every value that came from ``${VAR}`` (and is unchanged) replaced by the reference."""
    for path, (raw, value) in refs.items():
        node = data
        for k in path[:-1]:
            if isinstance(node, dict) and k in node:
                node = node[k]
            elif isinstance(node, list) and isinstance(k, int) and k < len(node):
                node = node[k]
            else:
                node = None
                break
        last = path[-1] if path else None
        if node is None or last is None:
            continue
        if isinstance(node, dict) and last in node and node[last] == value:
            node[last] = raw
        elif isinstance(node, list) and isinstance(last, int) and last < len(node) and node[last] == value:
            node[last] = raw
    return data


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (round-trips through :func:`load_config` in the same environment).

    Values that came from ``${VAR}`` references are written as the reference, never as the value.
    """
    data = _with_references(cfg.model_dump(mode="json"), cfg._env_refs)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def save_resolved(cfg: Config, dir_url: str, storage: Any | None = None) -> str:
    """Write ``config.resolved.yaml`` under ``dir_url`` and return its URL."""
    from openimages_od.storage import Storage

    st = storage or Storage.from_config(cfg)
    url = join_url(dir_url, "config.resolved.yaml")
    st.write_bytes(url, dump_config(cfg).encode())
    return url
