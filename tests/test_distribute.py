"""Tests of :class:`openimages_od.pipeline.distribute.RayRun` (prepare's Ray steps) and ``connect``."""

from __future__ import annotations

import pytest
from pipeline_helpers import box, image_row, photo, write_plan

from openimages_od.config import load_config
from openimages_od.devservices import Reply
from openimages_od.errors import ConfigError
from openimages_od.layout import Layout
from openimages_od.openimages.planio import read_manifest
from openimages_od.pipeline.distribute import RayRun, connect, pending_tasks
from openimages_od.storage_setup import storage_from_config


def _cfg(*sets: str, out: str = "/tmp/unused-oiod-out"):
    return load_config(None, [f"output.url={out}", "ray.progress=false", *sets])


def test_check_capacity_refuses_more_actors_than_the_local_instance_has():
    run = RayRun(_cfg("ray.num_actors=3", "ray.num_cpus_per_actor=1"))
    with pytest.raises(ConfigError) as exc:
        run.check_capacity(2.0)
    msg = str(exc.value)
    assert "3 actors x 1.0 CPUs = 3.0 CPUs" in msg and "has 2" in msg and "ray.num_actors" in msg
    run.check_capacity(3.0)  # exactly enough


def test_check_capacity_leaves_sizing_to_the_cluster_when_not_overridden_or_not_local():
    RayRun(_cfg("ray.num_cpus_per_actor=4")).check_capacity(1.0)  # no override: sized from the cluster
    # A remote cluster may grow (autoscaler): the scheduler waits for room instead.
    RayRun(_cfg("ray.address=auto", "ray.num_actors=8", "ray.num_cpus_per_actor=1")).check_capacity(2.0)


def test_actor_options_forward_only_set_variables(monkeypatch):
    monkeypatch.setenv("OIOD_TEST_SETTING", "on")
    monkeypatch.delenv("OIOD_TEST_UNSET", raising=False)
    opts = RayRun(
        _cfg(
            "ray.forward_env=[OIOD_TEST_SETTING,OIOD_TEST_UNSET]",
            "ray.num_cpus_per_actor=0.25",
            "ray.max_shard_retries=0",
            "ray.max_shards_in_flight_per_actor=5",
        )
    ).actor_options()
    assert opts["runtime_env"] == {"env_vars": {"OIOD_TEST_SETTING": "on"}}
    assert opts["num_cpus"] == 0.25
    assert opts["max_restarts"] == 1  # a crashed actor still comes back once
    assert opts["max_task_retries"] == 0  # shards are retried by the driver, not by Ray
    assert opts["max_concurrency"] == 20  # room for running shards plus heartbeats
    assert "runtime_env" not in RayRun(_cfg()).actor_options()


@pytest.mark.integration
def test_ray_run_commits_every_shard_and_reports_the_spread(ray_local, image_server, tmp_path):
    rows = []
    for i in range(6):
        iid = f"d{i:015x}"
        url = image_server.script(f"o/{iid}.jpg", [Reply(200, photo(160, 120, seed=i))])
        rows.append(image_row(iid, original_url=url, boxes=[box(1, 0.1, 0.4, 0.2, 0.7)]))
    cfg = _cfg(
        "ray.num_actors=1",
        "ray.num_cpus_per_actor=0.5",
        "image.max_side=64",
        "source.images.order=[original]",
        out=str(tmp_path),
    )
    storage = storage_from_config(cfg)
    write_plan(storage, cfg.output_root, rows, images_per_shard=3)
    plan_url = Layout.from_config(cfg).plan_dir
    tasks, committed = pending_tasks(cfg, storage, read_manifest(storage, plan_url), plan_url)
    assert len(tasks) == 2 and not committed

    assert connect(cfg.ray) is False  # already connected: joins, and must not shut it down
    results, failed, retries, info = RayRun(cfg).run(tasks, total_images=6)

    assert ray_local.is_initialized()  # not started by this run, so not shut down by it
    assert failed == {} and retries == 0
    assert sorted(s["name"] for s in results) == sorted(t.name for t in tasks)
    assert sum(s["ok"] for s in results) == 6
    assert info["num_actors"] == 1 and info["cluster_cpus"] == 2
    assert sum(info["shards_per_node"].values()) == 2 and len(info["workers"]) == 1
    assert info["lost_nodes"] == [] and info["shards_rescheduled"] == 0
