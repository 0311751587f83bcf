"""The standing adversarial suite for ``oiod serve`` (issue #12, service half).

Every test reproduces an attack from the issue against the real service (the
tiny real SavedModel from ``serving_helpers``) and asserts the contract: a 4xx
JSON error (never a 500, never a hang) and a service that keeps answering.
Figures the acceptance criteria ask for are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving_helpers import FakeS3, ServiceThread, blob_image, make_export

from openimages_od.config import S3Options, load_config
from openimages_od.devservices import Reply, free_port

pytestmark = [pytest.mark.tf, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
SPACES_80K = "A" + " " * 80_000 + "!"  # quadratic for the old base64 regex: ~20 s of event loop


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("adv") / "export")


@pytest.fixture(scope="module")
def loaded_model(export_dir):
    from openimages_od.serving.model import ExportedModel

    m = ExportedModel.load(str(export_dir))
    yield m
    m.close()


def _cfg(export_dir, *sets: str):
    return load_config(None, [f"serve.model={export_dir}", *sets])


@pytest.fixture
def make_client(aiohttp_client, loaded_model, export_dir):
    async def make(*sets: str, resolver=None, storage=None):
        from openimages_od.serving.app import create_app

        return await aiohttp_client(
            create_app(_cfg(export_dir, *sets), loaded_model, resolver=resolver, storage=storage)
        )

    return make


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _error(resp, status: int) -> dict:
    text = await resp.text()
    assert resp.status == status, text[:300]
    body = json.loads(text)
    assert set(body["error"]) == {"code", "message"}, body
    return body["error"]


async def _raw_http(host: str, port: int, data: bytes, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


# --------------------------------------------------------------------------- item 1: base64 on the loop


@pytest.mark.asyncio
async def test_80k_spaces_base64_does_not_freeze_the_service(make_client):
    """Issue item 1 and acceptance 2 (in process): the 80,000-space image string is a quick 400 on
    every route that decodes base64, and /healthz answers within 1 s while they are handled."""
    from aiohttp import FormData

    client = await make_client()

    async def attack(kind: str):
        if kind == "json":
            return await client.post("/v1/detect", json={"image": SPACES_80K})
        if kind == "predict":
            return await client.post("/v1/models/oiod:predict", json={"instances": [{"b64": SPACES_80K}]})
        form = FormData(default_to_multipart=True)
        form.add_field("image", SPACES_80K)  # a text field: a URL or base64
        return await client.post("/v1/detect", data=form)

    async def probes() -> list[float]:
        await asyncio.sleep(0.05)
        out = []
        for _ in range(10):
            t0 = time.perf_counter()
            assert (await client.get("/healthz")).status == 200
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)
        return out

    t0 = time.perf_counter()
    *resps, lat = await asyncio.gather(*(attack(k) for k in ("json", "predict", "form") * 3), probes())
    elapsed = time.perf_counter() - t0
    for r in resps:
        err = await _error(r, 400)
        assert err["code"] == "bad_image"
    print(
        f"\n80k-space requests x9: {elapsed:.3f} s in all; /healthz max {max(lat) * 1000:.1f} ms, "
        f"median {statistics.median(lat) * 1000:.1f} ms"
    )
    assert max(lat) < 1.0


def test_decode_base64_is_linear_and_compatible():
    from openimages_od.serving.errors import ApiError
    from openimages_od.serving.request import decode_base64

    data = os.urandom(3000)
    std = base64.b64encode(data).decode()
    assert decode_base64(std) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode().rstrip("=")) == data
    assert decode_base64("\n".join(std[i : i + 76] for i in range(0, len(std), 76)) + "\n") == data
    for bad in ("!!", "A" + " " * 200_000 + "!", "AAAA====", "A", "é", "AA=A", ""):
        with pytest.raises(ApiError) as ei:
            decode_base64(bad)
        assert ei.value.status == 400
    with pytest.raises(ApiError) as ei:
        decode_base64("A" * 4000, max_bytes=100)
    assert ei.value.status == 413


# --------------------------------------------------------------------------- item 5: 500s for client input


@pytest.mark.asyncio
async def test_hostile_json_is_400_not_500(make_client):
    client = await make_client()
    hj = {"Content-Type": "application/json"}
    bodies = {
        "deep array": "[" * 100_000 + "]" * 100_000,
        "deep object": '{"image": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001,
        "5,000-digit integer": '{"image": "AAAA", "max_detections": ' + "9" * 5000 + "}",
        "long float": '{"image": "AAAA", "min_score": 0.' + "1" * 5000 + "}",
        "NaN": '{"image": "AAAA", "min_score": NaN}',
        "bad UTF-8": b'{"image": "\xff\xfe"}',
        "not JSON": "{",
    }
    for what, body in bodies.items():
        for path in ("/v1/detect", "/v1/models/oiod:predict"):
            resp = await client.post(path, data=body, headers=hj)
            err = await _error(resp, 400)
            assert err["code"] in ("bad_json", "bad_request"), (what, path, err)
    # Numbers that parse but are nonsense.
    for opts in (
        {"max_detections": 1e300},
        {"max_detections": "9" * 5000},
        {"min_score": "1" * 5000},
        {"format": ["png"]},
        {"draw": {"x": 1}},
    ):
        resp = await client.post("/v1/detect", json={"image": _b64(blob_image()), **opts})
        await _error(resp, 400)


@pytest.mark.asyncio
async def test_non_utf8_authorization_is_401(make_client, monkeypatch):
    monkeypatch.setenv("OIOD_ADV_TOKEN", "tok-äöü-123")
    client = await make_client("serve.auth_token_env=OIOD_ADV_TOKEN")
    host, port = client.server.host, client.server.port
    for auth in (b"Bearer \xff\xfe\xfd", b"\xff\xfe \xc3", b"Bearer tok-\xc3\xa4\xc3\xb6\xc3\xbc-12"):
        raw = await _raw_http(
            host,
            port,
            b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + auth
            + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close"
            b"\r\n\r\n{}",
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), raw[:200]
        assert json.loads(body)["error"]["code"] == "unauthorized"
    # The right token, sent as UTF-8 bytes, still works.
    ok = await client.post(
        "/v1/detect", json={"image": _b64(blob_image())}, headers={"Authorization": "Bearer tok-äöü-123"}
    )
    assert ok.status == 200, await ok.text()


@pytest.mark.asyncio
async def test_redirect_to_malformed_url_is_4xx(make_client, image_server):
    for loc in (
        "http://[::1",
        "http://[::1]:99999/x",
        "http://",
        "ftp://example.com/x.jpg",
        "file:///etc/passwd",
    ):
        image_server.script("/r", [Reply(302, headers={"Location": loc})])
        client = await make_client("serve.allow_networks=['127.0.0.1']")
        resp = await client.post("/v1/detect", json={"image": image_server.url("/r")})
        assert 400 <= resp.status < 500, (loc, resp.status, await resp.text())
        await _error(resp, resp.status)
    client = await make_client()
    for url in ("http://[::1", "http://a b/", "http://%zz/", "http://x" + "y" * 70_000 + ".example/"):
        resp = await client.post("/v1/detect", json={"image": url})
        assert 400 <= resp.status < 500, (url[:40], resp.status)


@pytest.mark.asyncio
async def test_output_names_are_confined(make_client, tmp_path):
    out = tmp_path / "out"
    (out / "taken.png").mkdir(parents=True)
    (out / "file.png").write_bytes(b"x")
    (out / "config.resolved.yaml").write_text("serve: {}\n")
    client = await make_client(f"serve.output_dir={out}")
    img = _b64(blob_image())
    cases = {
        "taken.png": 409,  # an existing folder
        "file.png/x.png": 409,  # a file where a folder would have to be
        "config.resolved.yaml": 400,
        "config.resolved.yaml.png/../x.png": 400,
        ".hidden.png": 400,
        "a/.tmp.png": 400,
        "a//b.png": 400,
        "../x.png": 400,
        "x": 400,
        "x.gif": 400,
        "a\\b.png": 400,
        "a b.png": 400,
        "/abs.png": 400,
        "s3://bucket/x.png": 400,
        "/".join("d" * 9) + ".png": 400,
        "é.png": 400,
        "x.png\x00.png": 400,
    }
    for name, status in cases.items():
        resp = await client.post("/v1/detect", json={"image": img, "output": name})
        await _error(resp, status)
    assert (out / "config.resolved.yaml").read_text() == "serve: {}\n"
    resp = await client.post("/v1/detect", json={"image": img, "output": "x.png", "format": "jpeg"})
    await _error(resp, 400)  # extension and format disagree
    resp = await client.post("/v1/detect", json={"image": img, "output": "runs/1/a.jpeg"})
    assert resp.status == 200, await resp.text()
    assert (out / "runs" / "1" / "a.jpeg").read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.asyncio
async def test_static_and_unknown_paths_are_json(make_client):
    client = await make_client()
    for path in ("/static/nope.js", "/static/..%2Fapp.py", "/static/", "/static/%00"):
        resp = await client.get(path)
        err = await _error(resp, 404)
        assert err["code"] == "not_found"
    assert (await client.get("/static/app.js")).status == 200


def test_aiohttp_parse_errors_are_json_without_echo_or_traceback(loaded_model, export_dir, caplog):
    """aiohttp's own 400s (bad request line, oversized header, bad chunking) are JSON, echo nothing
    and log one line, not a traceback."""
    import logging

    bad = [
        b"GET /\x01<script>alert(1)</script> HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"<script>" * 2000 + b"\r\n\r\n",
        b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz<script>\r\n",
        b"\x16\x03\x01\x02\x00<script>\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    ]
    caplog.set_level(logging.INFO)
    with ServiceThread(_cfg(export_dir), loaded_model) as svc:
        for data in bad:
            with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
                s.sendall(data)
                raw = b""
                while chunk := s.recv(65536):
                    raw += chunk
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.split(b" ", 2)[1] in (b"400", b"431"), raw[:200]
            assert b"application/json" in head and b"<script>" not in raw
            assert json.loads(body)["error"]["code"] == "bad_request"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# --------------------------------------------------------------------------- item 3: slow clients


def _dribbler(port: int, body: bool = False) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if body:
        s.sendall(
            b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"image": "'
        )
    else:
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return s


def _closed_by_peer(s: socket.socket, within: float) -> tuple[bool, bytes]:
    s.settimeout(within)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
        return True, data
    except TimeoutError:
        return False, data
    except ConnectionError:
        return True, data


def test_slow_headers_and_bodies_time_out(loaded_model, export_dir):
    cfg = _cfg(export_dir, "serve.header_timeout_s=1", "serve.body_timeout_s=1")
    with ServiceThread(cfg, loaded_model) as svc:
        head, body = _dribbler(svc.port), _dribbler(svc.port, body=True)
        t0 = time.monotonic()
        closed, _ = _closed_by_peer(head, 6)
        assert closed and time.monotonic() - t0 < 6
        closed, data = _closed_by_peer(body, 6)
        assert closed and data.startswith(b"HTTP/1.1 408"), data[:200]
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        head.close()
        body.close()


def test_connection_limit_keeps_healthz_reachable(loaded_model, export_dir):
    """More dribbling clients than serve.max_connections: the oldest idle ones are closed to make room,
    /healthz keeps answering, the process's connection count stays at the limit."""
    import requests

    cfg = _cfg(export_dir, "serve.max_connections=20", "serve.header_timeout_s=60")
    with ServiceThread(cfg, loaded_model) as svc:
        socks = [_dribbler(svc.port) for _ in range(60)]
        lat = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert requests.get(svc.url("/healthz"), timeout=5).status_code == 200
            lat.append(time.perf_counter() - t0)
        metrics = requests.get(svc.url("/metrics"), timeout=5).text
        for s in socks:
            s.close()
    evicted = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith('oiod_connections_closed_total{reason="idle_evicted"}')
    ]
    assert evicted and float(evicted[0].split()[-1]) >= 40
    opened = [ln for ln in metrics.splitlines() if ln.startswith("oiod_open_connections ")]
    assert float(opened[0].split()[-1]) <= 20
    print(f"\n60 dribblers, limit 20: /healthz max {max(lat) * 1000:.1f} ms")


