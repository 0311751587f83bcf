"""Benchmark: ``oiod prepare`` throughput over 1, 2 and 3 Ray worker nodes (issue #14).

A real multi-node Ray cluster on loopback (:class:`LoopbackRayCluster`): a
head with no CPUs on 127.0.0.2 and worker raylets on 127.0.0.3-5, each with a
fixed share of ``--cpus-per-node`` logical CPUs. The image server (its own
process) answers every request after ``--latency-ms``, as a far server on the
internet does, so the work is latency-bound and not bound by this machine's 2
cores. Actors are derived by prepare itself (one per node here:
``ray.actors_per_node=1``), each with ``--concurrency`` fetches in flight.

Weak scaling: the run on N nodes gets N x ``--images-per-node`` images, so each
run lasts about as long. Throughput is measured in the steady state: from the
commit of the first wave of shards (one per actor) to the last commit, so
start-up (driver, actors) cancels out. Scaling efficiency of N nodes is
``rate(N) / (N x rate(1))``; the target is >= 0.9 per added node.

Per-image CPU cost: the CPU time of every process of the worker nodes (raylet,
actors, agents), sampled with psutil during a separate one-node run on
realistic photos (1024 px JPEG, ~150-300 KB, resized to ``--max-side``) with no
added latency, divided by the images. From it, cores per node = rate x cost.

    .venv/bin/python benchmarks/scaling_bench.py              # 1, 2, 3 nodes (~3 min)
    .venv/bin/python benchmarks/scaling_bench.py --nodes 1 2  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")

TRAIN_IMAGES = 1_743_042  # boxable train split in the public bucket


def serve(folder: str, port: int, latency_ms: float) -> None:
    """Image server (own process): ``/img/{k}/{name}.jpg`` -> photo k after ``latency_ms``."""
    import asyncio

    from aiohttp import web

    bodies = {p.stem: p.read_bytes() for p in Path(folder).glob("*.jpg")}

    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(latency_ms / 1000)
        body = bodies.get(request.match_info["k"])
        return web.Response(body=body, content_type="image/jpeg") if body else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/img/{k}/{name}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class ImageService:
    """The image server process with a fixed per-request latency."""

    def __init__(self, folder: Path, latency_ms: float) -> None:
        from openimages_od.devservices import free_port

        self.port = free_port()
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import scaling_bench as b; "
            f"b.serve({str(folder)!r}, {self.port}, {latency_ms})"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/img/x/y.jpg", timeout=1)
            except Exception as exc:
                if "404" in str(exc):
                    return
            time.sleep(0.1)
        raise RuntimeError("image server did not start")

    def url(self, k: int, iid: str) -> str:
        return f"http://127.0.0.1:{self.port}/img/{k}/{iid}.jpg"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def make_photos(folder: Path, size: tuple[int, int], unique: int) -> None:
    from pipeline_helpers import photo

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(unique):
        p = folder / f"{k}.jpg"
        if not p.exists():
            p.write_bytes(photo(*size, seed=k, texture=12, quality=85))


def write_inputs(out: Path, svc: ImageService, n: int, unique: int, per_shard: int) -> None:
    from pipeline_helpers import box, image_row, write_plan

    from openimages_od.storage import Storage

    rows = [
        image_row(
            f"{i:016x}", original_url=svc.url(i % unique, f"{i:016x}"), boxes=[box(1, 0.1, 0.5, 0.2, 0.6)]
        )
        for i in range(n)
    ]
    write_plan(Storage(), f"file://{out}", rows, images_per_shard=per_shard)


class CpuSampler:
    """CPU seconds used by the processes of some process groups (sampled; max per pid)."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        for root in self.roots:
            try:
                procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.seen[p.pid] = max(self.seen.get(p.pid, 0.0), t.user + t.system)
                except psutil.NoSuchProcess:
                    pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.2)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self.base = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def used_s(self) -> float:
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.seen.items())


