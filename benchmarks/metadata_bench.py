"""Benchmark: ``oiod plan`` on a full-size V6 train box CSV vs a pandas baseline.

Generates (once, reused) a box CSV in the V6 21-column train layout with
``--rows`` rows (default 14.6 million, about 2.3 GB, the real size) and an
image index of matching size (~1.7M images at full size), then plans it with a
20-class selection, and runs a pandas ``read_csv`` + ``isin`` filter +
``groupby(...).agg(list)`` + image-index merge baseline on the same files. Each
run is a separate subprocess, so the peak RSS printed is per run.

    .venv/bin/python benchmarks/metadata_bench.py               # full size (a few minutes)
    .venv/bin/python benchmarks/metadata_bench.py --rows 200000  # quick mode
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ROOT / "tests" / "data" / "openimages" / "class-descriptions-boxable.csv"
HIERARCHY = ROOT / "tests" / "data" / "openimages" / "bbox_labels_600_hierarchy.json"
BOXES_PER_IMAGE = 8.6  # V6 train: 14.6M boxes / 1.7M images


def _mids() -> list[str]:
    return [line.split(",", 1)[0] for line in CLASSES.read_text().splitlines() if line]


def selected_classes(mids: list[str]) -> list[str]:
    """20 classes spread over the popularity ranks (some frequent, most rare)."""
    return [mids[r] for r in range(0, 600, 30)][:20]


def generate(rows: int, workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write boxes.csv (V6 train layout) and images.csv (V4+ index) unless present."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    boxes, images = workdir / "train-annotations-bbox.csv", workdir / "train-images-boxable-with-rotation.csv"
    marker = workdir / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("rows") == rows:
        return boxes, images
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mids = _mids()
    n_img = max(1, int(rows / BOXES_PER_IMAGE))
    img_keys = np.unique(rng.integers(0, 2**63, size=n_img + n_img // 50, dtype=np.int64))[:n_img]
    n_img = len(img_keys)
    ids = pa.array([f"{k:016x}" for k in img_keys.tolist()], pa.string())
    # Boxes per image: sorted by ImageID as in the real file.
    per_img = rng.multinomial(rows - n_img, np.full(n_img, 1 / n_img)) + 1
    img_of_row = np.repeat(np.arange(n_img), per_img)
    # Class popularity: Zipf-like, so a few classes are huge, as in Open Images.
    w = 1.0 / (np.arange(len(mids)) + 5.0) ** 0.9
    mids_arr = pa.array(mids, pa.string())
    t0 = time.monotonic()
    # Box values never contain commas: write them unquoted, as the real file is.
    opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(boxes, "wb") as fh:
        fh.write(b"ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
                 b"IsDepiction,IsInside,XClick1X,XClick2X,XClick3X,XClick4X,XClick1Y,XClick2Y,XClick3Y,XClick4Y\n")
        chunk = 1_000_000
        for s in range(0, rows, chunk):
            n = min(chunk, rows - s)
            x = np.round(np.sort(rng.random((n, 2)), axis=1), 6)
            y = np.round(np.sort(rng.random((n, 2)), axis=1), 6)
            clicks = np.round(rng.random((n, 8)), 6)
            cols = {
                "ImageID": ids.take(pa.array(img_of_row[s:s + n])),
                "Source": pa.array(np.full(n, "xclick")),
                "LabelName": mids_arr.take(pa.array(rng.choice(len(mids), n, p=w / w.sum()))),
                "Confidence": pa.array(np.ones(n, np.int8)),
                "XMin": x[:, 0], "XMax": x[:, 1], "YMin": y[:, 0], "YMax": y[:, 1],
            }
            for a in ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"):
                cols[a] = pa.array(rng.integers(0, 2, n, dtype=np.int8))
            for k, a in enumerate([f"XClick{i}X" for i in range(1, 5)] + [f"XClick{i}Y" for i in range(1, 5)]):
                cols[a] = clicks[:, k]
            pacsv.write_csv(pa.table(cols), fh, write_options=opts)
    with open(images, "wb") as fh:
        fh.write(b"ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title,"
                 b"OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation\n")
        chunk = 500_000
        for s in range(0, n_img, chunk):
            n = min(chunk, n_img - s)
            sub = ids.slice(s, n)
            py = sub.to_pylist()
            rot = rng.choice(np.array([0.0, 90.0, 180.0, 270.0, np.nan]), n, p=[0.9, 0.03, 0.02, 0.03, 0.02])
            t = pa.table({
                "ImageID": sub,
                "Subset": pa.array(np.full(n, "train")),
                "OriginalURL": pa.array([f"https://farm3.staticflickr.com/{i[:4]}/{i}_{i[4:14]}_o.jpg" for i in py]),
                "OriginalLandingURL": pa.array([f"https://www.flickr.com/photos/u/{i}" for i in py]),
                "License": pa.array(np.full(n, "https://creativecommons.org/licenses/by/2.0/")),
                "AuthorProfileURL": pa.array(np.full(n, "https://www.flickr.com/people/someone/")),
                "Author": pa.array(np.full(n, "Some One")),
                "Title": pa.array([f"Photo, number {i[:6]}" for i in py]),
                "OriginalSize": pa.array(rng.integers(50_000, 5_000_000, n)),
                "OriginalMD5": pa.array([f"{i}{i[:6]}==" for i in py]),
                "Thumbnail300KURL": pa.array([f"https://c1.staticflickr.com/1/{i[:3]}/{i}_z.jpg" for i in py]),
                "Rotation": pa.array(rot),
            })
            pacsv.write_csv(t, fh, write_options=pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    marker.write_text(json.dumps({"rows": rows, "images": n_img, "seconds": time.monotonic() - t0}))
    return boxes, images


# --------------------------------------------------------------------------- runs (in subprocesses)


def run_project(boxes: Path, images: Path, out: Path) -> dict:
    from openimages_od.config import Config
    from openimages_od.openimages.plan import build_plan

    mids = _mids()
    cfg = Config.model_validate({
        "source": {"class_descriptions": str(CLASSES), "hierarchy": str(HIERARCHY),
                   "splits": {"train": {"boxes": str(boxes), "images": str(images)}}},
        "selection": {"classes": selected_classes(mids)},
        "output": {"url": str(out)},
        "shards": {"images_per_shard": 1000},
    })
    res = build_plan(cfg)
    sm = res.manifest.splits["train"]
    return {"images": sm.num_images, "boxes": sm.num_boxes}


def run_pandas(boxes: Path, images: Path, out: Path) -> dict:
    import pandas as pd

    sel = selected_classes(_mids())
    # low_memory=False: pandas 2.3's default chunked C parser segfaults on this file on this machine
    # (in pandas_parser.so, from ~1M rows on, even for two string columns).
    df = pd.read_csv(boxes, usecols=["ImageID", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
                                     "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"],
                     low_memory=False)
    df = df[df["LabelName"].isin(sel)]
    grouped = df.groupby("ImageID").agg(list).reset_index()
    idx = pd.read_csv(images, usecols=["ImageID", "OriginalURL", "Thumbnail300KURL", "OriginalSize",
                                       "OriginalMD5", "Rotation"], low_memory=False)
    idx = idx[idx["ImageID"].isin(grouped["ImageID"])]
    plan = grouped.merge(idx, on="ImageID", how="left")
    plan.to_parquet(out / "pandas-plan.parquet")
    return {"images": int(len(plan)), "boxes": int(len(df))}


def _child(kind: str, boxes: str, images: str, out: str) -> None:
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res = (run_project if kind == "project" else run_pandas)(Path(boxes), Path(images), out_p)
    res["seconds"] = time.monotonic() - t0
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def _measure(kind: str, boxes: Path, images: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(boxes), str(images), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=14_600_000, help="Box rows (default: the real V6 train size).")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oiod-metadata-bench",
                    help="Where generated files live (reused if present).")
    ap.add_argument("--skip-baseline", action="store_true", help="Only run the project.")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "BOXES", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    data = args.workdir / f"rows-{args.rows}"
    t0 = time.monotonic()
    boxes, images = generate(args.rows, data)
    print(f"data: {boxes} ({boxes.stat().st_size / 1e9:.2f} GB, {args.rows:,} rows), "
          f"{images} ({images.stat().st_size / 1e9:.2f} GB); ready in {time.monotonic() - t0:.1f} s")
    with tempfile.TemporaryDirectory(prefix="oiod-bench-out-") as tmp:
        proj = _measure("project", boxes, images, Path(tmp) / "project")
        print(f"project (oiod plan, pyarrow streaming): {proj['seconds']:.1f} s, "
              f"{args.rows / proj['seconds']:,.0f} rows/s, peak RSS {proj['peak_rss_mb']:,.0f} MB, "
              f"{proj['images']:,} images / {proj['boxes']:,} boxes selected")
        if args.skip_baseline:
            return
        base = _measure("pandas", boxes, images, Path(tmp) / "pandas")
        print(f"baseline (pandas read_csv + isin + groupby.agg(list) + merge): {base['seconds']:.1f} s, "
              f"{args.rows / base['seconds']:,.0f} rows/s, peak RSS {base['peak_rss_mb']:,.0f} MB, "
              f"{base['images']:,} images / {base['boxes']:,} boxes selected")
        print(f"ratio: project is {base['seconds'] / proj['seconds']:.2f}x the baseline's speed, "
              f"uses {proj['peak_rss_mb'] / base['peak_rss_mb']:.2f}x its peak RSS")


if __name__ == "__main__":
    main()
