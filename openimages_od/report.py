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

import html
import logging
import time
from typing import Any

from openimages_od.config import Config
from openimages_od.report_charts import (
    ap_bars,
    ap_vs_frequency,
    bars,
    class_histogram,
    draw_sample,
    hist,
    int_bins,
    per_class_ap,
    pr_curves,
    sizes_scatter,
)
from openimages_od.report_data import ReportData
from openimages_od.storage import Storage
from openimages_od.storage_setup import storage_from_config

log = logging.getLogger(__name__)


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
    st = storage or storage_from_config(cfg)
    d = ReportData(cfg, st).load()
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>openimages-od report</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>openimages-od report</h1>",
        f"<p class='muted'>{html.escape(cfg.output_root)} &middot; generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p>",
    ]

    # Totals
    parts.append("<h2 id='totals'>Totals</h2>")
    rows: list[tuple[Any, ...]] = []
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
        parts.extend(_img(class_histogram(d, s), f"class histogram {s}") for s in d.class_counts)
        parts.append("</div>")
        parts.append("<h2 id='boxes'>Boxes per image</h2><div class='charts'>")
        parts.extend(
            _img(hist(v, f"{s}: boxes per image", "boxes", bins=int_bins(v)), f"boxes per image {s}")
            for s, v in d.boxes_per_image.items()
            if v
        )
        parts.append("</div>")
    if d.image_sizes:
        parts.append("<h2 id='sizes'>Image sizes</h2><div class='charts'>")
        parts.append(_img(sizes_scatter(d.image_sizes), "image sizes"))
        parts.append(
            _img(hist([max(w, h) for w, h in d.image_sizes], "longest side", "pixels"), "longest side")
        )
        parts.append("</div>")

    parts.append("<h2 id='failures'>Failures and sources</h2>")
    if d.failures or d.sources:
        parts.append("<div class='charts'>")
        if d.failures:
            parts.append(_img(bars(d.failures, "failed images by reason", "#e6194b"), "failure reasons"))
        if d.sources:
            parts.append(_img(bars(d.sources, "images by source used", "#42d4f4"), "sources"))
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
                f"<figure><img src='{draw_sample(s, d.names)}' alt='sample {html.escape(s['id'])}'>"
                f"<figcaption>{html.escape(s['split'])} &middot; {html.escape(s['id'])} &middot; "
                f"{len(s['boxes'])} boxes</figcaption></figure>"
            )
        parts.append("</div>")
    else:
        parts.append("<p>No committed shards found.</p>")

    parts.append("<h2 id='evaluation'>Evaluation</h2>")
    if d.metrics:
        parts.append(f"<p class='muted'>{html.escape(d.metrics_url or '')}</p>")
        headline: list[tuple[str, str, str]] = []
        for section in ("coco", "openimages"):
            sec = d.metrics.get(section)
            if isinstance(sec, dict):
                headline.extend(
                    (section, k, f"{v:.4f}") for k, v in sec.items() if isinstance(v, (int, float))
                )
        if headline:
            parts.append(_table(headline, ("metric set", "metric", "value")))
        parts.append("<div class='charts'>")
        per = per_class_ap(d.metrics, d.names)
        if per:
            parts.append(_img(ap_bars(*per), "per-class AP"))
        pr = pr_curves(d.metrics, d.names)
        if pr:
            parts.append(_img(pr, "precision-recall curves"))
        train_boxes = {
            d.names.get(m, m): n
            for m, n in (d.class_counts.get(d.cfg.train.split) or {}).get("boxes", {}).items()
        }
        freq = ap_vs_frequency(d.metrics, train_boxes)
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
    st = storage or storage_from_config(cfg)
    url = out or cfg.output_path("report.html")
    st.write_text(url, build_report(cfg, st))
    log.info("report written to %s", url)
    print(url)
    return url