def _serve_subprocess(
    export_dir: Path, tmp_path: Path, nofile: int, *sets: str
) -> tuple[subprocess.Popen, int]:
    """``oiod serve`` in a child process whose open-file limit is ``nofile`` (set by the shell)."""
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    cmd = [
        "sh",
        "-c",
        f'ulimit -n {int(nofile)} && exec "$@"',
        "sh",
        sys.executable,
        "-m",
        "openimages_od.cli",
        "serve",
        "--model",
        str(export_dir),
        "--port",
        str(port),
    ]
    for s in sets:
        cmd += ["--set", s]
    with open(tmp_path / "stderr.log", "wb") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    return proc, port


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "service never became ready"
        time.sleep(0.3)


# The attackers run in their own process, so the probes below time the service, not the test's GIL.
_ATTACK = r"""
import asyncio, json, sys, time

PORT, DURATION, DRIBBLERS = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
BODY = json.dumps({"image": "A" + " " * 80000 + "!"}).encode()
REQ = (b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
       b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY
stats = {"reconnects": 0, "spaces": 0, "spaces_status": {}}

async def dribble(stop):
    while time.monotonic() < stop:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", PORT)
            w.write(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while time.monotonic() < stop and not r.at_eof():
                w.write(b"a")
                await w.drain()
                await asyncio.sleep(0.5)
            w.close()
        except OSError:
            pass
        stats["reconnects"] += 1
        await asyncio.sleep(0.2)

async def spaces(stop):
    while time.monotonic() < stop:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", PORT)
            w.write(REQ)
            head = (await asyncio.wait_for(r.read(), 60))[:12].decode(errors="replace")
            w.close()
            stats["spaces"] += 1
            stats["spaces_status"][head] = stats["spaces_status"].get(head, 0) + 1
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)

async def main():
    stop = time.monotonic() + DURATION
    await asyncio.gather(*[dribble(stop) for _ in range(DRIBBLERS)], *[spaces(stop) for _ in range(4)])

asyncio.run(main())
print(json.dumps(stats))
"""


