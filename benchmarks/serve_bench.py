"""Benchmark ``oiod serve`` against itself without batching and a seed-style per-request loader.

One command::

    .venv/bin/python benchmarks/serve_bench.py [--requests N] [--time-limit S] [--model DIR]

It exports a tiny real SavedModel (the colour-blob detector of
``tests/serving_helpers.py``; ``--model`` serves your own export instead),
then for each of three servers, each in its own subprocess on loopback:

* ``service``: ``oiod serve`` (micro-batching on, the default config);
* ``no-batching``: ``oiod serve --set serve.batching=false``;
* ``seed-style``: a tiny ``http.server`` app that does ``tf.saved_model.load``
  for every request, like the seed's new-session-per-request handler;

drives load at concurrency 1, 8 and 32 with an aiohttp client (bounded request
count and time per level), and prints images/s, p50 and p99 latency and the
ratios to the baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
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


# --------------------------------------------------------------------------- seed-style server


def seed_server(port: int, model_dir: str) -> None:
    """The baseline: load the SavedModel on every request (the seed opened a new session per call)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import tensorflow as tf

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def do_POST(self) -> None:  # noqa: N802
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            model = tf.saved_model.load(os.path.join(model_dir, "saved_model"))
            out = model.signatures["serving_default"](image_bytes=tf.constant([data]))
            body = json.dumps({k: v.numpy().tolist() for k, v in out.items()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


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
        return latencies[min(len(latencies) - 1, int(round(p * (len(latencies) - 1))))] * 1000

    return {"requests": len(latencies), "errors": errors, "wall_s": wall,
            "images_per_s": len(latencies) / wall if wall else 0.0, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


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
    if kind == "seed-style":
        cmd = [sys.executable, __file__, "--seed-server", str(port), model_dir]
    else:
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
    return blob_image((640, 480), {RED: (40, 30, 200, 160), GREEN: (300, 60, 420, 300), BLUE: (420, 300, 620, 460)},
                      fmt="JPEG")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="Max requests per level for the service (default 400).")
    ap.add_argument("--seed-requests", type=int, default=24, help="Max requests per level for the seed-style baseline.")
    ap.add_argument("--time-limit", type=float, default=15.0, help="Seconds per level at most (default 15).")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--model", help="An export dir to serve (default: export the tiny test model).")
    ap.add_argument("--seed-server", nargs=2, metavar=("PORT", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seed_server:
        seed_server(int(args.seed_server[0]), args.seed_server[1])
        return 0

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
    print(f"model {model_dir}; image 640x480 JPEG {len(body)} bytes; levels {levels}; "
          f"<= {args.requests} requests (seed-style <= {args.seed_requests}) or {args.time_limit:g}s per level; "
          f"{os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict[int, dict]] = {}
    for kind in ("service", "no-batching", "seed-style"):
        port = free_port()
        proc = start(kind, model_dir, port, work)
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz" if kind != "seed-style" else f"http://127.0.0.1:{port}/",
                       proc)
            path = "/v1/detect" if kind != "seed-style" else "/"
            url = f"http://127.0.0.1:{port}{path}"
            asyncio.run(drive(url, body, 2, 6, 10))  # warm-up
            results[kind] = {}
            for c in levels:
                n = args.seed_requests if kind == "seed-style" else args.requests
                r = asyncio.run(drive(url, body, c, max(n, c), args.time_limit))
                results[kind][c] = r
                print(f"  {kind:12s} c={c:<3d} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:8.1f} ms  "
                      f"p99 {r['p99_ms']:8.1f} ms  ({r['requests']} ok, {r['errors']} errors, {r['wall_s']:.1f}s)",
                      flush=True)
        finally:
            stop(proc)

    print("\nconcurrency | service img/s p50 p99 | no-batching img/s p50 p99 | seed-style img/s p50 p99 | "
          "service/no-batching | service/seed-style")
    for c in levels:
        s, nb, sd = results["service"][c], results["no-batching"][c], results["seed-style"][c]
        print(f"{c:>11d} | {s['images_per_s']:7.1f} {s['p50_ms']:6.1f} {s['p99_ms']:6.1f} | "
              f"{nb['images_per_s']:7.1f} {nb['p50_ms']:6.1f} {nb['p99_ms']:6.1f} | "
              f"{sd['images_per_s']:7.2f} {sd['p50_ms']:7.0f} {sd['p99_ms']:7.0f} | "
              f"{s['images_per_s'] / nb['images_per_s']:6.2f}x | {s['images_per_s'] / sd['images_per_s']:7.1f}x")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nraw results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
