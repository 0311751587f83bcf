"""``oiod status``: the plan against the output, and what the next prepare would do.

:func:`status` reads the plan manifest, sorts its shards by state (:func:`openimages_od.dataset.scan`),
counts orphan files and the image cache, and says whether ``dataset.json`` is the dataset of
the current plan; :func:`run_status` prints it (or its JSON) and exits 0 only when up to date.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from openimages_od.config import Config
from openimages_od.dataset import load_manifest, orphans, scan
from openimages_od.layout import Layout, image_digest
from openimages_od.storage import ObjectNotFound, Storage

__all__ = ["run_status", "status"]


def status(cfg: Config, storage: Storage | None = None) -> dict[str, Any]:
    """Plan vs output: shards by state, the image cache, what the next prepare would fetch.

    ``up_to_date`` is true when a plan exists, every shard of it is committed and
    ``dataset.json`` is the dataset of this plan.
    """
    storage = storage or Storage.from_config(cfg)
    layout = Layout.from_config(cfg)
    manifest = load_manifest(layout, storage)
    out: dict[str, Any] = {"output": layout.root, "plan": None, "up_to_date": False}
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
    p(f"output   {s['output']}")
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
    )
    p("status   up to date" if s["up_to_date"] else f"next     {s['next']}")
    sys.stdout.flush()
    return 0 if s["up_to_date"] else 1
