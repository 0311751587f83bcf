# Over 400 lines: one artifact's contract (shard states, orphans, the dataset.json lockfile, `oiod status`) read together.
"""The dataset as a versioned artifact: which shards belong to the current plan, the lockfile, ``oiod status``.

* :func:`scan` sorts the current plan's shards into committed / stale / missing
  by the commit rule of :mod:`openimages_od.layout`.
* :func:`remove_orphans` deletes shard, stats and ledger files that no shard of
  the current plan has (other shard counts, splits no longer planned).
* ``dataset.json`` (:func:`write_dataset`), written by prepare when every shard
  is committed: plan digest, label map digest, image settings, and every shard
  with its size, record count and sha256, plus ``digest``, which names the
  whole thing. ``train`` copies it into the model directory, ``export`` names
  it in ``model.json``, ``evaluate`` in its metrics.
* :func:`dataset_shards` is what train and evaluate read through: exactly the
  shards ``dataset.json`` lists, and only while it matches the current plan and
  label map.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from openimages_od.config import Config
from openimages_od.errors import ConfigError, DataError
from openimages_od.layout import (
    DEFAULT_FORMAT,
    Layout,
    ShardSpec,
    combine,
    image_digest,
    image_settings,
    is_current,
    shard_file_bytes,
    shard_file_sha256,
    text_digest,
)
from openimages_od.openimages.planio import PlanManifest, read_manifest
from openimages_od.storage import ObjectNotFound, Storage
from openimages_od.storage_setup import storage_from_config

__all__ = [
    "ShardState",
    "build_dataset",
    "check_image_settings",
    "dataset_shards",
    "dataset_summary",
    "orphans",
    "read_dataset",
    "remove_orphans",
    "run_status",
    "scan",
    "status",
    "verify_files",
    "write_dataset",
]

log = logging.getLogger(__name__)

DATASET_FORMAT = 1


@dataclass
class ShardState:
    spec: ShardSpec
    state: str  # committed | stale | missing
    stats: dict[str, Any] | None = None


def load_manifest(layout: Layout, storage: Storage) -> PlanManifest | None:
    try:
        return read_manifest(storage, layout.plan_dir)
    except ObjectNotFound:
        return None


def check_image_settings(cfg: Config, manifest: PlanManifest) -> None:
    """The image settings the plan was made with must be the ones prepare uses (they change every byte)."""
    if not manifest.image_settings:
        return
    now = image_settings(cfg.image)
    diff = {
        k: (manifest.image_settings.get(k), now.get(k))
        for k in sorted(set(now) | set(manifest.image_settings))
        if manifest.image_settings.get(k) != now.get(k)
    }
    if diff:
        shown = ", ".join(f"image.{k}: {a!r} in the plan, {b!r} now" for k, (a, b) in diff.items())
        raise ConfigError(
            f"the image settings changed since `oiod plan` ({shown}); run `oiod plan` again "
            f"(cheap: the plan records them because they change every shard's bytes)"
        )


def scan(
    cfg: Config, storage: Storage, manifest: PlanManifest, splits: set[str] | None = None
) -> list[ShardState]:
    """Every shard of the plan (optionally only ``splits``) with its state. One listing per split."""
    layout = Layout.from_config(cfg)
    specs = layout.shard_specs(manifest, image_digest(cfg.image), splits)
    present: dict[str, set[str]] = {}
    out: list[ShardState] = []
    for spec in specs:
        if spec.split not in present:
            present[spec.split] = set(layout.shard_files(storage, spec.split))
        if spec.stats not in present[spec.split]:
            out.append(ShardState(spec, "missing"))
            continue
        try:
            stats = storage.read_json(spec.stats)
        except (ObjectNotFound, ValueError):
            out.append(ShardState(spec, "missing"))
            continue
        out.append(ShardState(spec, "committed" if is_current(stats, spec.key) else "stale", stats))
    return out


def orphans(cfg: Config, storage: Storage, manifest: PlanManifest) -> list[str]:
    """Files under ``tfrecords/`` and ``ledger/`` that belong to no shard of the plan."""
    layout = Layout.from_config(cfg)
    keep = set()
    for spec in layout.shard_specs(manifest, ""):
        keep |= {spec.file, spec.stats, spec.ledger}
    from openimages_od.pipeline.writers import WRITERS, resolve_writer

    # Shard files of any registered format (a format switch leaves the old one's files behind).
    suffixes = {f".{resolve_writer(n).extension}" for n in WRITERS} | {f".{layout.shard_extension}"}
    out = []
    for prefix in (layout.tfrecords_dir() + "/", layout.ledger_dir() + "/"):
        try:
            objs = storage.list(prefix)
        except FileNotFoundError:
            continue
        for o in objs:
            if o.url in keep or o.url.endswith("config.resolved.yaml"):
                continue
            if o.url.endswith((*sorted(suffixes), ".stats.json", ".jsonl")):
                out.append(o.url)
    return out


def remove_orphans(cfg: Config, storage: Storage, manifest: PlanManifest) -> list[str]:
    """Delete :func:`orphans`, stats first (so a half-removed shard is never "committed")."""
    urls = sorted(orphans(cfg, storage, manifest), key=lambda u: (not u.endswith(".stats.json"), u))
    for u in urls:
        storage.delete(u)
    if urls:
        log.info("removed %d files of shards that are not in the current plan", len(urls))
    return urls


# --------------------------------------------------------------------------- the lockfile


def build_dataset(cfg: Config, manifest: PlanManifest, states: list[ShardState]) -> dict[str, Any]:
    """The ``dataset.json`` document for the splits whose shards are all committed."""
    layout = Layout.from_config(cfg)
    by_split: dict[str, list[ShardState]] = {}
    for s in states:
        by_split.setdefault(s.spec.split, []).append(s)
    splits: dict[str, Any] = {}
    for split, ss in sorted(by_split.items()):
        if any(s.state != "committed" for s in ss):
            continue
        shards = []
        for s in sorted(ss, key=lambda s: s.spec.index):
            st = s.stats or {}
            entry = {
                "name": s.spec.name,
                "file": layout.relative(s.spec.file),
                "records": int(st.get("records", st.get("ok", 0))),
                "bytes": shard_file_bytes(st),
                "sha256": shard_file_sha256(st),
                "shard_key": s.spec.key,
            }
            if layout.shard_format == DEFAULT_FORMAT:
                entry["tfrecord"] = entry["file"]  # the key readers of format-1 lockfiles use
            shards.append(entry)
        splits[split] = {
            "num_shards": len(shards),
            "images": sum(int((s.stats or {}).get("images", 0)) for s in ss),
            "records": sum(sh["records"] for sh in shards),
            "failed": sum(int((s.stats or {}).get("failed", 0)) for s in ss),
            "boxes": sum(int((s.stats or {}).get("boxes", 0)) for s in ss),
            "shards": shards,
        }
    settings = image_settings(cfg.image)
    body = {
        "format": DATASET_FORMAT,
        "plan_digest": manifest.digest,
        "label_map": "label_map.pbtxt",
        "label_map_digest": manifest.label_map_digest,
        "num_classes": manifest.num_classes,
        "removed_classes": manifest.removed_classes,
        "image_settings": settings,
        "shard_format": layout.shard_format,
        "splits": splits,
    }
    body["digest"] = combine(
        "dataset",
        manifest.digest,
        manifest.label_map_digest,
        settings,
        [[k, [sh["name"], sh["sha256"]]] for k, v in splits.items() for sh in v["shards"]],
    )
    return body


def write_dataset(cfg: Config, storage: Storage, doc: dict[str, Any]) -> str:
    url = Layout.from_config(cfg).dataset
    storage.write_json(url, doc)
    return url


def read_dataset(layout: Layout, storage: Storage, what: str = "") -> dict[str, Any]:
    """``dataset.json``.

    Raises:
        DataError: it does not exist (prepare has not finished) or is not a dataset lockfile.
    """
    try:
        doc = storage.read_json(layout.dataset)
    except ObjectNotFound:
        raise DataError(
            f"no committed shards{what}: no {layout.dataset}, so the output has no complete dataset "
            f"(run `oiod prepare`; it writes dataset.json once every shard of the plan is "
            f"committed)"
        ) from None
    except ValueError as exc:
        raise DataError(f"{layout.dataset}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "digest" not in doc or "splits" not in doc:
        raise DataError(f"{layout.dataset}: not a dataset lockfile (no digest/splits)")
    return doc


def dataset_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """What a model, a metrics file or a report names: the dataset digest and what it is made of."""
    return {
        "digest": doc.get("digest"),
        "plan_digest": doc.get("plan_digest"),
        "label_map_digest": doc.get("label_map_digest"),
        "splits": {
            k: {"records": v.get("records"), "num_shards": v.get("num_shards")}
            for k, v in doc.get("splits", {}).items()
        },
    }


def dataset_shards(cfg: Config, storage: Storage, split: str) -> tuple[list[str], dict[str, Any]]:
    """The shards of ``split`` that ``dataset.json`` lists, after checking it is the current dataset.

    Returns:
        (shard URLs in order, the dataset document).

    Raises:
        DataError: no dataset.json; it belongs to another plan or label map than the output's
            current ones; the split was not prepared; a listed shard is missing or changed size.
    """
    layout = Layout.from_config(cfg)
    doc = read_dataset(layout, storage, f" for split {split!r}")
    manifest = load_manifest(layout, storage)
    if manifest is not None and manifest.digest != doc.get("plan_digest"):
        raise DataError(
            f"{layout.dataset} is of plan {str(doc.get('plan_digest'))[:12]}, but {layout.plan_manifest} is plan "
            f"{manifest.digest[:12]}: the output was re-planned since the last prepare, and its shards may carry "
            f"labels of the old plan; run `oiod prepare`"
        )
    try:
        lm_digest = text_digest(storage.read_bytes(layout.label_map_pbtxt))
    except ObjectNotFound:
        raise DataError(
            f"label map not found: {layout.label_map_pbtxt} (run `oiod plan` / `oiod prepare`)"
        ) from None
    if lm_digest != doc.get("label_map_digest"):
        raise DataError(
            f"{layout.label_map_pbtxt} is not the label map the shards in {layout.dataset} were written with "
            f"(digest {lm_digest[:12]} vs {str(doc.get('label_map_digest'))[:12]}): their class ids would be "
            f"read with the wrong names; run `oiod prepare` (after `oiod plan`)"
        )
    fmt = doc.get("shard_format", DEFAULT_FORMAT)
    if fmt != DEFAULT_FORMAT:
        # Train and evaluate read tf.Examples from TFRecord files only; fail before any TF work.
        raise DataError(
            f"{layout.dataset}: the shards are in format {fmt!r} (shards.format), but train and evaluate read "
            f"TFRecord shards only; prepare with shards.format=tfrecord (into another output.url to keep "
            f"these shards)"
        )
    sd = doc["splits"].get(split)
    if not sd or not sd.get("shards"):
        raise DataError(
            f"no committed shards for split {split!r} in {layout.dataset} (prepared: "
            f"{sorted(doc['splits']) or 'none'}); plan and prepare it first"
        )
    sizes = layout.shard_files(storage, split)
    urls = []
    for sh in sd["shards"]:
        url = layout.path(sh.get("file") or sh["tfrecord"])
        if url not in sizes:
            raise DataError(f"{url} is listed in {layout.dataset} but missing; run `oiod prepare`")
        if sizes[url] != int(sh["bytes"]):
            raise DataError(
                f"{url} has {sizes[url]} bytes, {layout.dataset} says {sh['bytes']}: it was "
                f"rewritten since (a prepare in progress?); run `oiod prepare`"
            )
        urls.append(url)
    return urls, doc


def verify_files(files: list[str], doc: dict[str, Any], split: str, threads: int = 4) -> None:
    """Check local copies of a split's shards against the sha256 in ``dataset.json`` (same order).

    Raises:
        DataError: a file's content differs from what the lockfile names.
    """
    shards = doc["splits"][split]["shards"]

    def sha(path: str) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                h.update(block)
        return h.hexdigest()

    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        got = list(pool.map(sha, files))
    for path, sh, digest in zip(files, shards, got):
        if digest != sh["sha256"]:
            raise DataError(
                f"{path}: sha256 {digest[:12]} is not {sh['sha256'][:12]} as dataset.json lists "
                f"for {sh['name']}: the shard changed since prepare; run `oiod prepare`"
            )


# --------------------------------------------------------------------------- oiod status


def status(cfg: Config, storage: Storage | None = None) -> dict[str, Any]:
    """Plan vs output: shards by state, the image cache, what the next prepare would fetch.

    ``up_to_date`` is true when a plan exists, every shard of it is committed and
    ``dataset.json`` is the dataset of this plan.
    """
    storage = storage or storage_from_config(cfg)
    layout = Layout.from_config(cfg)
    manifest = load_manifest(layout, storage)
    out: dict[str, Any] = {
        "output": layout.root,
        "shard_format": layout.shard_format,
        "plan": None,
        "up_to_date": False,
    }
    if manifest is None:
        out["next"] = "oiod plan (no plan yet)"
        return out
    from openimages_od.openimages.plan import config_digest

    out["plan"] = {
        "digest": manifest.digest,
        "label_map_digest": manifest.label_map_digest,
        "num_classes": manifest.num_classes,
        "removed_classes": manifest.removed_classes,
        "matches_config": manifest.config_digest == config_digest(cfg),
        "splits": {k: {"images": v.num_images, "shards": v.num_shards} for k, v in manifest.splits.items()},
    }
    states = scan(cfg, storage, manifest)
    counts = {k: sum(1 for s in states if s.state == k) for k in ("committed", "stale", "missing")}
    counts["with_failed_images"] = sum(
        1 for s in states if s.state == "committed" and (s.stats or {}).get("failed")
    )
    report = _json_or_none(storage, layout.prepare_report) or {}
    counts["failed_last_run"] = len(report.get("failed_shards", {}))
    out["shards"] = counts
    out["shards_by_split"] = {}
    for s in states:
        d = out["shards_by_split"].setdefault(s.spec.split, {"committed": [], "stale": [], "missing": []})
        d[s.state].append(s.spec.name)
    out["orphans"] = len(orphans(cfg, storage, manifest))
    todo = [s for s in states if s.state != "committed"]
    cache_info: dict[str, Any] = {"enabled": cfg.output.image_cache}
    if cfg.output.image_cache:
        from openimages_od.pipeline.cache import ImageCache

        cache = ImageCache(storage, layout, image_digest(cfg.image))
        cached = cache.present()
        cache_info.update(url=layout.image_cache_dir(cache.digest), images=len(cached))
    else:
        cached = set()
    to_build = 0
    to_fetch = 0
    for s in todo:
        ids = _plan_ids(storage, s.spec.plan_url)
        to_build += len(ids)
        to_fetch += sum(1 for i in ids if i not in cached)
    done = [s.stats or {} for s in states if s.state == "committed"]
    cache_info["hits_in_committed_shards"] = sum(int(st.get("cache_hits", 0)) for st in done)
    cache_info["source_fetches_in_committed_shards"] = sum(int(st.get("source_fetches", 0)) for st in done)
    out["cache"] = cache_info
    out["next_prepare"] = {
        "shards": len(todo),
        "images": to_build,
        "fetch_from_source": to_fetch,
        "from_cache": to_build - to_fetch,
    }
    ds = _json_or_none(storage, layout.dataset)
    out["dataset"] = (
        {
            "digest": ds.get("digest"),
            "shard_format": ds.get("shard_format", DEFAULT_FORMAT),
            "current": ds.get("plan_digest") == manifest.digest
            and ds.get("label_map_digest") == manifest.label_map_digest,
        }
        if ds
        else None
    )
    out["up_to_date"] = bool(not todo and ds and out["dataset"]["current"] and out["orphans"] == 0)
    if not out["plan"]["matches_config"]:
        out["next"] = "oiod plan (the config's source/selection/shards changed since the plan was made)"
    elif not out["up_to_date"]:
        out["next"] = "oiod prepare"
    return out


def _json_or_none(storage: Storage, url: str) -> dict | None:
    try:
        return storage.read_json(url)
    except (ObjectNotFound, ValueError):
        return None


def _plan_ids(storage: Storage, url: str) -> list[str]:
    from openimages_od.openimages.planio import read_plan_table

    try:
        return read_plan_table(storage, url, columns=["image_id"]).column("image_id").to_pylist()
    except ObjectNotFound:
        return []


def run_status(cfg: Config, json_out: bool = False) -> int:
    """``oiod status``: print :func:`status`; exit 0 when the output is up to date with the plan, else 1."""
    s = status(cfg)
    if json_out:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0 if s["up_to_date"] else 1
    p = print
    p(f"output   {s['output']}  (shards.format {s['shard_format']})")
    if s["plan"] is None:
        p("plan     none")
        p(f"next     {s['next']}")
        return 1
    pl = s["plan"]
    p(
        f"plan     {pl['digest'][:12]}  {pl['num_classes']} classes (label map {pl['label_map_digest'][:12]})  "
        + ", ".join(
            f"{k}: {v['images']} images / {v['shards']} shards" for k, v in sorted(pl["splits"].items())
        )
        + ("" if pl["matches_config"] else "  [config changed since]")
    )
    if pl["removed_classes"]:
        rc = pl["removed_classes"]
        p(
            f"removed  {len(rc)} class{'es' if len(rc) != 1 else ''}, ids retired: "
            + ", ".join(f"{r['id']}={r['name']}" for r in rc[:8])
            + (f", ... ({len(rc) - 8} more)" if len(rc) > 8 else "")
        )
    sh = s["shards"]
    p(
        f"shards   {sh['committed']} committed, {sh['stale']} stale (another plan), {sh['missing']} missing, "
        f"{sh['failed_last_run']} failed in the last run, {sh['with_failed_images']} with failed images; "
        f"{s['orphans']} orphan files"
    )
    c = s["cache"]
    if c["enabled"]:
        p(
            f"cache    {c['images']} images at {c['url']}; committed shards: {c['hits_in_committed_shards']} from "
            f"cache, {c['source_fetches_in_committed_shards']} fetched"
        )
    else:
        p("cache    off (output.image_cache: false)")
    n = s["next_prepare"]
    p(
        f"prepare  would build {n['shards']} shards / {n['images']} images: {n['fetch_from_source']} fetched from "
        f"the source, {n['from_cache']} from the cache"
    )
    ds = s["dataset"]
    p(
        f"dataset  {'none' if not ds else ds['digest'][:12] + (' (current)' if ds['current'] else ' (of another plan)')}"
        + (f"  format {ds['shard_format']}" if ds else "")
    )
    p("status   up to date" if s["up_to_date"] else f"next     {s['next']}")
    sys.stdout.flush()
    return 0 if s["up_to_date"] else 1
