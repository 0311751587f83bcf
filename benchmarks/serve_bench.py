"""Benchmark ``oiod serve`` with micro-batching against the same service without batching.

One command::

    .venv/bin/python benchmarks/serve_bench.py [--requests N] [--time-limit S] [--model DIR]

It exports a tiny real SavedModel (the colour-blob detector of
``tests/serving_helpers.py``; ``--model`` serves your own export instead),
then for each of two servers, each in its own subprocess on loopback:

* ``batching``: ``oiod serve`` (micro-batching on, the default config);
* ``no-batching``: ``oiod serve --set serve.batching=false`` (the baseline: same
  process, same model, one ``model(...)`` call per request);

measures the start-up (process start to ``/readyz``: model load and its warm-up
run) and the latency of the first request after it, sends a warm-up burst, then
drives load at concurrency 1, 8 and 32 with an aiohttp client (bounded request
count and time per level) and prints images/s, p50 and p99 latency and the
batching / no-batching ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# --------------------------------------------------------------------------- load generator


async def drive(url: str, body: bytes, concurrency: int, max_requests: int, time_limit: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + time_limit

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued, errors
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=max(120.0, time_limit * 4))
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, round(p * (len(latencies) - 1)))] * 1000

    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "images_per_s": len(latencies) / wall if wall else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def start(kind: str, model_dir: str, port: int, logdir: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    oiod = str(Path(sys.executable).parent / "oiod")
    cmd = [oiod, "serve", "--model", model_dir, "--port", str(port), "--set", "serve.access_log=false"]
    if kind == "no-batching":
        cmd += ["--set", "serve.batching=false"]
    log = open(logdir / f"{kind}.log", "wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_image() -> bytes:
    from serving_helpers import BLUE, GREEN, RED, blob_image

    # A 640x480 JPEG (~ the size of a resized Open Images photo) with three objects.
    return blob_image(
        (640, 480),
        {RED: (40, 30, 200, 160), GREEN: (300, 60, 420, 300), BLUE: (420, 300, 620, 460)},
        fmt="JPEG",
    )


async def first_request(url: str, body: bytes) -> float:
    """Latency (ms) of one request on a fresh connection."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"first request: HTTP {resp.status}")
        return (time.perf_counter() - t0) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="Max requests per level (default 400).")
    ap.add_argument("--time-limit", type=float, default=15.0, help="Seconds per level at most (default 15).")
    ap.add_argument("--warmup", type=int, default=16, help="Warm-up requests before the levels (default 16).")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--model", help="An export dir to serve (default: export the tiny test model).")
    args = ap.parse_args()

    from openimages_od.devservices import free_port

    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="oiod-serve-bench-"))
    if args.model:
        model_dir = args.model
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from serving_helpers import make_export

        model_dir = str(make_export(work / "export"))
    body = bench_image()
    print(
        f"model {model_dir}; image 640x480 JPEG {len(body)} bytes; levels {levels}; "
        f"<= {args.requests} requests or {args.time_limit:g}s per level; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[str, dict] = {}
    for kind in ("batching", "no-batching"):
        port = free_port()
        t0 = time.perf_counter()
        proc = start(kind, model_dir, port, work)
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
            ready_s = time.perf_counter() - t0
            url = f"http://127.0.0.1:{port}/v1/detect"
            first_ms = asyncio.run(first_request(url, body))
            asyncio.run(drive(url, body, 4, args.warmup, 30))  # warm-up: connections, batch shapes
            results[kind] = {"ready_s": ready_s, "first_request_ms": first_ms, "levels": {}}
            print(
                f"  {kind:12s} ready in {ready_s:.1f} s (model load + warm-up run); "
                f"first request {first_ms:.1f} ms",
                flush=True,
            )
            for c in levels:
                r = asyncio.run(drive(url, body, c, max(args.requests, c), args.time_limit))
                results[kind]["levels"][c] = r
                print(
                    f"  {kind:12s} c={c:<3d} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:8.1f} ms  "
                    f"p99 {r['p99_ms']:8.1f} ms  ({r['requests']} ok, {r['errors']} errors, {r['wall_s']:.1f}s)",
                    flush=True,
                )
        finally:
            stop(proc)

    b, nb = results["batching"], results["no-batching"]
    print(
        f"\nfirst request after load: batching {b['first_request_ms']:.1f} ms, "
        f"no-batching {nb['first_request_ms']:.1f} ms"
    )
    print("concurrency | batching img/s p50 p99 | no-batching img/s p50 p99 | throughput ratio | p99 ratio")
    for c in levels:
        s, n = b["levels"][c], nb["levels"][c]
        print(
            f"{c:>11d} | {s['images_per_s']:7.1f} {s['p50_ms']:6.1f} {s['p99_ms']:6.1f} | "
            f"{n['images_per_s']:7.1f} {n['p50_ms']:6.1f} {n['p99_ms']:6.1f} | "
            f"{s['images_per_s'] / n['images_per_s']:6.2f}x | {s['p99_ms'] / n['p99_ms']:6.2f}x"
        )
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nraw results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
