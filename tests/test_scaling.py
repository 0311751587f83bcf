"""Actors derived from the cluster's resources, and no credential forwarded through runtime_env.

The multi-node behaviour (late join, node loss, elastic growth, the dashboard
sweep) is in ``test_multinode.py``; these are the fast checks.
"""

from __future__ import annotations

import pytest
from pipeline_helpers import box, image_row, photo, write_plan

from openimages_od.config import RayConfig, load_config
from openimages_od.errors import ConfigError
from openimages_od.storage_setup import storage_from_config


def test_default_forward_env_holds_no_secret():
    assert RayConfig().forward_env == []
    assert load_config(None, []).ray.num_actors is None  # derived from the cluster by default


@pytest.mark.parametrize(
    "name",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "DB_PASSWORD",
        "HF_TOKEN",
        "API_KEY",
    ],
)
def test_forward_env_refuses_credential_names(name):
    with pytest.raises(ConfigError, match=rf"ray\.forward_env: .*{name}.*look like credentials.*dashboard"):
        load_config(None, [f"ray.forward_env=[AWS_DEFAULT_REGION, {name}]"])


def test_forward_env_accepts_plain_settings():
    cfg = load_config(
        None, ["ray.forward_env=[AWS_DEFAULT_REGION, AWS_PROFILE, OIOD_S3_ENDPOINT, KEYRING_BACKEND]"]
    )
    assert cfg.ray.forward_env == ["AWS_DEFAULT_REGION", "AWS_PROFILE", "OIOD_S3_ENDPOINT", "KEYRING_BACKEND"]


def test_prepare_refuses_a_config_holding_a_credential(tmp_path, monkeypatch):
    """A credential expanded into the config (e.g. ``${AWS_SECRET_ACCESS_KEY}`` in a URL) would be the
    actors' constructor argument and land in config.resolved.yaml: refused before anything runs."""
    from openimages_od.pipeline.distribute import run_prepare

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    cfg = load_config(None, [f"output.url={tmp_path}/out", "source.images.bucket=b-${AWS_SECRET_ACCESS_KEY}"])
    with pytest.raises(ConfigError, match=r"source\.images\.bucket \(from \$AWS_SECRET_ACCESS_KEY\)") as ei:
        run_prepare(cfg)
    assert "s3cr3t-value-xyz" not in str(ei.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_actors_follow_the_nodes_cpus(ray_local, image_server, tmp_path):
    """No ray.num_actors: the embedded 2-CPU node gets 2 / 0.5 = 4 actors (not more than shards)."""
    from openimages_od.pipeline.distribute import run_prepare

    rows = [
        image_row(
            f"f{i:015x}",
            original_url=image_server.add(f"f{i}.jpg", photo(64, 48, seed=i)),
            boxes=[box(1, 0.1, 0.5, 0.2, 0.6)],
        )
        for i in range(12)
    ]
    cfg = load_config(
        None,
        [
            f"output.url={tmp_path}/out",
            "ray.progress=false",
            "ray.num_cpus_per_actor=0.5",
            "image.max_side=64",
            "source.images.order=[original]",
        ],
    )
    st = storage_from_config(cfg)
    write_plan(st, cfg.output_root, rows, images_per_shard=2)  # 6 shards
    assert run_prepare(cfg) == 0
    info = st.read_json(cfg.output_path("prepare_report.json"))["ray"]
    assert info["num_actors"] == 4 and info["num_actors_override"] is None
    assert sum(info["shards_per_node"].values()) == 6
    assert info["lost_nodes"] == [] and info["shards_rescheduled"] == 0
