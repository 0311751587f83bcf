"""Fast tests of the training helpers that need no TensorFlow: TF_CONFIG, model_dir sync, checkpoints."""

from __future__ import annotations

import os
import time

import pytest

from openimages_od.errors import ConfigError, DataError
from openimages_od.training.distribution import is_chief, tf_config_from_env


def test_tf_config_env_wins():
    conf = tf_config_from_env(
        {
            "TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}',
            "OIOD_NUM_WORKERS": "4",
        }
    )
    assert conf["task"]["index"] == 1 and not is_chief(conf)
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        tf_config_from_env({"TF_CONFIG": "{nope"})


def test_tf_config_from_indexed_job():
    env = {
        "JOB_COMPLETION_INDEX": "2",
        "OIOD_NUM_WORKERS": "3",
        "OIOD_WORKER_SERVICE": "oiod-train-workers",
        "OIOD_WORKER_PORT": "2222",
        "HOSTNAME": "oiod-train-2-x7k2p",
    }
    conf = tf_config_from_env(env)
    assert conf == {
        "cluster": {
            "worker": [
                "oiod-train-0.oiod-train-workers:2222",
                "oiod-train-1.oiod-train-workers:2222",
                "oiod-train-2.oiod-train-workers:2222",
            ]
        },
        "task": {"type": "worker", "index": 2},
    }
    assert not is_chief(conf)
    conf = tf_config_from_env({**env, "OIOD_JOB_NAME": "job", "JOB_COMPLETION_INDEX": "0"})
    assert conf["cluster"]["worker"][1] == "job-1.oiod-train-workers:2222" and is_chief(conf)


