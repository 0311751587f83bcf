"""Benchmark: the cost of a shard writer, WebDataset against TFRecord on the same records.

One command. Builds ``--images`` records the way prepare does (synthetic
photos from :mod:`openimages_od.synth` resized to ``--side``, boxes, labels,
encoded by :func:`openimages_od.pipeline.example.encode_example`), then times
:func:`openimages_od.pipeline.writers.write_shard` for each registered writer
over the same samples (best of ``--repeat``), and prints MB/s, images/s and
each writer's time as a ratio to TFRecord's, measured in the same run. The
writer is the only difference: fetch, decode and resize, which dominate a real
prepare, are not in the figure.

    .venv/bin/python benchmarks/writers_bench.py
    .venv/bin/python benchmarks/writers_bench.py --images 2000 --side 512
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from openimages_od.pipeline.example import detection_features, encode_example  # noqa: E402
from openimages_od.pipeline.writers import WRITERS, Sample, resolve_writer, write_shard  # noqa: E402


def _samples(n: int, side: int) -> list[Sample]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (side, side * 3 // 4), ((i * 37) % 255, (i * 91) % 255, 120))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        iid = f"{i:016x}"
        boxes = [{"label_id": 1 + k % 5, "mid": f"/m/0{k:04d}", "is_group_of": k % 2} for k in range(6)]
        row = {"image_id": iid, "source_id": str(i), "boxes": boxes, "image_labels": []}
        coords = [(0.1 * (k % 5), 0.1 * (k % 5) + 0.3, 0.05 * k, 0.05 * k + 0.4) for k in range(6)]
        feats = detection_features(row, data, side, side * 3 // 4, coords, hashlib.sha256(data).hexdigest())
        out.append(Sample(iid, encode_example(feats)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="records per shard")
    ap.add_argument("--side", type=int, default=640, help="image width in pixels")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per writer (best is kept)")
    args = ap.parse_args()
    samples = _samples(args.images, args.side)
    mb = sum(len(s.example) for s in samples) / 1e6
    print(f"{len(samples)} records, {mb:.1f} MB of tf.Examples")
    best: dict[str, float] = {}
    for name in sorted(WRITERS):
        writer = resolve_writer(name)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            data = write_shard(writer, "bench", samples)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
        print(
            f"{name:11s} {best[name] * 1e3:8.1f} ms  {mb / best[name]:8.0f} MB/s  "
            f"{len(samples) / best[name]:9.0f} images/s  file {len(data) / 1e6:.1f} MB"
        )
    base = best["tfrecord"]
    for name, t in sorted(best.items()):
        print(f"ratio {name} / tfrecord: {t / base:.2f}x time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