def test_acceptance_healthz_under_slow_clients_and_80k_spaces(export_dir, tmp_path):
    """Acceptance 2: ``oiod serve`` with a 256-descriptor limit, 300 dribbling clients that reconnect
    when dropped, and 80,000-space requests arriving all the time: /healthz answers within 1 s (the
    median; every probe within a bound generous for a shared 2-core CI machine), the process
    survives, and the log has no traceback flood. Uses only settings the old code had too."""
    import requests

    proc, port = _serve_subprocess(export_dir, tmp_path, 256, "serve.access_log=false")
    try:
        _wait_ready(proc, port, tmp_path / "stderr.log")
        attack = subprocess.Popen(
            [sys.executable, "-c", _ATTACK, str(port), "9", "300"], stdout=subprocess.PIPE, text=True
        )
        time.sleep(2.5)  # the dribblers fill the connection table first
        lat = []
        while attack.poll() is None and len(lat) < 15:
            t0 = time.perf_counter()
            try:
                ok = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            lat.append(time.perf_counter() - t0 if ok else float("inf"))
            time.sleep(0.3)
        out, _ = attack.communicate(timeout=90)
        stats = json.loads(out.strip().splitlines()[-1])
        assert proc.poll() is None
        print(
            f"\nacceptance 2: 300 dribbling clients (256-fd limit, {stats['reconnects']} reconnects) + "
            f"{stats['spaces']} 80k-space requests {stats['spaces_status']}: /healthz median "
            f"{statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms over {len(lat)} probes"
        )
        assert len(lat) >= 5
        assert statistics.median(lat) < 1.0 and max(lat) < 3.0, lat
        # Each 80k-space request is refused with a 400, or, while the connection table is full, shed:
        # closed unanswered ('') or a JSON 503 "busy". Never any other status, never a hang.
        assert stats["spaces"] >= 4 and stats["spaces_status"].get("HTTP/1.1 400", 0) >= 1, stats
        assert set(stats["spaces_status"]) <= {"HTTP/1.1 400", "HTTP/1.1 503", ""}, stats
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = (tmp_path / "stderr.log").read_bytes()
    print(f"acceptance 2: the service wrote {len(log)} bytes of log in all")
    assert b"Traceback" not in log, log[-3000:].decode(errors="replace")
    assert len(log) < 100_000, f"{len(log)} bytes of log"


