"""``oiod plan``: Open Images metadata -> label map + deterministic shard plan.

The plan of the whole output, under the output lock: load and resolve the classes
(:mod:`~openimages_od.openimages.selection`), give them stable label-map ids
(:func:`~openimages_od.openimages.labelmap.assign_ids`), plan each split
(:func:`~openimages_od.openimages.splitplan.plan_split`: read boxes, select, group, cap,
join the image index, write Parquet shards), then write the label map, the stats, the
resolved config and, last, the manifest (a plan without one is not done).

Where the work is:

- :mod:`~openimages_od.openimages.inputs`: metadata URLs to local files (remote ones cached);
- :mod:`~openimages_od.openimages.readboxes`, :mod:`~openimages_od.openimages.readimages`:
  the CSV readers and row validation;
- :mod:`~openimages_od.openimages.selection`: classes, filters, grouping, caps;
- :mod:`~openimages_od.openimages.planwrite`: shard assignment and the Parquet writes;
- :mod:`~openimages_od.openimages.idkeys`: ImageID integer keys, set membership, seeded rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from openimages_od.config import Config, join_url, save_resolved
from openimages_od.errors import ConfigError
from openimages_od.layout import Layout, image_settings
from openimages_od.openimages import idhash, jit, linescan, planio
from openimages_od.openimages.idlist import load_image_ids
from openimages_od.openimages.inputs import MetadataInputs
from openimages_od.openimages.labelmap import LabelMap, assign_ids
from openimages_od.openimages.selection import ClassInfo, load_classes
from openimages_od.openimages.splitplan import plan_split
from openimages_od.outputlock import output_lock
from openimages_od.storage import Storage, local_path
from openimages_od.storage_setup import storage_from_config

log = logging.getLogger(__name__)

__all__ = ["MetadataInputs", "PlanResult", "build_plan", "config_digest", "run_plan"]


@dataclass
class PlanResult:
    """What ``oiod plan`` wrote."""

    plan_url: str
    manifest: planio.PlanManifest
    stats: dict[str, Any]
    label_map: LabelMap
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "plan_url": self.plan_url,
            "manifest": self.manifest.to_json(),
            "seconds": round(self.seconds, 3),
        }


def config_digest(cfg: Config) -> str:
    """Digest of the config sections a plan is made from (``oiod status`` compares it)."""
    return _config_digest(cfg)


def _config_digest(cfg: Config) -> str:
    # Only what a plan is made of, and only values that differ from the defaults: a setting that
    # changes no plan row (image sources, HTTP timeouts, shards.format) or a field added by a later
    # release at its default must not mark every existing plan "config changed since".
    source = cfg.source.model_dump(mode="json", exclude_defaults=True)
    images = source.pop("images", {})
    if "key_template" in images:  # the plan's bucket_key column is made with it
        source["key_template"] = images["key_template"]
    d = {
        "source": source,
        "selection": cfg.selection.model_dump(mode="json", exclude_defaults=True),
        "images_per_shard": cfg.shards.images_per_shard,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def build_plan(cfg: Config, storage: Storage | None = None) -> PlanResult:
    """Parse the configured metadata and write the label map and the plan under ``output.url``.

    Args:
        cfg: the config (``source``, ``selection``, ``shards``, ``output``).
        storage: the storage layer (default: from the config).

    Returns:
        A :class:`PlanResult` with the manifest and the stats.

    Raises:
        ConfigError / UsageError: nothing to plan, or a bad selection (exit 2).
        DataError: an unknown file layout, or a malformed row with ``selection.strict``.
        StorageError: an input or the output cannot be reached.
    """
    # On a thread: numba's import and kernel load (~0.6 s) while the config, classes and layouts
    # load, then pandas, which pyarrow imports on its first pa.array call (~0.5 s), while the box
    # scan runs without the GIL.
    jit.warm_in_background(linescan.ensure_compiled, idhash.ensure_compiled, _import_pandas)
    st = storage or storage_from_config(cfg)
    layout = Layout.from_config(cfg)
    with output_lock(st, layout.lock, cfg.output.lock_ttl_s, "plan"):
        return _build_plan(cfg, st, layout)


def _import_pandas() -> None:
    with contextlib.suppress(ImportError):
        import pandas  # noqa: F401


def _previous_labels(
    cfg: Config, st: Storage, layout: Layout
) -> tuple[LabelMap | None, list[dict], LabelMap | None]:
    """(the output's current label map, classes retired by earlier plans, the pinned map of selection.label_map)."""
    previous: LabelMap | None = None
    retired: list[dict] = []
    try:
        previous = LabelMap.from_pbtxt(st.read_text(layout.label_map_pbtxt), layout.label_map_pbtxt)
        retired = planio.read_manifest(st, layout.plan_dir).removed_classes
    except FileNotFoundError:
        pass
    pinned = None
    if cfg.selection.label_map:
        try:
            pinned = LabelMap.from_pbtxt(st.read_text(cfg.selection.label_map), cfg.selection.label_map)
        except FileNotFoundError:
            raise ConfigError(f"selection.label_map: {cfg.selection.label_map} not found") from None
    return previous, retired, pinned


def _build_plan(cfg: Config, st: Storage, layout: Layout) -> PlanResult:
    t0 = time.monotonic()
    if not cfg.source.splits:
        raise ConfigError("source.splits is empty: configure at least one split's boxes CSV")
    splits = list(cfg.selection.splits) or list(cfg.source.splits)
    plan_url = layout.plan_dir
    inputs = MetadataInputs(cfg, st)
    ci = load_classes(cfg, inputs)
    previous, retired, pinned = _previous_labels(cfg, st, layout)
    ids = _LabelIds(ci, previous, retired, pinned, cfg.selection.label_map or "selection.label_map")
    label_map, _ = ids.assign()  # a bad pinned map fails here, before the old plan is touched
    ci.ids = np.array([label_map.by_mid[m].id for m in ci.selected], np.int32)
    image_ids = (
        load_image_ids(cfg.selection.image_ids, inputs) if cfg.selection.image_ids is not None else None
    )

    # The manifest marks a complete plan: remove it first so a half-rewritten plan is never "done".
    st.delete(layout.plan_manifest)
    split_manifests: dict[str, planio.SplitManifest] = {}
    split_stats: dict[str, Any] = {}
    for split in splits:
        sm, stats = plan_split(
            cfg, split, inputs, ci, st, plan_url, image_ids, ids.add_extra if ci.extra else None
        )
        split_manifests[split] = sm
        split_stats[split] = stats
        log.info(
            "plan %s: %d images, %d boxes, %d shards, %d malformed rows",
            split,
            sm.num_images,
            sm.num_boxes,
            sm.num_shards,
            stats["malformed_total"],
        )

    label_map, retired = ids.assign()
    _log_label_changes(previous, label_map)

    # Shards left by an earlier plan with other shard counts or splits would confuse readers.
    wanted = {join_url(plan_url, p) for sm in split_manifests.values() for p in sm.shards}
    wanted_norm = {_norm(w) for w in wanted}
    for obj in st.list(plan_url + "/"):
        if obj.url.endswith(".parquet") and _norm(obj.url) not in wanted_norm:
            st.delete(obj.url)

    st.write_text(layout.label_map_pbtxt, label_map.to_pbtxt())
    st.write_text(layout.label_map_csv, label_map.to_csv())
    stats_doc = {
        "splits": split_stats,
        "num_classes": len(label_map),
        "classes": label_map.to_json(),
        "removed_classes": retired,
    }
    if image_ids is not None:
        stats_doc["image_ids"] = image_ids.stats()
        if image_ids.matched.size and not image_ids.matched.all():
            log.warning(
                "selection.image_ids: %d of %d listed ImageIDs have no box or image-level label of the "
                "selected classes in splits %s (listed in plan/stats.json under image_ids.unmatched_ids)",
                int((~image_ids.matched).sum()),
                len(image_ids.matched),
                ", ".join(splits),
            )
    st.write_json(layout.plan_stats, stats_doc)
    save_resolved(cfg, plan_url, st)
    manifest = planio.PlanManifest(
        splits=split_manifests,
        num_classes=len(label_map),
        label_map="label_map.pbtxt",
        config_digest=_config_digest(cfg),
        label_map_digest=label_map.digest,
        removed_classes=retired,
        image_settings=image_settings(cfg.image),
    )
    planio.write_manifest(st, plan_url, manifest)
    dt = time.monotonic() - t0
    log.info(
        "plan: %d classes, %s in %.1f s -> %s",
        len(label_map),
        ", ".join(f"{s}={m.num_images} images/{m.num_boxes} boxes" for s, m in split_manifests.items()),
        dt,
        plan_url,
    )
    return PlanResult(plan_url=plan_url, manifest=manifest, stats=stats_doc, label_map=label_map, seconds=dt)


class _LabelIds:
    """Label-map ids for the plan: the selected classes', then (``keep_all_labels``) those of the
    other classes found, added split by split; a class's id never changes once given."""

    def __init__(
        self,
        ci: ClassInfo,
        previous: LabelMap | None,
        retired: list[dict],
        pinned: LabelMap | None,
        pinned_source: str,
    ) -> None:
        self.ci, self.previous, self.retired, self.pinned = ci, previous, retired, pinned
        self.pinned_source = pinned_source
        self.extra: list[str] = []

    def assign(self) -> tuple[LabelMap, list[dict]]:
        """The label map of the classes so far and the retired classes after this plan."""
        return assign_ids(
            self.ci.selected,
            self.ci.names,
            previous=self.previous,
            retired=self.retired,
            pinned=self.pinned,
            pinned_source=self.pinned_source,
            extra=self.extra,
        )

    def add_extra(self, mids: list[str]) -> dict[str, int]:
        """Ids for other classes found on a split's chosen images (new ones appended in order)."""
        known = set(self.extra)
        self.extra.extend(m for m in mids if m not in known)
        lm, _ = self.assign()
        return {m: lm.by_mid[m].id for m in mids}


def _log_label_changes(previous: LabelMap | None, label_map: LabelMap) -> None:
    if previous is None:
        return
    added = [c for c in label_map if c.mid not in previous.by_mid]
    gone = [c for c in previous if c.mid not in label_map.by_mid]
    if not (added or gone):
        return

    def few(cs: list) -> str:
        return (
            ", ".join(f"{c.id}={c.name}" for c in cs[:8])
            + (f", ... ({len(cs) - 8} more)" if len(cs) > 8 else "")
        ) or "-"

    log.info(
        "label map: %d classes kept their ids, %d added (%s), %d removed, ids retired (%s)",
        len(label_map) - len(added),
        len(added),
        few(added),
        len(gone),
        few(gone),
    )


def _norm(url: str) -> str:
    lp = local_path(url)
    return str(lp) if lp is not None else url


def run_plan(cfg: Config) -> PlanResult:
    """CLI entry point for ``oiod plan``: :func:`build_plan` with the config's storage, plus a summary line."""
    result = build_plan(cfg)
    for split, sm in result.manifest.splits.items():
        print(f"{split}: {sm.num_images} images, {sm.num_boxes} boxes, {sm.num_shards} shards")
    print(f"{result.manifest.num_classes} classes; plan written to {result.plan_url}")
    return result
