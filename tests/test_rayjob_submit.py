"""The chart's prepare RayJob entrypoint, submitted with `ray job submit` to a real local Ray head.

The chart renders `oiod prepare -c /etc/oiod/config.yaml` plus the project config as a
ConfigMap; here both are taken from the rendered objects, the config is written to a
temp file at the path the entrypoint names (rewritten to the temp location), and the
job runs on a local head started with `ray start --head` on free ports, fetching a tiny
generated dataset from a local HTTP server.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from openimages_od.devservices import ImageServer, free_port
from openimages_od.synth import generate_dataset

pytestmark = [pytest.mark.integration, pytest.mark.k8s, pytest.mark.slow]

helm_chart = pytest.importorskip("test_helm_chart")

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    ports = {
        k: free_port() for k in ("gcs", "dash", "client", "om", "nm", "agent", "agent_grpc", "rte", "metrics")
    }
    temp_dir = tempfile.mkdtemp(prefix="oiodhead", dir="/tmp")
    # Ray 2.5x+ authenticates the job API with a token: give head and client the same one.
    import secrets

    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        f"--port={ports['gcs']}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dash']}",
        f"--ray-client-server-port={ports['client']}",
        f"--object-manager-port={ports['om']}",
        f"--node-manager-port={ports['nm']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['rte']}",
        f"--metrics-export-port={ports['metrics']}",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(tmp_path / "ray-head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dash']}"
    deadline = time.monotonic() + 120
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"ray start exited {proc.returncode}: {(tmp_path / 'ray-head.log').read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # answering (e.g. 401: Ray 2.5x+ token auth); the job CLI authenticates itself
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("Ray head dashboard did not come up")
    try:
        yield address, env
    finally:
        # Stop only this head (not `ray stop`, which would kill every Ray on the host).
        with_pgid = os.getpgid(proc.pid)
        os.killpg(with_pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(with_pgid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_chart_prepare_entrypoint_runs_as_a_ray_job(ray_head, tmp_path):
    address, env = ray_head
    with ImageServer() as server:
        ds = generate_dataset(tmp_path / "data", 12, base_url=server.url(""), seed=11)
        for im in ds.images:
            server.add(f"original/{im.split}/{im.image_id}.jpg", im.jpeg)
        values = {
            "config": {
                "source": {**ds.source_config(), "images": {"order": ["original"]}},
                "selection": {"classes": ["Ball", "Window", "Traffic sign"]},
                "output": {"url": f"file://{tmp_path}/out"},
                "ray": {
                    "address": "auto",
                    "num_actors": 1,
                    "num_cpus_per_actor": 0.5,
                    "concurrency_per_actor": 4,
                },
                "shards": {"images_per_shard": 8},
            }
        }
        objs = helm_chart.render_chart(values)
        (cm,) = [o for o in helm_chart.find(objs, "ConfigMap") if "config.yaml" in o.get("data", {})]
        entrypoint = helm_chart.prepare_entrypoint(values)
        argv = shlex.split(entrypoint)
        assert argv[:2] == ["oiod", "prepare"]
        cfg_path = tmp_path / "etc-oiod" / "config.yaml"
        cfg_path.parent.mkdir()
        cfg_path.write_text(cm["data"]["config.yaml"])
        assert yaml.safe_load(cfg_path.read_text())["ray"]["address"] == "auto"
        argv = [str(cfg_path) if a == helm_chart.CONFIG_PATH else a for a in argv]
        job_env = {**env, "OIOD_S3_ENDPOINT": "", "AWS_REGION": "us-east-1"}
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--", *argv],
            capture_output=True,
            text=True,
            timeout=600,
            env=job_env,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "succeeded" in (proc.stdout + proc.stderr).lower()
    shards = sorted((tmp_path / "out" / "tfrecords").rglob("*.tfrecord"))
    stats = sorted((tmp_path / "out" / "tfrecords").rglob("*.stats.json"))
    assert shards and len(stats) == len(shards)
    assert sum(server.hits.values()) >= len(ds.images)