# --------------------------------------------------------------------------- items 2 and 4: s3:// sources


@pytest.fixture
def fake_s3():
    with FakeS3() as s3:
        yield s3


def _fake_storage(fake: FakeS3):
    from openimages_od.storage import Storage

    return Storage(
        s3=S3Options(endpoint_url=fake.endpoint, region="us-east-1", addressing_style="path", unsigned=True)
    )


@pytest.mark.asyncio
async def test_stalling_s3_endpoint_does_not_starve_uploads(make_client, fake_s3):
    """Item 4: requests naming objects on a stalling S3 endpoint get 504 at the fetch deadline and
    the endpoint sees the connection closed then (the work stops, not only the wait), while a plain
    upload sent meanwhile is answered at once."""
    client = await make_client(
        "serve.allowed_image_prefixes=['s3://imgs/']",
        "serve.fetch_timeout_s=1.5",
        "serve.fetch_workers=2",
        storage=_fake_storage(fake_s3),
    )
    img = _b64(blob_image())
    # Warm-up: the first S3 request builds the boto3 signer (over a second on a loaded 2-core CI
    # machine), which would otherwise eat the 1.5 s deadline before any GET reaches the endpoint.
    fake_s3.objects[("imgs", "ok/warm.png")] = blob_image()
    warm = await client.post("/v1/detect", json={"image": "s3://imgs/ok/warm.png"})
    assert warm.status == 200, await warm.text()
    fake_s3.methods.clear()

    async def upload() -> float:
        await asyncio.sleep(0.3)  # the stalls are in flight by now
        t0 = time.perf_counter()
        resp = await client.post("/v1/detect", json={"image": img})
        assert resp.status == 200, await resp.text()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    *stalled, upload_s = await asyncio.gather(
        *(client.post("/v1/detect", json={"image": f"s3://imgs/stall/{i}.png"}) for i in range(12)), upload()
    )
    # 12 stalls on 2 fetch workers: a request still queued for a worker when its wait ends is
    # refused as busy (503, never connected); the rest time out at the fetch deadline (504).
    codes = []
    for r in stalled:
        err = await _error(r, 504 if r.status == 504 else 503)
        assert err["code"] == ("fetch_timeout" if r.status == 504 else "busy"), err
        codes.append(err["code"])
    assert "fetch_timeout" in codes
    elapsed = time.perf_counter() - t0
    t1 = time.monotonic()  # the endpoint's handlers record the hang-up when they next write
    while len(fake_s3.stall_ended) < fake_s3.methods["GET"] and time.monotonic() - t1 < 3:
        await asyncio.sleep(0.1)
    print(
        f"\nstalling S3 x12: upload answered in {upload_s * 1000:.0f} ms; stalled requests 504 after "
        f"{elapsed:.2f} s; {fake_s3.methods['GET']} GETs reached the endpoint, hung up after "
        f"{max(fake_s3.stall_ended, default=float('nan')):.2f} s"
    )
    assert upload_s < 1.0
    # Every GET that reached the endpoint was hung up by the deadline (the rest never connected).
    assert fake_s3.methods["GET"] == len(fake_s3.stall_ended) >= 1
    assert max(fake_s3.stall_ended) < 1.5 + 1.0
    assert fake_s3.methods["HEAD"] == 0


