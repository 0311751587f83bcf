"""``oiod report``: one self-contained HTML file about the dataset and the model.

Reads only what the stages wrote under ``output.url`` (the plan, the shards,
the ledger, ``prepare_report.json``, ``eval/metrics-*.json``) and embeds every
chart as a PNG data URI, so the file can be mailed or opened from a bucket.

Sections: totals; class histogram per split (class imbalance is the first
thing to look at); boxes per image; image sizes; failure reasons; a grid of
sample images from the shards with their ground-truth boxes drawn (after
rotation and resizing, so coordinate bugs show at a glance); and, after
evaluation, per-class AP bars and precision-recall curves, per-class AP
against the number of training boxes, and the error analysis of
``eval/analysis-{step}.json`` (TP/FP by reason and misses per class, the
confusion matrix, the worst images per class with their boxes drawn).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections import Counter
from typing import Any

from openimages_od.config import Config, join_url
from openimages_od.layout import Layout
from openimages_od.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

MAX_SAMPLE_EXAMPLES = 2000  # image-size statistics read at most this many examples
GRID_IMAGES = 12
PALETTE = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#469990",
    "#9a6324",
    "#800000",
    "#808000",
    "#000075",
]


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class _Data:
    """Everything the report shows, gathered from the output folder."""

    def __init__(self, cfg: Config, st: Storage) -> None:
        self.cfg = cfg
        self.st = st
        self.names: dict[str, str] = {}
        self.id_to_mid: dict[int, str] = {}
        self.class_counts: dict[
            str, dict[str, Counter]
        ] = {}  # split -> {"boxes": Counter, "images": Counter}
        self.boxes_per_image: dict[str, list[int]] = {}
        self.image_sizes: list[tuple[int, int]] = []
        self.failures: Counter = Counter()
        self.sources: Counter = Counter()
        self.ledger_ok = 0
        self.samples: list[dict] = []
        self.prepare_report: dict | None = None
        self.plan_stats: dict | None = None
        self.dataset: dict | None = None
        self.metrics: dict | None = None
        self.metrics_url: str | None = None
        self.analysis: dict | None = None
        self.analysis_url: str | None = None

    def load(self) -> _Data:
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
        self.id_to_mid = {c.id: c.mid for c in lm}

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
                            "id": _s(ex["image/filename"][0]),
                            "split": url.rsplit("/", 2)[-2],
                            "boxes": list(
                                zip(
                                    ex.get("image/object/bbox/xmin", ()),
                                    ex.get("image/object/bbox/ymin", ()),
                                    ex.get("image/object/bbox/xmax", ()),
                                    ex.get("image/object/bbox/ymax", ()),
                                    [_s(t) for t in ex.get("image/object/class/text", ())],
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


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


# ------------------------------------------------------------------------------------------- charts


def _class_histogram(d: _Data, split: str) -> str:
    plt = _plt()
    counts = d.class_counts[split]
    mids = sorted(counts["boxes"], key=lambda m: -counts["boxes"][m])[:40]
    labels = [d.names.get(m, m) for m in mids]
    fig, ax = plt.subplots(figsize=(8, max(2.2, 0.32 * len(mids) + 1)))
    y = range(len(mids))
    ax.barh(
        [i + 0.2 for i in y], [counts["boxes"][m] for m in mids], height=0.4, label="boxes", color="#4363d8"
    )
    ax.barh(
        [i - 0.2 for i in y], [counts["images"][m] for m in mids], height=0.4, label="images", color="#f58231"
    )
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("count")
    ax.set_title(f"{split}: boxes and images per class" + (" (top 40)" if len(counts["boxes"]) > 40 else ""))
    ax.legend(loc="lower right")
    return _png(fig)


def _hist(values: list[int], title: str, xlabel: str, bins: Any = None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=bins or min(30, max(5, len(set(values)))), color="#3cb44b", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    return _png(fig)


def _int_bins(values: list[int]) -> list[float]:
    """One bar per integer value (bins centred on integers)."""
    lo, hi = min(values), max(values)
    step = max(1, (hi - lo + 1) // 30)
    return [x - 0.5 for x in range(lo, hi + step + 1, step)]


def _sizes_scatter(sizes: list[tuple[int, int]]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([w for w, _ in sizes], [h for _, h in sizes], s=8, alpha=0.5, color="#911eb4")
    ax.set_xlabel("width (px, in the shards)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"image sizes ({len(sizes)} examples)")
    return _png(fig)


def _bars(counter: Counter, title: str, color: str) -> str:
    plt = _plt()
    items = counter.most_common(20)
    fig, ax = plt.subplots(figsize=(7, max(2, 0.35 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v for _, v in items], color=color)
    ax.invert_yaxis()
    ax.set_title(title)
    return _png(fig)


def _draw_sample(sample: dict, names: dict[str, str]) -> str:
    from PIL import Image, ImageDraw

    img = Image.open(io.BytesIO(sample["jpeg"])).convert("RGB")
    draw = ImageDraw.Draw(img)
    mids = sorted({b[4] for b in sample["boxes"]})
    for x0, y0, x1, y1, mid, group in sample["boxes"]:
        color = PALETTE[mids.index(mid) % len(PALETTE)]
        box = [x0 * img.width, y0 * img.height, x1 * img.width, y1 * img.height]
        draw.rectangle(box, outline=color, width=3 if not group else 2)
        label = names.get(mid, mid) + (" (group)" if group else "")
        tw = draw.textlength(label)
        draw.rectangle([box[0], max(0, box[1] - 12), box[0] + tw + 4, max(12, box[1])], fill=color)
        draw.text((box[0] + 2, max(0, box[1] - 12)), label, fill="white")
    img.thumbnail((320, 320))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _per_class_ap(metrics: dict, names: dict[str, str]) -> tuple[str, dict[str, float]] | None:
    """Find per-class AP in the metrics JSON (Open Images metric first, then COCO)."""
    for section in ("openimages", "coco"):
        sec = metrics.get(section)
        if not isinstance(sec, dict):
            continue
        per = sec.get("per_class") or sec.get("per_class_ap")
        if isinstance(per, dict) and per:
            out = {}
            for mid, v in per.items():
                ap = v.get("ap", v.get("AP", v.get("AP50"))) if isinstance(v, dict) else v
                if isinstance(ap, (int, float)):
                    label = (v.get("name") if isinstance(v, dict) else None) or names.get(mid, mid)
                    out[label] = float(ap)
            if out:
                return section, out
    return None


def _ap_bars(section: str, per: dict[str, float]) -> str:
    plt = _plt()
    items = sorted(per.items(), key=lambda kv: -kv[1])[:40]
    fig, ax = plt.subplots(figsize=(7, max(2, 0.35 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#e6194b")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP@0.5")
    ax.set_title(f"per-class AP ({section})")
    return _png(fig)


def _pr_curves(metrics: dict, names: dict[str, str]) -> str | None:
    curves = None
    for section in ("openimages", "coco"):
        sec = metrics.get(section)
        if isinstance(sec, dict) and isinstance(sec.get("pr_curves"), dict) and sec["pr_curves"]:
            curves = sec["pr_curves"]
            break
    if curves is None and isinstance(metrics.get("pr_curves"), dict):
        curves = metrics["pr_curves"]
    if curves is None:  # per-class entries carrying their own curve (the Open Images metric does)
        for section in ("openimages", "coco"):
            per = (
                (metrics.get(section) or {}).get("per_class")
                if isinstance(metrics.get(section), dict)
                else None
            )
            if isinstance(per, dict):
                found = {
                    (v.get("name") or k): v["pr_curve"]
                    for k, v in per.items()
                    if isinstance(v, dict) and isinstance(v.get("pr_curve"), dict)
                }
                if found:
                    curves = found
                    break
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (mid, c) in enumerate(sorted(curves.items())[:12]):
        r, p = c.get("recall", []), c.get("precision", [])
        if r and p:
            ax.plot(r, p, label=names.get(mid, mid), color=PALETTE[i % len(PALETTE)])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall at IoU 0.5")
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def _ap_vs_frequency(
    metrics: dict, train_boxes: dict[str, int]
) -> tuple[str, list[tuple[str, int, float]]] | None:
    """Scatter of per-class AP against training boxes (log x): does AP follow frequency?"""
    per = ((metrics.get("openimages") or {}).get("per_class") or {}) if isinstance(metrics, dict) else {}
    points = [
        (v["name"], train_boxes[v["name"]], float(v["ap"]))
        for v in per.values()
        if isinstance(v, dict) and v.get("ap") is not None and v.get("name") in train_boxes
    ]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([max(1, b) for _, b, _ in points], [a for _, _, a in points], color="#4363d8")
    for name, b, a in points[:40]:
        ax.annotate(name, (max(1, b), a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training boxes (log)")
    ax.set_ylabel("AP@0.5 (Open Images)")
    ax.set_title("per-class AP vs training box count")
    return _png(fig), sorted(points, key=lambda p: p[1])


def _error_analysis_html(a: dict, url: str | None) -> list[str]:
    parts = [
        f"<h2 id='errors'>Error analysis</h2><p class='muted'>Predictions with score &ge; "
        f"{a.get('min_score')} at IoU {a.get('iou_threshold')}: each is a true positive or a false positive "
        f"for one reason (<b>localisation</b>: right class, IoU in [{a.get('loc_iou')}, "
        f"{a.get('iou_threshold')}); <b>wrong class</b>: on an object of another class (IoU &ge; the threshold, "
        f"or &ge; {a.get('loc_iou')} when nothing of its class is near); <b>duplicate</b>: "
        f"the object was already found; <b>background</b>: nothing there). Every prediction and miss is in "
        f"<code>{html.escape((url or '').replace('analysis-', 'outcomes-').replace('.json', '.csv'))}</code>."
        f"</p>"
    ]
    rows = []
    for v in (a.get("per_class") or {}).values():
        rows.append(
            (
                v["name"],
                v["gt"],
                v["tp"],
                v["fp"],
                v["localisation"],
                v["wrong_class"],
                v["duplicate"],
                v["background"],
                v["missed"],
                "-" if v["precision"] is None else f"{v['precision']:.3f}",
                "-" if v["recall"] is None else f"{v['recall']:.3f}",
            )
        )
    t = a.get("totals") or {}
    if t:
        fp = sum(t.get(k, 0) for k in ("localisation", "wrong_class", "duplicate", "background"))
        rows.append(
            (
                "all",
                t.get("gt", 0),
                t.get("tp", 0),
                fp,
                t.get("localisation", 0),
                t.get("wrong_class", 0),
                t.get("duplicate", 0),
                t.get("background", 0),
                t.get("missed", 0),
                "",
                "",
            )
        )
    parts.append(
        "<div id='error-table'>"
        + _table(
            rows,
            (
                "class",
                "ground truth",
                "TP",
                "FP",
                "FP localisation",
                "FP wrong class",
                "FP duplicate",
                "FP background",
                "missed",
                "precision",
                "recall",
            ),
        )
        + "</div>"
    )
    conf = a.get("confusion") or {}
    if conf.get("matrix"):
        m = conf["matrix"]
        peak = max([max(r) for r in m] + [1])
        head = "<th>ground truth \\ predicted</th>" + "".join(
            f"<th>{html.escape(c)}</th>" for c in conf["cols"]
        )
        body = []
        for name, row in zip(conf["rows"], m):
            cells = "".join(
                f"<td class='cm' style='background:rgba(67,99,216,{0.08 + 0.8 * v / peak:.2f})'>{v}</td>"
                for v in row
            )
            body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
        parts.append(
            "<h3 id='confusion'>Confusion matrix</h3><p class='muted'>"
            + html.escape(conf.get("note", ""))
            + f"</p><table id='confusion-matrix'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table>"
        )
    worst = a.get("worst_images") or {}
    if any(worst.values()):
        parts.append(
            "<h3 id='worst'>Worst images per class</h3><p class='muted'>Most false positives plus misses "
            "of the class. Green: ground truth (orange: missed); blue: true positive; red: false positive "
            "with its reason.</p><div class='sample-grid' id='worst-images'>"
        )
        for items in worst.values():
            for w in items:
                if not w.get("image"):
                    continue
                fps = sum(1 for d in w.get("detections", []) if d.get("outcome") != "tp")
                parts.append(
                    f"<figure><img src='{w['image']}' alt='worst {html.escape(w['class'])} "
                    f"{html.escape(w['image_id'])}'><figcaption>{html.escape(w['class'])} &middot; "
                    f"{html.escape(w['image_id'])} &middot; {fps} FP, {len(w.get('missed', []))} missed"
                    "</figcaption></figure>"
                )
        parts.append("</div>")
    return parts


# ------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #eee;padding-bottom:.3rem;margin-top:2.2rem}
.muted{color:#777} table{border-collapse:collapse;margin:.5rem 0} td,th{padding:.25rem .7rem;border-bottom:1px solid #eee;text-align:left}
th{background:#fafafa} .charts{display:flex;flex-wrap:wrap;gap:1rem} .chart{max-width:100%;border:1px solid #eee}
.sample-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:.8rem}
.sample-grid figure{margin:0;border:1px solid #eee;padding:.3rem} .sample-grid img{width:100%}
.sample-grid figcaption{font-size:.8rem;color:#555;word-break:break-all}
td.cm{text-align:right;min-width:2.5rem}
"""


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(src: str, alt: str) -> str:
    return f'<img class="chart" src="{src}" alt="{html.escape(alt)}">'


