"""Shared fixtures: real local services on free loopback ports.

* ``seaweedfs`` (session): a real S3-compatible store (SeaweedFS `weed mini`);
  the AWS credential variables are set for the session so the standard chain
  finds them.
* ``s3_bucket``: a fresh bucket on it; ``s3_options``: S3Options for it.
* ``image_server``: an aiohttp server with scripted faults (see devservices).
* ``ray_local`` (session): one embedded Ray instance for the whole run.
* ``storage_root``: parametrized over local disk and SeaweedFS, for suites
  that must hold on both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from openimages_od.config import S3Options
from openimages_od.devservices import ImageServer, SeaweedFS

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="session")
def seaweedfs():
    with SeaweedFS() as sw:
        saved = {k: os.environ.get(k) for k in sw.env()}
        os.environ.update({k: v for k, v in sw.env().items() if k.startswith("AWS_")})
        try:
            yield sw
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_bucket(seaweedfs) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(name)
    return name


@pytest.fixture
def s3_options(seaweedfs) -> S3Options:
    return S3Options(
        endpoint_url=seaweedfs.endpoint,
        region="us-east-1",
        addressing_style="path",
        max_attempts=3,
        connect_timeout_s=2,
        read_timeout_s=10,
    )


@pytest.fixture
def image_server():
    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def ray_local(seaweedfs):
    # After `seaweedfs`: its credentials are in the environment before the raylet starts, so the
    # workers inherit them (prepare forwards no credential through runtime_env).
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="oiodray", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        _temp_dir=tmp,
        namespace="oiod-tests",
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """(root_url, Storage) on local disk and on SeaweedFS."""
    from openimages_od.storage import Storage

    if request.param == "local":
        return f"file://{tmp_path}/root", Storage()
    request.getfixturevalue("seaweedfs")
    bucket = request.getfixturevalue("s3_bucket")
    opts = request.getfixturevalue("s3_options")
    return f"s3://{bucket}/root", Storage(s3=opts)


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