@pytest.mark.asyncio
async def test_stalling_output_store_gives_504_and_frees_its_thread(make_client, fake_s3):
    """Item 4, writes: an ``output`` write to a stalling S3 endpoint is a 504 at serve.work_timeout_s,
    the write itself gives up shortly after (short client timeouts, 2 attempts), and requests without
    ``output`` are not slowed down meanwhile."""
    from openimages_od.serving.state import STATE

    client = await make_client(
        "serve.output_dir=s3://imgs/stall",
        "serve.work_timeout_s=2",
        "serve.output_workers=1",
        storage=_fake_storage(fake_s3),
    )
    img = _b64(blob_image())
    # Warm-up: the model's first calls (over a second on a loaded 2-core CI machine) are not what
    # the plain request below measures.
    warm = await client.post("/v1/detect", json={"image": img})
    assert warm.status == 200, await warm.text()

    async def plain() -> float:
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        resp = await client.post("/v1/detect", json={"image": img})
        assert resp.status == 200, await resp.text()
        return time.perf_counter() - t0

    a, b, plain_s = await asyncio.gather(
        client.post("/v1/detect", json={"image": img, "output": "a.png"}),
        client.post("/v1/detect", json={"image": img, "output": "b.png"}),
        plain(),
    )
    stalled, busy = sorted((a, b), key=lambda r: -r.status)
    assert (await _error(stalled, 504))["code"] == "output_timeout"
    assert (await _error(busy, 503))["code"] == "busy"  # the single output thread was taken
    pool = client.app[STATE].pools.output
    t0 = time.monotonic()
    while pool.running and time.monotonic() - t0 < 10:
        await asyncio.sleep(0.1)
    print(
        f"\nstalling output store: 504 at the 2 s deadline, the write thread freed {time.monotonic() - t0:.2f} s "
        f"later; a plain request meanwhile took {plain_s * 1000:.0f} ms"
    )
    assert pool.running == 0 and time.monotonic() - t0 < 4
    assert plain_s < 1.0
    assert fake_s3.put_stall_ended and max(fake_s3.put_stall_ended) < 2.5