def build_report(cfg: Config, storage: Storage | None = None) -> str:
    """Render the report HTML for the output folder of ``cfg``."""
    st = storage or Storage.from_config(cfg)
    d = _Data(cfg, st).load()
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>openimages-od report</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>openimages-od report</h1>",
        f"<p class='muted'>{html.escape(cfg.output_root)} &middot; generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p>",
    ]

    # Totals
    parts.append("<h2 id='totals'>Totals</h2>")
    rows = []
    for split, c in d.class_counts.items():
        rows.append((split, len(d.boxes_per_image.get(split, [])), sum(c["boxes"].values()), len(c["boxes"])))
    if rows:
        parts.append(_table(rows, ("split", "images planned", "boxes", "classes with boxes")))
    else:
        parts.append("<p>No plan found (run <code>oiod plan</code>).</p>")
    if d.ledger_ok or d.failures:
        total = d.ledger_ok + sum(d.failures.values())
        parts.append(
            _table(
                [
                    ("images written", d.ledger_ok),
                    ("images failed", sum(d.failures.values())),
                    ("success rate", f"{d.ledger_ok / max(1, total):.1%}"),
                ],
                ("prepare", ""),
            )
        )
    if d.dataset:
        rows = [
            ("dataset digest", d.dataset.get("digest", "?")),
            ("plan digest", d.dataset.get("plan_digest", "?")),
            ("label map digest", d.dataset.get("label_map_digest", "?")),
        ]
        scored = (d.metrics or {}).get("dataset") or {}
        if scored.get("digest") and scored["digest"] != d.dataset.get("digest"):
            rows.append(("evaluation scored dataset", f"{scored['digest']} (not the current one)"))
        parts.append(_table(rows, ("dataset.json", "")))
    if d.prepare_report:
        tot = d.prepare_report.get("totals", {})
        run = d.prepare_report.get("this_run", {})
        rows = [
            (k, tot[k]) for k in ("shards", "images", "ok", "failed", "boxes", "kept_original") if k in tot
        ]
        if "bytes_fetched" in tot:
            rows.append(("MB fetched", f"{tot['bytes_fetched'] / 1e6:.1f}"))
        if "file_bytes" in tot or "tfrecord_bytes" in tot:
            rows.append(("MB of shards", f"{tot.get('file_bytes', tot.get('tfrecord_bytes', 0)) / 1e6:.1f}"))
        if "images_per_s" in run:
            rows.append(("last run: images/s (wall, incl. start-up)", run["images_per_s"]))
        if rows:
            parts.append(_table(rows, ("prepare_report.json", "")))

    # Class balance
    if d.class_counts:
        parts.append(
            "<h2 id='classes'>Class balance per split</h2><p class='muted'>Class imbalance is the first "
            "thing to check: rare classes get few boxes to learn from.</p><div class='charts'>"
        )
        parts.extend(_img(_class_histogram(d, s), f"class histogram {s}") for s in d.class_counts)
        parts.append("</div>")
        parts.append("<h2 id='boxes'>Boxes per image</h2><div class='charts'>")
        parts.extend(
            _img(_hist(v, f"{s}: boxes per image", "boxes", bins=_int_bins(v)), f"boxes per image {s}")
            for s, v in d.boxes_per_image.items()
            if v
        )
        parts.append("</div>")
    if d.image_sizes:
        parts.append("<h2 id='sizes'>Image sizes</h2><div class='charts'>")
        parts.append(_img(_sizes_scatter(d.image_sizes), "image sizes"))
        parts.append(
            _img(_hist([max(w, h) for w, h in d.image_sizes], "longest side", "pixels"), "longest side")
        )
        parts.append("</div>")

    parts.append("<h2 id='failures'>Failures and sources</h2>")
    if d.failures or d.sources:
        parts.append("<div class='charts'>")
        if d.failures:
            parts.append(_img(_bars(d.failures, "failed images by reason", "#e6194b"), "failure reasons"))
        if d.sources:
            parts.append(_img(_bars(d.sources, "images by source used", "#42d4f4"), "sources"))
        parts.append("</div>")
        if d.failures:
            parts.append(_table(d.failures.most_common(), ("reason", "images")))
    else:
        parts.append("<p>No ledger found (run <code>oiod prepare</code>).</p>")

    parts.append(
        "<h2 id='samples'>Sample images with ground-truth boxes</h2><p class='muted'>Decoded from the "
        "TFRecord shards, i.e. after rotation and resizing: boxes must sit on their objects.</p>"
    )
    if d.samples:
        parts.append("<div class='sample-grid'>")
        for s in d.samples:
            parts.append(
                f"<figure><img src='{_draw_sample(s, d.names)}' alt='sample {html.escape(s['id'])}'>"
                f"<figcaption>{html.escape(s['split'])} &middot; {html.escape(s['id'])} &middot; "
                f"{len(s['boxes'])} boxes</figcaption></figure>"
            )
        parts.append("</div>")
    else:
        parts.append("<p>No committed shards found.</p>")

    parts.append("<h2 id='evaluation'>Evaluation</h2>")
    if d.metrics:
        parts.append(f"<p class='muted'>{html.escape(d.metrics_url or '')}</p>")
        headline = []
        for section in ("coco", "openimages"):
            sec = d.metrics.get(section)
            if isinstance(sec, dict):
                headline.extend(
                    (section, k, f"{v:.4f}") for k, v in sec.items() if isinstance(v, (int, float))
                )
        if headline:
            parts.append(_table(headline, ("metric set", "metric", "value")))
        parts.append("<div class='charts'>")
        per = _per_class_ap(d.metrics, d.names)
        if per:
            parts.append(_img(_ap_bars(*per), "per-class AP"))
        pr = _pr_curves(d.metrics, d.names)
        if pr:
            parts.append(_img(pr, "precision-recall curves"))
        train_boxes = {
            d.names.get(m, m): n
            for m, n in (d.class_counts.get(d.cfg.train.split) or {}).get("boxes", {}).items()
        }
        freq = _ap_vs_frequency(d.metrics, train_boxes)
        parts.append("</div>")
        if freq:
            png, points = freq
            parts.append(
                "<h3 id='ap-vs-frequency'>Per-class AP vs training boxes</h3><div class='charts'>"
                + _img(png, "AP vs training boxes")
                + "</div>"
            )
            parts.append(
                _table([(n, b, f"{a:.4f}") for n, b, a in points], ("class", "training boxes", "AP@0.5"))
            )
        if d.analysis:
            parts.extend(_error_analysis_html(d.analysis, d.analysis_url))
    else:
        parts.append("<p>No evaluation yet (run <code>oiod evaluate</code>).</p>")
    parts.append("</body></html>")
    return "".join(parts)


def run_report(cfg: Config, out: str | None = None, storage: Storage | None = None) -> str:
    """Write ``report.html`` (default ``{output}/report.html``) and return its URL."""
    st = storage or Storage.from_config(cfg)
    url = out or cfg.output_path("report.html")
    st.write_text(url, build_report(cfg, st))
    log.info("report written to %s", url)
    print(url)
    return url
