"""The storage layer: one suite, run on local disk and on a real SeaweedFS server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest

from openimages_od.config import S3Options
from openimages_od.storage import (
    AccessDenied,
    ObjectNotFound,
    ReadOnlyLocation,
    Storage,
    StorageError,
    TransientStorageError,
    local_path,
    retry_call,
)


def test_write_read_roundtrip(storage_root):
    root, st = storage_root
    url = f"{root}/a/b/c.bin"
    st.write_bytes(url, b"hello world")
    assert st.read_bytes(url) == b"hello world"
    assert st.exists(url)
    assert st.size(url) == 11
    assert not st.exists(f"{root}/a/b/missing.bin")


def test_ranged_read(storage_root):
    root, st = storage_root
    url = f"{root}/range.bin"
    st.write_bytes(url, bytes(range(100)))
    assert st.read_range(url, 10, 20) == bytes(range(10, 20))
    assert st.read_range(url, 95) == bytes(range(95, 100))
    assert st.read_range(url, 5, 5) == b""


def test_missing_object_names_url(storage_root):
    root, st = storage_root
    url = f"{root}/nope/never.txt"
    with pytest.raises(ObjectNotFound) as ei:
        st.read_bytes(url)
    assert url in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, OSError)


def test_list_by_prefix_sorted_and_scoped(storage_root):
    root, st = storage_root
    for name in ("x/2.txt", "x/1.txt", "x/sub/3.txt", "xy/4.txt", "y/5.txt"):
        st.write_bytes(f"{root}/{name}", name.encode())
    listed = [o.url for o in st.list(f"{root}/x/")]
    assert listed == [f"{root}/x/1.txt", f"{root}/x/2.txt", f"{root}/x/sub/3.txt"]
    partial = [o.url.rsplit("/", 2)[-2] for o in st.list(f"{root}/x")]
    assert "xy" in partial and "y" not in partial
    sizes = {o.url: o.size for o in st.list(f"{root}/y/")}
    assert sizes == {f"{root}/y/5.txt": 7}


def test_delete_is_idempotent(storage_root):
    root, st = storage_root
    url = f"{root}/del.txt"
    st.write_bytes(url, b"x")
    st.delete(url)
    assert not st.exists(url)
    st.delete(url)  # no error


def test_open_write_commits_only_on_success(storage_root):
    root, st = storage_root
    url = f"{root}/stream.bin"
    with pytest.raises(RuntimeError):
        with st.open_write(url) as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert not st.exists(url)
    assert st.list(f"{root}/") == []  # no temp file visible either
    with st.open_write(url) as fh:
        fh.write(b"a" * 1000)
        fh.write(b"b" * 1000)
    assert st.read_bytes(url) == b"a" * 1000 + b"b" * 1000


def test_overwrite_is_atomic_for_readers(storage_root):
    """A reader racing a writer sees the old or the new object, never a mix."""
    root, st = storage_root
    url = f"{root}/atomic.bin"
    old, new = b"o" * 200_000, b"n" * 300_000
    st.write_bytes(url, old)
    seen = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            data = st.read_bytes(url)
            seen.add((len(data), data[:1], data[-1:]))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(5):
        st.write_bytes(url, new)
        st.write_bytes(url, old)
    stop.set()
    t.join()
    assert seen <= {(200_000, b"o", b"o"), (300_000, b"n", b"n")}


def test_upload_and_download_file(storage_root, tmp_path):
    root, st = storage_root
    src = tmp_path / "big.bin"
    src.write_bytes(b"z" * (3 << 20))
    url = f"{root}/files/big.bin"
    st.upload_file(src, url)
    dest = st.download_file(url, tmp_path / "out" / "big.bin")
    assert dest.read_bytes() == src.read_bytes()
    cached = st.cached_local(url, tmp_path / "cache")
    assert cached.read_bytes() == src.read_bytes()


def test_json_helpers(storage_root):
    root, st = storage_root
    st.write_json(f"{root}/j.json", {"b": 1, "a": [1, 2]})
    assert st.read_json(f"{root}/j.json") == {"a": [1, 2], "b": 1}
    st.write_bytes(f"{root}/bad.json", b"{nope")
    with pytest.raises(StorageError, match=r"bad\.json"):
        st.read_json(f"{root}/bad.json")


@pytest.mark.integration
def test_multipart_upload_on_seaweedfs(seaweedfs, s3_bucket, s3_options, tmp_path):
    opts = s3_options.model_copy(update={"multipart_threshold_mb": 5})
    st = Storage(s3=opts)
    data = bytes(range(256)) * (24 * 1024 + 7)  # ~6 MB: above the threshold
    url = f"s3://{s3_bucket}/mp/data.bin"
    st.write_bytes(url, data)
    head = seaweedfs.client().head_object(Bucket=s3_bucket, Key="mp/data.bin")
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"]  # multipart ETags carry a part count
    assert st.read_bytes(url) == data


@pytest.mark.integration
def test_test_store_takes_writes_in_many_buckets(seaweedfs):
    """Every bucket is a SeaweedFS collection with volumes of its own; `weed mini` by default allows only
    free-disk / 1 GiB volumes, so on a CI disk with ~24 GiB free the suite's 25th bucket refused every
    PutObject ("no free volumes left"). The dev store sets the volume count itself."""
    import json
    import urllib.request

    from openimages_od.devservices import VOLUME_MAX

    # The limit the master enforces, whatever this disk's free space (the writes below alone would
    # pass on the old default wherever the disk has room for 40 more 1 GiB volumes).
    status = f"http://{seaweedfs.ip}:{seaweedfs.ports['master']}/dir/status"
    with urllib.request.urlopen(status, timeout=10) as resp:
        assert json.load(resp)["Topology"]["Max"] == VOLUME_MAX
    client = seaweedfs.client()
    for i in range(40):
        name = f"many-{i:02d}-{uuid.uuid4().hex[:8]}"
        seaweedfs.create_bucket(name)
        client.put_object(Bucket=name, Key="k", Body=b"v")
        assert client.get_object(Bucket=name, Key="k")["Body"].read() == b"v"


@pytest.mark.integration
def test_wrong_credentials_is_access_denied(seaweedfs, s3_bucket, s3_options, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    st = Storage(s3=s3_options.model_copy(update={"max_attempts": 1, "connect_timeout_s": 3.0}))
    with pytest.raises(AccessDenied) as ei:
        st.write_bytes(f"s3://{s3_bucket}/x.txt", b"x")
    assert s3_bucket in str(ei.value)


@pytest.mark.integration
def test_stopped_server_fails_fast_naming_url(tmp_path):
    """With SeaweedFS stopped, reads fail within bounded time, as a clear OSError."""
    from openimages_od.devservices import SeaweedFS

    sw = SeaweedFS(workdir=str(tmp_path / "sw")).start()
    sw.create_bucket("stopped-bucket")
    opts = S3Options(
        endpoint_url=sw.endpoint,
        region="us-east-1",
        max_attempts=3,
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
    )
    import os

    os.environ.setdefault("AWS_ACCESS_KEY_ID", sw.access_key)
    st = Storage(s3=opts)
    sw.stop()
    url = "s3://stopped-bucket/some/key.bin"
    t0 = time.monotonic()
    with pytest.raises(TransientStorageError) as ei:
        st.read_bytes(url)
    assert time.monotonic() - t0 < 20
    assert url in str(ei.value)
    assert isinstance(ei.value, OSError)
    assert ei.value.__cause__ is not None


@pytest.mark.integration
def test_cli_reports_unreachable_store_without_traceback(tmp_path):
    from openimages_od.devservices import free_port

    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "source:\n  class_descriptions: s3://meta-bucket/classes.csv\n  s3:\n"
        f"    endpoint_url: http://127.0.0.1:{port}\n    max_attempts: 2\n    connect_timeout_s: 1\n"
        "  splits:\n    train:\n      boxes: s3://meta-bucket/train-boxes.csv\n"
        f"output:\n  url: {tmp_path}/out\n"
    )
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/usr/bin:/bin"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "openimages_od", "plan", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert time.monotonic() - t0 < 60
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "s3://meta-bucket/" in proc.stderr


def test_http_is_read_only(image_server):
    url = image_server.add("meta/classes.csv", b"/m/01,Thing\n", content_type="text/csv")
    st = Storage()
    assert st.read_bytes(url) == b"/m/01,Thing\n"
    assert st.read_range(url, 3, 5) == b"01"
    assert st.exists(url) and not st.exists(image_server.url("meta/none.csv"))
    with pytest.raises(ReadOnlyLocation):
        st.write_bytes(url, b"x")
    with pytest.raises(ObjectNotFound, match=r"none\.csv"):
        st.read_bytes(image_server.url("meta/none.csv"))


def test_http_transient_errors_are_retried(image_server):
    from openimages_od.devservices import Reply

    url = image_server.script(
        "flaky.csv", [Reply(503, b"busy"), Reply(500, b"err"), Reply(200, b"ok", content_type="text/csv")]
    )
    assert Storage().read_bytes(url) == b"ok"
    assert image_server.hits["/flaky.csv"] == 3


def test_retry_call_backoff_is_capped_and_gives_up():
    sleeps: list[float] = []
    calls = {"n": 0}

    def fail():
        calls["n"] += 1
        raise TransientStorageError("s3://b/k", "down")

    with pytest.raises(TransientStorageError):
        retry_call(fail, attempts=6, base_s=1.0, cap_s=3.0, sleep=sleeps.append)
    assert calls["n"] == 6
    assert len(sleeps) == 5 and max(sleeps) <= 3.0


def test_retry_call_does_not_retry_permanent_errors():
    calls = {"n": 0}

    def fail():
        calls["n"] += 1
        raise ObjectNotFound("s3://b/k")

    with pytest.raises(ObjectNotFound):
        retry_call(fail, attempts=5, sleep=lambda s: None)
    assert calls["n"] == 1


def test_unsupported_scheme_and_paths(tmp_path):
    with pytest.raises(StorageError, match="unsupported URL scheme"):
        Storage().read_bytes("ftp://host/file")
    assert local_path(f"file://{tmp_path}/a") == tmp_path / "a"
    assert local_path("s3://b/k") is None


def test_local_writes_fsync_unless_the_caller_says_not_durable(tmp_path, monkeypatch):
    """``durable=False`` (the image cache) skips the fsync, not the atomic rename."""
    import os

    from openimages_od.storage import Storage

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    st = Storage()
    st.write_bytes(str(tmp_path / "a" / "durable.bin"), b"x" * 10)
    assert len(synced) == 1
    st.write_bytes(str(tmp_path / "a" / "cache.bin"), b"y" * 10, durable=False)
    assert len(synced) == 1
    assert (tmp_path / "a" / "cache.bin").read_bytes() == b"y" * 10
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cache.bin", "durable.bin"]  # no temp left