@pytest.mark.asyncio
async def test_s3_sources_off_by_default_and_confined(make_client, fake_s3):
    """Item 2: s3:// images are refused unless allowed; outside the allowed prefixes nothing is even
    requested; missing and unreadable objects read the same; sizes are not revealed; one GET."""
    fake_s3.objects[("imgs", "ok/a.png")] = blob_image()
    fake_s3.objects[("imgs", "ok/big.png")] = b"\x89PNG" + b"\0" * (3 * 1024 * 1024)
    fake_s3.objects[("imgs", "secret/a.png")] = blob_image()
    fake_s3.denied.add(("imgs", "ok/denied.png"))
    storage = _fake_storage(fake_s3)

    client = await make_client(storage=storage)
    for url in ("s3://imgs/ok/a.png", "s3://other/x.png", "S3://imgs/ok/a.png"):
        err = await _error(await client.post("/v1/detect", json={"image": url}), 403)
        assert err["code"] == "s3_not_allowed"
    assert sum(fake_s3.methods.values()) == 0

    client = await make_client(
        "serve.allowed_image_prefixes=['s3://imgs/ok']", "serve.max_body_mb=2", storage=storage
    )
    resp = await client.post("/v1/detect", json={"image": "s3://imgs/ok/a.png", "draw": True})
    assert resp.status == 200 and (await resp.json())["num_detections"] == 2
    before = sum(fake_s3.methods.values())
    for url in (
        "s3://imgs/secret/a.png",
        "s3://imgs/ok-private/a.png",
        "s3://imgs/okx.png",
        "s3://other/ok/a.png",
    ):
        err = await _error(await client.post("/v1/detect", json={"image": url}), 403)
        assert err["code"] == "s3_not_allowed"
    for url in (
        "s3://imgs/ok/../secret/a.png",
        "s3://imgs/ok/./a.png",
        "s3://imgs/ok//a.png",
        "s3://imgs/ok/a.png\r\nX: y",
        "s3://imgs/ok/" + "k" * 2000,
    ):
        err = await _error(await client.post("/v1/detect", json={"image": url}), 400)
        assert err["code"] == "bad_url"
    assert sum(fake_s3.methods.values()) == before, "a refused URL reached the endpoint"
    missing = await _error(await client.post("/v1/detect", json={"image": "s3://imgs/ok/missing.png"}), 422)
    denied = await _error(await client.post("/v1/detect", json={"image": "s3://imgs/ok/denied.png"}), 422)
    assert missing == denied
    big = await _error(await client.post("/v1/detect", json={"image": "s3://imgs/ok/big.png"}), 413)
    assert str(3 * 1024 * 1024 + 4) not in big["message"]
    assert fake_s3.methods["HEAD"] == 0