def test_single_node_and_bad_job_env():
    assert tf_config_from_env({}) is None
    assert tf_config_from_env({"OIOD_NUM_WORKERS": "1", "JOB_COMPLETION_INDEX": "0"}) is None
    assert is_chief(None)
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX"):
        tf_config_from_env({"OIOD_NUM_WORKERS": "2"})
    with pytest.raises(ConfigError, match="outside"):
        tf_config_from_env({"OIOD_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "2", "OIOD_WORKER_SERVICE": "s"})
    with pytest.raises(ConfigError, match="OIOD_JOB_NAME"):
        tf_config_from_env(
            {
                "OIOD_NUM_WORKERS": "2",
                "JOB_COMPLETION_INDEX": "1",
                "OIOD_WORKER_SERVICE": "s",
                "HOSTNAME": "weird",
            }
        )
    assert is_chief({"cluster": {"chief": ["c:1"], "worker": ["w:1"]}, "task": {"type": "chief", "index": 0}})


@pytest.mark.integration
def test_dir_sync_round_trip_on_s3(tmp_path, seaweedfs, s3_bucket, s3_options):
    from openimages_od.storage import Storage
    from openimages_od.training.sync import DirSync

    st = Storage(s3=s3_options)
    remote = f"s3://{s3_bucket}/model"
    work = tmp_path / "work"
    (work / "train").mkdir(parents=True)
    (work / "ckpt-1.index").write_bytes(b"i1")
    (work / "ckpt-1.data-00000-of-00001").write_bytes(b"d1" * 100)
    (work / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (work / "train" / "events.out.tfevents.1").write_bytes(b"e")
    (work / "eval").mkdir()
    (work / "eval" / "mine").write_bytes(b"x")
    st.write_bytes(f"{remote}/eval/other-writer", b"keep me")
    sync = DirSync(st, work, remote, exclude=["eval"])
    assert sync.push() == 4
    assert sync.push() == 0  # nothing changed
    names = sorted(o.url[len(remote) + 1 :] for o in st.list(remote + "/"))
    assert names == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
        "eval/other-writer",
        "train/events.out.tfevents.1",
    ]
    # A new checkpoint replaces the old one (max_to_keep): same-size index rewritten, old files deleted.
    time.sleep(0.01)
    (work / "ckpt-2.index").write_bytes(b"i2")
    (work / "ckpt-2.data-00000-of-00001").write_bytes(b"d2" * 100)
    (work / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
    os.utime(work / "checkpoint", ns=(time.time_ns(), time.time_ns() + 10_000_000))
    (work / "ckpt-1.index").unlink()
    (work / "ckpt-1.data-00000-of-00001").unlink()
    sync.push()
    assert st.read_text(f"{remote}/checkpoint") == 'model_checkpoint_path: "ckpt-2"\n'
    names = {o.url[len(remote) + 1 :] for o in st.list(remote + "/")}
    assert "ckpt-1.index" not in names and "ckpt-2.index" in names and "eval/other-writer" in names
    # A restarted job on a fresh node pulls everything except eval/.
    fresh = tmp_path / "fresh"
    DirSync(st, fresh, remote, exclude=["eval"]).pull()
    assert sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()) == [
        "checkpoint",
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
        "train/events.out.tfevents.1",
    ]


@pytest.mark.integration
def test_checkpoints_resolve_on_s3(tmp_path, seaweedfs, s3_bucket, s3_options):
    from openimages_od.config import load_config
    from openimages_od.storage import Storage
    from openimages_od.training.checkpoints import latest_checkpoint_url, resolve_checkpoint

    st = Storage(s3=s3_options)
    remote = f"s3://{s3_bucket}/m"
    cfg = load_config(
        None,
        [
            f"train.model_dir={remote}",
            f"output.s3.endpoint_url={s3_options.endpoint_url}",
            "output.s3.addressing_style=path",
            "output.s3.region=us-east-1",
        ],
    )
    with pytest.raises(DataError, match="no checkpoint in"):
        resolve_checkpoint(cfg, st, cache_dir=tmp_path)
    st.write_bytes(f"{remote}/ckpt-7.index", b"idx")
    st.write_bytes(f"{remote}/ckpt-7.data-00000-of-00001", b"data")
    st.write_bytes(f"{remote}/ckpt-70.index", b"other")  # must not be fetched for ckpt-7
    st.write_text(f"{remote}/checkpoint", 'model_checkpoint_path: "/old/abs/path/ckpt-7"\n')
    assert latest_checkpoint_url(remote, st) == f"{remote}/ckpt-7"
    local, step = resolve_checkpoint(cfg, st, cache_dir=tmp_path)
    assert step == 7
    assert open(local + ".index", "rb").read() == b"idx"
    assert open(local + ".data-00000-of-00001", "rb").read() == b"data"
    assert not os.path.exists(local[:-1] + "70.index")
    local2, step2 = resolve_checkpoint(cfg, st, f"{remote}/ckpt-70", cache_dir=tmp_path)
    assert step2 == 70 and local2.endswith("ckpt-70")


def test_committed_shards_only(tmp_path):
    """Exactly the shards dataset.json lists (a committed shard it does not list is not read)."""
    import hashlib
    import json

    from training_helpers import label_map, write_lockfile

    from openimages_od.config import load_config
    from openimages_od.storage import Storage
    from openimages_od.training.inputs import committed_shards

    out = tmp_path / "out"
    d = out / "tfrecords" / "train"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"train-{i:05d}-of-00003.tfrecord").write_bytes(b"x")
    (d / "train-00001-of-00003.stats.json").write_text(
        json.dumps(
            {
                "images": 1,
                "records": 1,
                "tfrecord_bytes": 1,
                "tfrecord_sha256": hashlib.sha256(b"x").hexdigest(),
            }
        )
    )
    (out / "label_map.pbtxt").write_text(label_map().to_pbtxt())
    write_lockfile(out, label_map())
    (d / "train-00002-of-00003.stats.json").write_text('{"images": 1}')  # committed after the lockfile
    cfg = load_config(None, [f"output.url=file://{out}"])
    assert [u.rsplit("/", 1)[-1] for u in committed_shards(cfg, "train", Storage())] == [
        "train-00001-of-00003.tfrecord"
    ]
    with pytest.raises(DataError, match="'validation'"):
        committed_shards(cfg, "validation", Storage())


def _node(cpus: float, alive: bool = True) -> dict:
    return {"NodeID": f"n{cpus}", "Alive": alive, "Resources": {"CPU": cpus}}


def test_predict_actor_count_follows_the_nodes_when_num_actors_is_unset():
    """`oiod predict --ray` with the default `ray.num_actors: null` sizes by the nodes, as prepare does."""
    from openimages_od.config import RayConfig
    from openimages_od.training.predict import predict_actor_count

    rc = RayConfig(num_cpus_per_actor=0.5)
    nodes = [_node(2), _node(1), _node(8, alive=False)]
    assert predict_actor_count(rc, nodes, 100) == 6  # 4 + 2; the dead node counts for nothing
    assert predict_actor_count(rc, nodes, 3) == 3  # never more actors than chunks
    assert predict_actor_count(RayConfig(num_cpus_per_actor=0.5, actors_per_node=1), nodes, 100) == 2
    assert predict_actor_count(RayConfig(num_cpus_per_actor=4), nodes, 100) == 1  # at least one
    assert predict_actor_count(RayConfig(num_actors=3), nodes, 100) == 3  # the override wins
    assert predict_actor_count(RayConfig(num_actors=3), nodes, 2) == 2
