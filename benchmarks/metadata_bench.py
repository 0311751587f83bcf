"""Benchmark: ``oiod plan`` on a full-size V6 train box CSV vs polars and pandas used well.

Generates (once, reused) a box CSV in the V6 21-column train layout with
``--rows`` rows (default 14.6 million, about 2.2 GB, the real size) and an
image index of matching size (~1.7M images, 0.62 GB at full size), then runs,
each in its own subprocess (so the peak RSS printed is per run, imports included):

* ``project``: ``oiod plan`` with a 20-class selection (every row checked,
  stats, deterministic shards, label map, manifest);
* ``polars``: lazy ``scan_csv``, filter on the classes, ``group_by`` image,
  join the index, streaming collect, ``write_parquet`` (no validation);
* ``pandas``: ``read_csv`` with ``usecols`` and dtypes in 2M-row chunks, filter
  per chunk, group by one stable sort + offsets, merge the index, Parquet.

Rounds are interleaved (and rotated) so a noisy neighbour hits every
contender alike; the best time of each is reported, with the ratios.

    .venv/bin/python benchmarks/metadata_bench.py                  # full size, best of 3 (~4 minutes)
    .venv/bin/python benchmarks/metadata_bench.py --quick          # 1.46M rows, 1 round
    .venv/bin/python benchmarks/metadata_bench.py --tenx           # + one project run on 10x the rows
                                                                   # (10 copies, 28 GB of CSV, deleted after)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
        fh.write(
            b"ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
            b"IsDepiction,IsInside,XClick1X,XClick2X,XClick3X,XClick4X,XClick1Y,XClick2Y,XClick3Y,XClick4Y\n"
        )
        chunk = 1_000_000
        for s in range(0, rows, chunk):
            n = min(chunk, rows - s)
            x = np.round(np.sort(rng.random((n, 2)), axis=1), 6)
            y = np.round(np.sort(rng.random((n, 2)), axis=1), 6)
            clicks = np.round(rng.random((n, 8)), 6)
            cols = {
                "ImageID": ids.take(pa.array(img_of_row[s : s + n])),
                "Source": pa.array(np.full(n, "xclick")),
                "LabelName": mids_arr.take(pa.array(rng.choice(len(mids), n, p=w / w.sum()))),
                "Confidence": pa.array(np.ones(n, np.int8)),
                "XMin": x[:, 0],
                "XMax": x[:, 1],
                "YMin": y[:, 0],
                "YMax": y[:, 1],
            }
            for a in ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"):
                cols[a] = pa.array(rng.integers(0, 2, n, dtype=np.int8))
            for k, a in enumerate(
                [f"XClick{i}X" for i in range(1, 5)] + [f"XClick{i}Y" for i in range(1, 5)]
            ):
                cols[a] = clicks[:, k]
            pacsv.write_csv(pa.table(cols), fh, write_options=opts)
    with open(images, "wb") as fh:
        fh.write(
            b"ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title,"
            b"OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation\n"
        )
        chunk = 500_000
        for s in range(0, n_img, chunk):
            n = min(chunk, n_img - s)
            sub = ids.slice(s, n)
            py = sub.to_pylist()
            rot = rng.choice(np.array([0.0, 90.0, 180.0, 270.0, np.nan]), n, p=[0.9, 0.03, 0.02, 0.03, 0.02])
            t = pa.table(
                {
                    "ImageID": sub,
                    "Subset": pa.array(np.full(n, "train")),
                    "OriginalURL": pa.array(
                        [f"https://farm3.staticflickr.com/{i[:4]}/{i}_{i[4:14]}_o.jpg" for i in py]
                    ),
                    "OriginalLandingURL": pa.array([f"https://www.flickr.com/photos/u/{i}" for i in py]),
                    "License": pa.array(np.full(n, "https://creativecommons.org/licenses/by/2.0/")),
                    "AuthorProfileURL": pa.array(np.full(n, "https://www.flickr.com/people/someone/")),
                    "Author": pa.array(np.full(n, "Some One")),
                    "Title": pa.array([f"Photo, number {i[:6]}" for i in py]),
                    "OriginalSize": pa.array(rng.integers(50_000, 5_000_000, n)),
                    "OriginalMD5": pa.array([f"{i}{i[:6]}==" for i in py]),
                    "Thumbnail300KURL": pa.array(
                        [f"https://c1.staticflickr.com/1/{i[:3]}/{i}_z.jpg" for i in py]
                    ),
                    "Rotation": pa.array(rot),
                }
            )
            pacsv.write_csv(
                t, fh, write_options=pacsv.WriteOptions(include_header=False, quoting_style="needed")
            )
    marker.write_text(json.dumps({"rows": rows, "images": n_img, "seconds": time.monotonic() - t0}))
    return boxes, images


def replicate(base: tuple[Path, Path], base_rows: int, k: int, workdir: Path) -> tuple[Path, Path]:
    """``k`` copies of the generated files as one larger data set, unless present (10x in minutes,
    where generating it afresh formats 146M rows of floats: ~20 minutes on 2 cores).

    Copy ``c`` replaces the first hex digit of every ImageID (the first byte of every line) with
    ``c``: the copies are disjoint sets of images with the same boxes, classes and index rows.
    """
    out = (workdir / base[0].name, workdir / base[1].name)
    marker = workdir / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("rows") == base_rows * k:
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    for src, dst in zip(base, out):
        with open(dst, "wb") as fo:
            with open(src, "rb") as fi:
                fo.write(fi.readline())  # the header, once
                body = fi.tell()
            for c in range(k):
                digit = ord("0123456789abcdef"[c])
                with open(src, "rb") as fi:
                    fi.seek(body)
                    at_line_start = True
                    while chunk := fi.read(64 << 20):
                        arr = np.frombuffer(chunk, np.uint8).copy()
                        starts = np.flatnonzero(arr[:-1] == 10) + 1
                        arr[starts] = digit
                        if at_line_start:
                            arr[0] = digit
                        at_line_start = bool(arr[-1] == 10)
                        fo.write(arr.tobytes())
    marker.write_text(json.dumps({"rows": base_rows * k, "copies_of": str(base[0].parent)}))
    return out


# --------------------------------------------------------------------------- runs (in subprocesses)


def run_project(boxes: Path, images: Path, out: Path) -> dict:
    from openimages_od.config import Config
    from openimages_od.openimages.plan import build_plan

    mids = _mids()
    cfg = Config.model_validate(
        {
            "source": {
                "class_descriptions": str(CLASSES),
                "hierarchy": str(HIERARCHY),
                "splits": {"train": {"boxes": str(boxes), "images": str(images)}},
            },
            "selection": {"classes": selected_classes(mids)},
            "output": {"url": str(out)},
            "shards": {"images_per_shard": 1000},
        }
    )
    res = build_plan(cfg)
    sm = res.manifest.splits["train"]
    return {"images": sm.num_images, "boxes": sm.num_boxes}


BOX_COLS = [
    "ImageID",
    "LabelName",
    "Confidence",
    "XMin",
    "XMax",
    "YMin",
    "YMax",
    "IsOccluded",
    "IsTruncated",
    "IsGroupOf",
    "IsDepiction",
    "IsInside",
]
INDEX_COLS = ["ImageID", "OriginalURL", "Thumbnail300KURL", "OriginalSize", "OriginalMD5", "Rotation"]


def run_polars(boxes: Path, images: Path, out: Path) -> dict:
    """Polars as a data engineer would use it: lazy scans, filter, group_by, join, streaming collect."""
    import polars as pl

    sel = selected_classes(_mids())
    b = (
        pl.scan_csv(boxes, schema_overrides={"ImageID": pl.String, "LabelName": pl.String})
        .select(BOX_COLS)
        .filter(pl.col("LabelName").is_in(sel))
    )
    grouped = b.group_by("ImageID").agg(pl.all())
    idx = pl.scan_csv(images, schema_overrides={"ImageID": pl.String, "OriginalMD5": pl.String}).select(
        INDEX_COLS
    )
    plan = grouped.join(idx, on="ImageID", how="left").collect(engine="streaming")
    plan.write_parquet(out / "polars-plan.parquet")
    n_boxes = int(plan.select(pl.col("LabelName").list.len().sum()).item())
    return {"images": plan.height, "boxes": n_boxes}


def run_pandas(boxes: Path, images: Path, out: Path) -> dict:
    """pandas used well: only the needed columns, typed, filtered per chunk; grouped by sort + offsets."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    sel = set(selected_classes(_mids()))
    dtypes = {c: "float32" for c in BOX_COLS[2:]}
    parts = []
    # Chunked, so only one chunk of the 14.6M rows is in memory; the C engine (the default).
    for chunk in pd.read_csv(
        boxes, usecols=BOX_COLS, dtype={"ImageID": str, "LabelName": str, **dtypes}, chunksize=2_000_000
    ):
        parts.append(chunk[chunk["LabelName"].isin(sel)])
    df = pd.concat(parts, ignore_index=True)
    # Group on indices: one stable sort by image, offsets at the boundaries (no per-group Python lists).
    df = df.sort_values("ImageID", kind="stable").reset_index(drop=True)
    ids = df["ImageID"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    offsets = np.r_[starts, len(df)].astype(np.int32)
    images_df = pd.DataFrame({"ImageID": ids[starts]})
    idx = pd.read_csv(images, usecols=INDEX_COLS, dtype={"ImageID": str, "OriginalMD5": str})
    images_df = images_df.merge(idx[idx["ImageID"].isin(images_df["ImageID"])], on="ImageID", how="left")
    table = pa.Table.from_pandas(images_df, preserve_index=False)
    for c in BOX_COLS[1:]:
        table = table.append_column(
            c, pa.ListArray.from_arrays(pa.array(offsets), pa.array(df[c].to_numpy()))
        )
    pq.write_table(table, out / "pandas-plan.parquet")
    return {"images": len(images_df), "boxes": len(df)}


RUNNERS = {"project": run_project, "polars": run_polars, "pandas": run_pandas}
LABELS = {
    "project": "project (oiod plan: validated, stats, shards)",
    "polars": "polars (scan_csv, filter, group_by, join, streaming collect, write_parquet)",
    "pandas": "pandas (usecols + dtypes, chunked filter, sort + offsets group, merge)",
}


def _child(kind: str, boxes: str, images: str, out: str) -> None:
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res = RUNNERS[kind](Path(boxes), Path(images), out_p)
    res["seconds"] = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu_s"] = ru.ru_utime + ru.ru_stime
    res["peak_rss_mb"] = ru.ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def _measure(kind: str, boxes: Path, images: Path, out: Path) -> dict:
    """One run in a fresh interpreter (imports included in the time), so peak RSS is per run."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(boxes), str(images), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    res["process_s"] = time.monotonic() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", type=int, default=14_600_000, help="Box rows (default: the real V6 train size)."
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "oiod-metadata-bench",
        help="Where generated files live (reused if present).",
    )
    ap.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; the best of each is reported.")
    ap.add_argument("--quick", action="store_true", help="1 round of 1.46M rows (a tenth of the real size).")
    ap.add_argument("--only", default="project,polars,pandas", help="Comma-separated contenders.")
    ap.add_argument("--cleanup", action="store_true", help="Delete the generated files afterwards.")
    ap.add_argument(
        "--tenx",
        action="store_true",
        help="After the rounds, one project run on 10x the rows (memory at scale; ~10 minutes, 25 GB "
        "of disk, deleted afterwards).",
    )
    ap.add_argument("--child", nargs=4, metavar=("KIND", "BOXES", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    if args.quick:
        args.rows, args.rounds = min(args.rows, 1_460_000), 1
    kinds = [k for k in args.only.split(",") if k]
    data = args.workdir / f"rows-{args.rows}"
    t0 = time.monotonic()
    boxes, images = generate(args.rows, data)
    print(
        f"data: {boxes} ({boxes.stat().st_size / 1e9:.2f} GB, {args.rows:,} rows), "
        f"{images} ({images.stat().st_size / 1e9:.2f} GB); ready in {time.monotonic() - t0:.1f} s; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        with tempfile.TemporaryDirectory(prefix="oiod-bench-out-", dir=args.workdir) as tmp:
            for r in range(args.rounds):
                # Interleaved (and rotated) so a noisy neighbour hits every contender alike.
                for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                    res = _measure(kind, boxes, images, Path(tmp) / f"{kind}-{r}")
                    runs[kind].append(res)
                    print(
                        f"  round {r + 1} {kind:8s} {res['seconds']:6.1f} s (CPU {res['cpu_s']:6.1f} s), "
                        f"peak RSS {res['peak_rss_mb']:6,.0f} MB, {res['images']:,} images / "
                        f"{res['boxes']:,} boxes; load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                    shutil.rmtree(Path(tmp) / f"{kind}-{r}", ignore_errors=True)
    finally:
        if args.cleanup:
            shutil.rmtree(data, ignore_errors=True)
    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in runs.items()}
    print(f"\nbest of {args.rounds} interleaved round(s), {args.rows:,} box rows:")
    ref = best.get("project")
    for k in kinds:
        b = best[k]
        rss = max(x["peak_rss_mb"] for x in runs[k])
        line = (
            f"{LABELS[k]}: {b['seconds']:.1f} s, {args.rows / b['seconds']:,.0f} rows/s, "
            f"peak RSS {rss:,.0f} MB (max over rounds), {b['images']:,} images / {b['boxes']:,} boxes"
        )
        if ref is not None and k != "project":
            line += (
                f"; project is {b['seconds'] / ref['seconds']:.2f}x its speed, "
                f"{max(x['peak_rss_mb'] for x in runs['project']) / rss:.2f}x its peak RSS"
            )
        print(line)

    if args.tenx:
        _run_tenx((boxes, images), args.rows, args.workdir, best.get("project"))


def _run_tenx(base: tuple[Path, Path], base_rows: int, workdir: Path, one_x: dict | None) -> None:
    """One project run on 10x the rows: time and peak RSS at scale (the files are deleted after)."""
    rows = base_rows * 10
    data = workdir / f"rows-{rows}-copies"
    try:
        t0 = time.monotonic()
        boxes, images = replicate(base, base_rows, 10, data)
        print(
            f"\n10x data: {boxes.stat().st_size / 1e9:.1f} GB + {images.stat().st_size / 1e9:.1f} GB, "
            f"ready in {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="oiod-bench-out-", dir=workdir) as tmp:
            res = _measure("project", boxes, images, Path(tmp) / "project-10x")
    finally:
        shutil.rmtree(data, ignore_errors=True)
    line = (
        f"project at 10x ({rows:,} box rows): {res['seconds']:.1f} s (CPU {res['cpu_s']:.1f} s), "
        f"{rows / res['seconds']:,.0f} rows/s, peak RSS {res['peak_rss_mb']:,.0f} MB, "
        f"{res['images']:,} images / {res['boxes']:,} boxes"
    )
    if one_x is not None:
        line += f"; {res['seconds'] / one_x['seconds']:.1f}x the 1x time"
    print(line)


if __name__ == "__main__":
    main()