@pytest.mark.asyncio
async def test_s3_source_on_seaweedfs(make_client, seaweedfs, s3_bucket, s3_options):
    """The allowed-prefix read against a real S3 server with signed requests."""
    from openimages_od.storage import Storage

    st = Storage(s3=s3_options)
    st.write_bytes(f"s3://{s3_bucket}/pub/a.png", blob_image())
    st.write_bytes(f"s3://{s3_bucket}/private/a.png", blob_image())
    client = await make_client(f"serve.allowed_image_prefixes=['s3://{s3_bucket}/pub/']", storage=st)
    resp = await client.post("/v1/detect", json={"image": f"s3://{s3_bucket}/pub/a.png"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["num_detections"] == 2
    await _error(await client.post("/v1/detect", json={"image": f"s3://{s3_bucket}/private/a.png"}), 403)
    missing = await _error(
        await client.post("/v1/detect", json={"image": f"s3://{s3_bucket}/pub/nope.png"}), 422
    )
    assert "nope" not in missing["message"]


# --------------------------------------------------------------------------- item 11 (service part)


def test_token_in_auth_token_env_is_never_printed(export_dir, loaded_model, tmp_path, monkeypatch):
    from openimages_od.errors import ConfigError
    from openimages_od.serving.app import create_app

    secret = "sk-live-9f8e7d6c5b4a"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"serve:\n  model: {export_dir}\n  auth_token_env: {secret}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(cfg_file))
    assert secret not in str(ei.value) and "auth_token_env" in str(ei.value)
    # A token that happens to look like a variable name: refused without being repeated.
    hexlike = "deadbeefcafe0123456789abcdef"
    monkeypatch.delenv(hexlike, raising=False)
    with pytest.raises(ConfigError) as ei:
        create_app(_cfg(export_dir, f"serve.auth_token_env={hexlike}"), loaded_model)
    assert hexlike not in str(ei.value)
    monkeypatch.delenv("OIOD_UNSET_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="OIOD_UNSET_TOKEN"):  # a conventional name is still named
        create_app(_cfg(export_dir, "serve.auth_token_env=OIOD_UNSET_TOKEN"), loaded_model)


# --------------------------------------------------------------------------- pools


@pytest.mark.asyncio
async def test_work_pool_deadline_busy_and_slot_release():
    import threading

    from openimages_od.serving.errors import ApiError
    from openimages_od.serving.pools import WorkPool

    pool = WorkPool("draw", 1, 0.3)
    gate = threading.Event()
    try:
        with pytest.raises(ApiError) as ei:
            await pool.run(gate.wait, 5)  # runs past its deadline
        assert ei.value.status == 504 and ei.value.code == "draw_timeout"
        # The thread is still busy: the slot is not given back until it really finishes.
        with pytest.raises(ApiError) as ei:
            await pool.run(lambda: 1, timeout_s=0.2)
        assert ei.value.status == 503
        gate.set()
        await asyncio.sleep(0.1)
        assert await pool.run(lambda: 42) == 42 and pool.running == 0
    finally:
        gate.set()
        pool.close()


# --------------------------------------------------------------------------- property-based fuzzing


def test_fuzz_request_primitives():
    """hypothesis: the parsing primitives either return a value or raise a 4xx ApiError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from openimages_od.serving.errors import ApiError
    from openimages_od.serving.request import decode_base64, loads_json

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.text(), st.text(alphabet="AB+/=-_ \n\t!é", max_size=500)))
    def b64_any(s: str) -> None:
        try:
            decode_base64(s)
        except ApiError as exc:
            assert 400 <= exc.status < 500

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.sampled_from(" \n\t\r"), max_size=20), st.booleans())
    def b64_roundtrip(data: bytes, ws: list[str], urlsafe: bool) -> None:
        enc = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
        for i, c in enumerate(ws):
            pos = (i * 7919) % (len(enc) + 1)
            enc = enc[:pos] + c + enc[pos:]
        if data:
            assert decode_base64(enc) == data

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(10**30), 10**30)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20),
        lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=5), ch, max_size=4),
        max_leaves=30,
    )

    @settings(max_examples=200, deadline=None)
    @given(json_values)
    def json_roundtrip(v: object) -> None:
        assert loads_json(json.dumps(v).encode()) == v

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.binary(max_size=400),
            st.text(alphabet='[]{}":,0123456789.eE-+ atrufnlsNI\\', max_size=400).map(str.encode),
        )
    )
    def json_any(b: bytes) -> None:
        try:
            loads_json(b)
        except ApiError as exc:
            assert exc.status == 400

    b64_any()
    b64_roundtrip()
    json_roundtrip()
    json_any()


def test_fuzz_detect_requests_over_http(loaded_model, export_dir):
    """hypothesis: arbitrary bodies, content types, options and headers sent to the running service are
    never answered with a 5xx, and every error is the JSON shape."""
    import requests
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from openimages_od.serving.safe_fetch import StaticResolver

    good = _b64(blob_image(size=(64, 48), blobs={}))
    image_strings = st.one_of(
        st.just(good),
        st.just("data:image/png;base64," + good),
        st.text(max_size=200),
        st.sampled_from(
            [
                "http://[::1",
                "s3://b/k",
                "ftp://x/y",
                "http://10.0.0.1/x.jpg",
                "data:text/plain;base64,aGk=",
                "data:,x",
                " " * 300 + "!",
            ]
        ),
    )
    options = st.fixed_dictionaries(
        {},
        optional={
            "min_score": st.one_of(st.floats(), st.integers(), st.text(max_size=10), st.none()),
            "max_detections": st.one_of(st.integers(-5, 10**6), st.floats(), st.text(max_size=10)),
            "draw": st.one_of(st.booleans(), st.text(max_size=5), st.integers()),
            "format": st.one_of(st.sampled_from(["png", "jpeg", "gif"]), st.integers()),
            "output": st.text(max_size=30),
            "junk": st.integers(),
        },
    )
    bodies = st.one_of(
        st.builds(
            lambda img, o: ("application/json", json.dumps({"image": img, **o}).encode()),
            image_strings,
            options,
        ),
        st.builds(lambda b: ("application/json", b), st.binary(max_size=300)),
        st.builds(
            lambda b, ct: (ct, b),
            st.binary(max_size=300),
            st.sampled_from(
                [
                    "image/png",
                    "multipart/form-data; boundary=x",
                    "text/plain",
                    "",
                    "application/json; charset=latin-1",
                    "multipart/form-data",
                ]
            ),
        ),
    )
    paths = st.sampled_from(
        [
            "/v1/detect",
            "/v1/detect?draw=1&format=png",
            "/v1/detect?max_detections=1e999",
            "/v1/models/oiod:predict",
            "/v1/models/x:predict",
        ]
    )

    cfg = _cfg(export_dir, "serve.max_body_mb=1", "serve.fetch_timeout_s=2")
    with ServiceThread(cfg, loaded_model, resolver=StaticResolver({})) as svc:
        session = requests.Session()

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            bodies,
            paths,
            st.dictionaries(
                st.sampled_from(["Authorization", "X-Request-ID", "Accept"]),
                st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80).map(
                    str.strip
                ),  # requests refuses edge spaces
                max_size=3,
            ),
        )
        def one(body: tuple[str, bytes], path: str, headers: dict[str, str]) -> None:
            ctype, data = body
            resp = session.post(
                svc.url(path), data=data, headers={**headers, "Content-Type": ctype}, timeout=30
            )
            assert resp.status_code < 500, (path, ctype, data[:100], resp.status_code, resp.text[:300])
            if resp.status_code >= 400:
                assert set(resp.json()["error"]) == {"code", "message"}

        one()
        assert requests.get(svc.url("/healthz"), timeout=5).status_code == 200
