"""What ``oiod report`` shows, gathered from what the stages wrote under ``output.url``.

:class:`ReportData` reads the label map, the plan, the ledger, a sample of the committed shards,
``dataset.json``, ``prepare_report.json`` and the latest ``eval/metrics-*.json`` (with its
``analysis-*.json``); anything missing is left empty so the report says which stage to run.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from openimages_od.config import Config, join_url
from openimages_od.layout import Layout
from openimages_od.storage import ObjectNotFound, Storage

__all__ = ["GRID_IMAGES", "MAX_SAMPLE_EXAMPLES", "ReportData", "text_of"]

MAX_SAMPLE_EXAMPLES = 2000  # image-size statistics read at most this many examples
GRID_IMAGES = 12


class ReportData:
    """Everything the report shows, gathered from the output folder."""

    def __init__(self, cfg: Config, st: Storage) -> None:
        self.cfg = cfg
        self.st = st
        self.names: dict[str, str] = {}
        # split -> {"boxes": mid -> boxes, "images": mid -> images with a box of it}
        self.class_counts: dict[str, dict[str, Counter[str]]] = {}
        self.boxes_per_image: dict[str, list[int]] = {}
        self.image_sizes: list[tuple[int, int]] = []
        self.failures: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.ledger_ok = 0
        self.samples: list[dict] = []
        self.prepare_report: dict | None = None
        self.plan_stats: dict | None = None
        self.dataset: dict | None = None
        self.metrics: dict | None = None
        self.metrics_url: str | None = None
        self.analysis: dict | None = None
        self.analysis_url: str | None = None

    def load(self) -> ReportData:
        """Read everything there is; missing parts stay empty (None, {} or [])."""
        self._label_map()
        self._plan()
        self._ledger()
        self._shards()
        self.prepare_report = self._json(self.cfg.output_path("prepare_report.json"))
        self.dataset = self._json(Layout.from_config(self.cfg).dataset)
        self.plan_stats = self._json(self.cfg.output_path("plan", "stats.json"))
        self._metrics()
        return self

    def _json(self, url: str) -> dict | None:
        try:
            return self.st.read_json(url)
        except ObjectNotFound:
            return None

    def _label_map(self) -> None:
        from openimages_od.openimages.labelmap import LabelMap

        try:
            lm = LabelMap.from_pbtxt(self.st.read_text(self.cfg.output_path("label_map.pbtxt")))
        except ObjectNotFound:
            return
        self.names = {c.mid: c.name for c in lm}

    def _plan(self) -> None:
        import pyarrow.compute as pc

        from openimages_od.openimages.planio import read_manifest, read_plan_table

        plan_url = self.cfg.output_path("plan")
        try:
            manifest = read_manifest(self.st, plan_url)
        except ObjectNotFound:
            return
        for split, sm in manifest.splits.items():
            boxes_c: Counter = Counter()
            images_c: Counter = Counter()
            per_image: list[int] = []
            for rel in sm.shards:
                t = read_plan_table(self.st, join_url(plan_url, rel), columns=["image_id", "boxes"])
                col = t.column("boxes")
                per_image.extend(pc.list_value_length(col).to_pylist())
                flat = pc.list_flatten(col)
                if len(flat):
                    mids = pc.struct_field(flat, "mid")
                    for row in pc.value_counts(mids).to_pylist():
                        boxes_c[row["values"]] += row["counts"]
                    parent = pc.list_parent_indices(col)
                    pairs = set(zip(parent.to_pylist(), mids.to_pylist()))
                    images_c.update(m for _, m in pairs)
            self.class_counts[split] = {"boxes": boxes_c, "images": images_c}
            self.boxes_per_image[split] = per_image

    def _ledger(self) -> None:
        for obj in self.st.list(self.cfg.output_path("ledger") + "/"):
            if not obj.url.endswith(".jsonl"):
                continue
            for line in self.st.read_text(obj.url).splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("status") == "ok":
                    self.ledger_ok += 1
                    self.sources[str(rec.get("source") or "?")] += 1
                else:
                    reason = rec.get("reason") or rec.get("error") or "unknown"
                    self.failures[str(reason).split(":")[0][:60]] += 1

    def _shards(self) -> None:
        from openimages_od.pipeline.example import decode_example
        from openimages_od.pipeline.writers import resolve_writer

        seen = 0
        layout = Layout.from_config(self.cfg)
        lock = self._json(layout.dataset)
        if lock:  # exactly the shards of the dataset (never a stale shard of another plan)
            writer = resolve_writer(lock.get("shard_format", "tfrecord"))
            shard_urls = [
                layout.path(sh.get("file") or sh["tfrecord"])
                for sd in lock.get("splits", {}).values()
                for sh in sd["shards"]
            ]
        else:
            writer = resolve_writer(layout.shard_format)
            ext = f".{writer.extension}"
            shard_urls = [
                o.url
                for o in self.st.list(self.cfg.output_path("tfrecords") + "/")
                if o.url.endswith(ext) and self.st.exists(o.url[: -len(ext)] + ".stats.json")
            ]
        # Spread samples over splits: validation/test first (they matter for evaluation), then train.
        shard_urls.sort(key=lambda u: ("/train/" in u, u))
        keys = [
            "image/encoded",
            "image/width",
            "image/height",
            "image/filename",
            "image/object/bbox/xmin",
            "image/object/bbox/xmax",
            "image/object/bbox/ymin",
            "image/object/bbox/ymax",
            "image/object/class/text",
            "image/object/group_of",
        ]
        for url in shard_urls:
            if seen >= MAX_SAMPLE_EXAMPLES:
                break
            for sample in writer.read(self.st.read_bytes(url), url):
                ex = decode_example(sample.example, keys)
                w = int(ex["image/width"][0])
                h = int(ex["image/height"][0])
                self.image_sizes.append((w, h))
                if len(self.samples) < GRID_IMAGES and (
                    len(self.samples) < GRID_IMAGES // 2 or "/train/" in url
                ):
                    self.samples.append(
                        {
                            "jpeg": bytes(ex["image/encoded"][0]),
                            "id": text_of(ex["image/filename"][0]),
                            "split": url.rsplit("/", 2)[-2],
                            "boxes": list(
                                zip(
                                    ex.get("image/object/bbox/xmin", ()),
                                    ex.get("image/object/bbox/ymin", ()),
                                    ex.get("image/object/bbox/xmax", ()),
                                    ex.get("image/object/bbox/ymax", ()),
                                    [text_of(t) for t in ex.get("image/object/class/text", ())],
                                    # == 1 only: the shards write -1 for "unknown"
                                    [g == 1 for g in ex.get("image/object/group_of", ())] or [False] * 999,
                                )
                            ),
                        }
                    )
                seen += 1
                if seen >= MAX_SAMPLE_EXAMPLES:
                    break

    def _metrics(self) -> None:
        found = []
        for o in self.st.list(self.cfg.output_path("eval") + "/"):
            name = o.url.rsplit("/", 1)[-1]
            if name.startswith("metrics-") and name.endswith(".json"):
                try:
                    found.append((int(name[len("metrics-") : -len(".json")]), o.url))
                except ValueError:
                    continue
        if found:
            step, self.metrics_url = max(found)
            self.metrics = self.st.read_json(self.metrics_url)
            url = self.cfg.output_path("eval", f"analysis-{step}.json")
            self.analysis = self._json(url)
            self.analysis_url = url if self.analysis else None


def text_of(v: Any) -> str:
    """A TFRecord bytes feature (or anything else) as text."""
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)
