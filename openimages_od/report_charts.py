"""The charts of ``oiod report``: matplotlib figures and drawn samples as data URIs.

Every function returns a ``data:`` URI (PNG charts, JPEG samples) so the report is one
self-contained file; matplotlib is imported inside them, on the Agg backend.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from typing import Any

from openimages_od.report_data import ReportData

__all__ = [
    "PALETTE",
    "ap_bars",
    "ap_vs_frequency",
    "bars",
    "class_histogram",
    "draw_sample",
    "hist",
    "int_bins",
    "per_class_ap",
    "png",
    "pr_curves",
    "pyplot",
    "sizes_scatter",
]

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


def png(fig: Any) -> str:
    """``fig`` as a PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported late: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_histogram(d: ReportData, split: str) -> str:
    plt = pyplot()
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
    return png(fig)


def hist(values: list[int], title: str, xlabel: str, bins: Any = None) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=bins or min(30, max(5, len(set(values)))), color="#3cb44b", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    return png(fig)


def int_bins(values: list[int]) -> list[float]:
    """One bar per integer value (bins centred on integers)."""
    lo, hi = min(values), max(values)
    step = max(1, (hi - lo + 1) // 30)
    return [x - 0.5 for x in range(lo, hi + step + 1, step)]


def sizes_scatter(sizes: list[tuple[int, int]]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([w for w, _ in sizes], [h for _, h in sizes], s=8, alpha=0.5, color="#911eb4")
    ax.set_xlabel("width (px, in the shards)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"image sizes ({len(sizes)} examples)")
    return png(fig)


def bars(counter: Counter, title: str, color: str) -> str:
    plt = pyplot()
    items = counter.most_common(20)
    fig, ax = plt.subplots(figsize=(7, max(2, 0.35 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v for _, v in items], color=color)
    ax.invert_yaxis()
    ax.set_title(title)
    return png(fig)


def draw_sample(sample: dict, names: dict[str, str]) -> str:
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


def per_class_ap(metrics: dict, names: dict[str, str]) -> tuple[str, dict[str, float]] | None:
    """Find per-class AP in the metrics JSON (Open Images metric first, then COCO)."""
    for section in ("openimages", "coco"):
        sec = metrics.get(section)
        if not isinstance(sec, dict):
            continue
        per = sec.get("per_class") or sec.get("per_class_ap")
        if isinstance(per, dict) and per:
            out: dict[str, float] = {}
            for mid, v in per.items():
                ap = v.get("ap", v.get("AP", v.get("AP50"))) if isinstance(v, dict) else v
                if isinstance(ap, (int, float)):
                    label = (v.get("name") if isinstance(v, dict) else None) or names.get(mid, mid)
                    out[str(label)] = float(ap)
            if out:
                return section, out
    return None


def ap_bars(section: str, per: dict[str, float]) -> str:
    plt = pyplot()
    items = sorted(per.items(), key=lambda kv: -kv[1])[:40]
    fig, ax = plt.subplots(figsize=(7, max(2, 0.35 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#e6194b")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP@0.5")
    ax.set_title(f"per-class AP ({section})")
    return png(fig)


def pr_curves(metrics: dict, names: dict[str, str]) -> str | None:
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
    plt = pyplot()
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
    return png(fig)


def ap_vs_frequency(
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([max(1, b) for _, b, _ in points], [a for _, _, a in points], color="#4363d8")
    for name, b, a in points[:40]:
        ax.annotate(name, (max(1, b), a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training boxes (log)")
    ax.set_ylabel("AP@0.5 (Open Images)")
    ax.set_title("per-class AP vs training box count")
    return png(fig), sorted(points, key=lambda p: p[1])