def run_prepare(cluster, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One ``oiod prepare`` (its own driver process, as a RayJob entrypoint); returns timings."""
    from openimages_od.config import dump_config, load_config

    cfg = load_config(
        None,
        [
            f"output.url={out}",
            f"ray.address={cluster.address}",
            "ray.progress=false",
            "ray.actors_per_node=1",
            f"ray.num_cpus_per_actor={args.cpus_per_node}",
            f"ray.concurrency_per_actor={args.concurrency}",
            "ray.max_shards_in_flight_per_actor=2",
            "source.images.order=[original]",
            "image.quality=90",
            *extra,
        ],
    )
    cfg_file = out / "config.yaml"
    cfg_file.write_text(dump_config(cfg))
    env = {**cluster.env(), "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "openimages_od.cli", "prepare", "-c", str(cfg_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{r.stderr[-3000:]}")
    report = json.loads((out / "prepare_report.json").read_text())
    commits = sorted(p.stat().st_mtime for p in (out / "tfrecords" / "train").glob("*.stats.json"))
    per_shard = report["totals"]["ok"] / max(1, len(commits))
    actors = report["ray"]["num_actors"]
    # Steady state: from the end of the first wave (the shards in flight at the start) to the last commit.
    first = min(actors * 2, len(commits) - 1)  # 2 shards in flight per actor
    span = commits[-1] - commits[first - 1] if first >= 1 else commits[-1] - commits[0]
    steady = (len(commits) - first) * per_shard / span if span > 0 else float("nan")
    return {
        "wall_s": wall,
        "ok": report["totals"]["ok"],
        "failed": report["totals"]["failed"],
        "steady_images_per_s": steady,
        "actors": actors,
        "shards_per_node": report["ray"]["shards_per_node"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--images-per-node", type=int, default=320)
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=250.0)
    ap.add_argument(
        "--concurrency", type=int, default=4, help="fetches in flight per actor (one actor per node)"
    )
    ap.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs each worker raylet offers")
    ap.add_argument("--cpu-images", type=int, default=160, help="images of the per-image CPU run (0 = skip)")
    ap.add_argument("--max-side", type=int, default=640)
    args = ap.parse_args()

    from openimages_od.devcluster import LoopbackRayCluster

    work = Path(tempfile.mkdtemp(prefix="oiod-scaling-"))
    small, big = work / "small", work / "big"
    make_photos(small, (320, 240), 40)
    cluster = LoopbackRayCluster(dashboard=False)
    svc = ImageService(small, args.latency_ms)
    results: dict[int, dict] = {}
    try:
        cluster.start_head()
        for n in sorted(args.nodes):
            while len([w for w in cluster.workers if w.alive()]) < n:
                cluster.add_worker(num_cpus=args.cpus_per_node)
            out = work / f"n{n}"
            write_inputs(out, svc, n * args.images_per_node, 40, args.per_shard)
            with CpuSampler([w.proc.pid for w in cluster.workers if w.alive()]) as sampler:
                results[n] = run_prepare(cluster, out, args, ["image.max_side=256"])
            r = results[n]
            r["cores_used"] = sampler.used_s() / r["wall_s"]
            print(
                f"nodes={n} actors={r['actors']} images={r['ok']} (failed {r['failed']}) wall={r['wall_s']:.1f}s "
                f"steady={r['steady_images_per_s']:.1f} images/s, worker nodes used {r['cores_used']:.2f} cores "
                f"on average; shards per node={r['shards_per_node']}",
                flush=True,
            )
        svc.stop()

        cpu_ms, avg_kb = float("nan"), float("nan")
        if args.cpu_images:
            make_photos(big, (1024, 768), 40)
            avg_kb = sum(p.stat().st_size for p in big.glob("*.jpg")) / 40 / 1000
            svc = ImageService(big, 0)
            for w in cluster.workers[1:]:
                w.stop()  # one node: its processes are the ones sampled
            node = cluster.workers[0]
            out = work / "cpu"
            write_inputs(out, svc, args.cpu_images, 40, args.per_shard)
            with CpuSampler([node.proc.pid]) as sampler:
                r = run_prepare(cluster, out, args, [f"image.max_side={args.max_side}"])
            cpu_ms = 1000 * sampler.used_s() / max(1, r["ok"])
            svc.stop()
    finally:
        svc.stop()
        cluster.stop()

    base = results[min(results)]["steady_images_per_s"] / min(results)
    print()
    print(
        f"latency {args.latency_ms:g} ms per request, {args.concurrency} fetches in flight per node, "
        f"{args.cpus_per_node:g} logical CPU per node"
    )
    print("| worker nodes | images/s (steady) | x 1 node | scaling efficiency | worker CPU (cores) |")
    print("|---|---|---|---|---|")
    for n, r in sorted(results.items()):
        rate = r["steady_images_per_s"]
        print(f"| {n} | {rate:.1f} | {rate / base:.2f} | {rate / (n * base):.2f} | {r['cores_used']:.2f} |")
    print()
    print(
        f"per-image CPU cost (1024 px photo -> {args.max_side} px, worker node processes): {cpu_ms:.1f} CPU-ms; "
        f"photos average {avg_kb:.0f} KB"
    )
    if cpu_ms == cpu_ms:
        per_core = 1000 / cpu_ms
        print(
            f"sizing: one core sustains {per_core:.0f} images/s once latency is hidden by concurrency "
            f"(fetches in flight per node >= images/s per node x latency); at 80 % of each node's cores "
            f"(the rest: raylet, agents, S3 writes), for the {TRAIN_IMAGES:,}-image train split:"
        )
        print(
            "| nodes | cores/node | images/s | download MB/s | fetches in flight per node at 100 ms | "
            "train split |"
        )
        print("|---|---|---|---|---|---|")
        for nodes, cores in ((1, 2), (1, 4), (2, 4), (4, 4), (8, 4), (8, 8), (16, 8)):
            rate = 0.8 * nodes * cores * per_core
            hours = TRAIN_IMAGES / rate / 3600
            print(
                f"| {nodes} | {cores} | {rate:,.0f} | {rate * avg_kb / 1000:,.0f} | "
                f"{rate / nodes * 0.1:.0f} | {int(hours)} h {round(60 * (hours % 1)):02d} min |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
