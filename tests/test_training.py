"""train / evaluate / export end to end on real TFRecord shards (tiny model, CPU).

One tiny model is trained once per module (``trained`` fixture) and shared by
the evaluate, export and restart tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openimages_od.config import load_config
from openimages_od.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from training_helpers import build_output, tiny_overrides

pytestmark = [pytest.mark.tf, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "-1"})
    env.pop("TF_CONFIG", None)
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(output dir, config) after training STEPS steps into {output}/model."""
    from openimages_od.training.train import run_train

    root = tmp_path_factory.mktemp("train")
    out = build_output(root / "out")
    cfg = load_config(None, tiny_overrides(f"file://{out}", steps=STEPS))
    assert run_train(cfg) == 0
    return out, cfg


def _event_steps(event_dir: Path, tag_prefix: str = "") -> list[int]:
    import tensorflow as tf

    steps = set()
    for f in sorted(event_dir.glob("events.out.tfevents.*")):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value:
                if v.tag.startswith(tag_prefix):
                    steps.add(int(e.step))
    return sorted(steps)


def test_train_writes_checkpoints_summaries_and_params(trained):
    out, _cfg = trained
    model = out / "model"
    assert (model / f"ckpt-{STEPS}.index").is_file()
    assert 'model_checkpoint_path: "ckpt-4"' in (model / "checkpoint").read_text()
    params = (model / "params.yaml").read_text()
    assert "num_classes: 4" in params and "MobileNetV2" in params
    assert "mixed_precision_dtype: float32" in params and "gs://" not in params
    resolved = load_config(model / "config.resolved.yaml")
    assert resolved.train.input_size == 128 and resolved.train.steps == STEPS
    assert _event_steps(model / "train", "total_loss") == [2, 4]
    # What the model saw is on record: the output's dataset lockfile, copied into model_dir.
    assert (
        json.loads((model / "dataset.json").read_text())["digest"]
        == json.loads((out / "dataset.json").read_text())["digest"]
    )


def test_restart_resumes_from_latest_checkpoint_on_s3(trained, tmp_path, seaweedfs, s3_bucket, s3_options):
    """A job whose model_dir is s3:// pulls the checkpoints, continues the step count and pushes back."""
    from openimages_od.storage import Storage
    from openimages_od.training.train import run_train

    out, _ = trained
    st = Storage(s3=s3_options)
    remote = f"s3://{s3_bucket}/model"
    for p in (out / "model").rglob("*"):
        if p.is_file():
            st.upload_file(p, f"{remote}/{p.relative_to(out / 'model').as_posix()}")
    overrides = tiny_overrides(f"file://{out}", model_dir=remote, steps=STEPS + 2) + [
        f"output.s3.endpoint_url={s3_options.endpoint_url}",
        "output.s3.region=us-east-1",
        "output.s3.addressing_style=path",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = load_config(None, overrides)
    assert run_train(cfg) == 0
    names = {o.url.rsplit("/", 1)[-1] for o in st.list(remote + "/")}
    assert f"ckpt-{STEPS + 2}.index" in names
    assert f'model_checkpoint_path: "ckpt-{STEPS + 2}"' in st.read_text(f"{remote}/checkpoint")
    # The resumed run only logged the steps after the restart.
    local = tmp_path / "events"
    for o in st.list(remote + "/train/"):
        st.download_file(o.url, local / o.url.rsplit("/", 1)[-1])
    assert _event_steps(local, "total_loss") == [2, 4, 6]
    newest = max(local.glob("events.out.tfevents.*"), key=lambda p: p.name)
    assert _event_steps_file(newest) == [6]


def _event_steps_file(path: Path) -> list[int]:
    import tensorflow as tf

    return sorted(
        {
            int(e.step)
            for e in tf.compat.v1.train.summary_iterator(str(path))
            for v in e.summary.value
            if v.tag == "total_loss"
        }
    )


def test_evaluate_writes_metrics_and_summaries(trained):
    from openimages_od.training.evaluate import run_evaluate

    out, cfg = trained
    assert run_evaluate(cfg) == 0
    m = json.loads((out / "eval" / f"metrics-{STEPS}.json").read_text())
    assert m["step"] == STEPS and m["num_images"] == 12
    assert set(m["coco"]) >= {"AP", "AP50", "AP75"}
    oi = m["openimages"]
    assert oi["hierarchy"] is True and set(oi["per_class"]) == {"1", "2", "3"}
    assert all(v["num_gt"] > 0 for v in oi["per_class"].values())
    assert (out / "eval" / "config.resolved.yaml").is_file()
    assert m["dataset"]["digest"] == json.loads((out / "dataset.json").read_text())["digest"]
    import tensorflow as tf

    tags = set()
    for f in (out / "model" / "eval").glob("events.out.tfevents.*"):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            tags |= {v.tag for v in e.summary.value}
    assert {"coco/AP", "openimages/mAP@0.5", "detections/0", "detections/1"} <= tags


def test_export_serves_both_signatures(trained):
    import numpy as np
    import tensorflow as tf

    from openimages_od.training.export import run_export

    out, cfg = trained
    assert run_export(cfg) == 0
    exp = out / "export"
    info = json.loads((exp / "model.json").read_text())
    assert [c["name"] for c in info["classes"]] == ["Ball", "Traffic sign", "Window"]
    assert info["step"] == STEPS and info["input_size"] == 128 and info["backbone"] == "mobilenetv2"
    assert len(info["config_digest"]) == 64 and set(info["signatures"]) == {
        "serving_default",
        "serving_images",
    }
    assert "Traffic sign" in (exp / "label_map.pbtxt").read_text()
    assert info["dataset"]["digest"] == json.loads((out / "model" / "dataset.json").read_text())["digest"]
    assert (exp / "config.resolved.yaml").is_file()

    loaded = tf.saved_model.load(str(exp / "saved_model"))
    assert set(loaded.signatures) == {"serving_default", "serving_images"}
    jpeg = next((out.parent / "out-synth" / "bucket" / "validation").glob("*.jpg")).read_bytes()
    rgb = tf.io.decode_jpeg(jpeg).numpy()
    png = tf.io.encode_png(rgb).numpy()
    r = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg, png]))
    assert r["detection_boxes"].dtype == tf.float32 and r["detection_boxes"].shape[0] == 2
    assert r["detection_boxes"].shape[2] == 4
    assert r["detection_classes"].dtype == tf.int32 and r["detection_scores"].dtype == tf.float32
    assert r["num_detections"].dtype == tf.int32 and r["num_detections"].shape == (2,)
    boxes = r["detection_boxes"].numpy()
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    n = r["num_detections"].numpy()
    classes = r["detection_classes"].numpy()
    assert all(set(classes[i, : n[i]]) <= {1, 2, 3} for i in range(2))
    r2 = loaded.signatures["serving_images"](images=tf.constant(rgb[None]))
    # The same pixels through either signature give the same detections.
    assert int(r2["num_detections"][0]) == int(n[0])
    np.testing.assert_allclose(r2["detection_scores"].numpy()[0], r["detection_scores"].numpy()[0], atol=1e-5)
    # Batch of several same-sized images.
    r3 = loaded.signatures["serving_images"](images=tf.constant(np.stack([rgb, rgb[:, ::-1]])))
    assert r3["detection_boxes"].shape[0] == 2


def test_model_dir_of_another_label_map_is_refused_unless_fine_tuning(trained, tmp_path):
    """Ids are stable across re-plans, but a model trained on one label map must not silently resume on
    another; with train.fine_tune its checkpoints are set aside and initialize the new model."""
    from training_helpers import label_map, write_lockfile

    from openimages_od.openimages.labelmap import LabelClass, LabelMap
    from openimages_od.training.train import run_train

    out, _ = trained
    out2 = tmp_path / "out"
    shutil.copytree(out, out2, ignore=shutil.ignore_patterns("eval", "export"))
    lm = LabelMap([*label_map(), LabelClass(4, "/m/01yrx", "Cat")])  # a class appended by a re-plan
    (out2 / "label_map.pbtxt").write_text(lm.to_pbtxt())
    write_lockfile(out2, lm)
    cfg = load_config(None, tiny_overrides(f"file://{out2}", steps=2))
    with pytest.raises(DataError, match=r"trained on another label map .* train\.fine_tune=true"):
        run_train(cfg)
    cfg = load_config(None, tiny_overrides(f"file://{out2}", steps=2) + ["train.fine_tune=true"])
    assert run_train(cfg) == 0
    moved = out2 / "model" / "previous" / label_map().digest[:12]
    assert (moved / f"ckpt-{STEPS}.index").is_file() and (moved / "label_map.pbtxt").read_text() == (
        label_map().to_pbtxt()
    )
    assert (out2 / "model" / "ckpt-2.index").is_file() and not (
        out2 / "model" / f"ckpt-{STEPS}.index"
    ).exists()
    assert (out2 / "model" / "label_map.pbtxt").read_text() == lm.to_pbtxt()
    params = (out2 / "model" / "params.yaml").read_text()
    assert "num_classes: 5" in params and "init_checkpoint_modules: backbone" in params


def test_no_committed_shards_is_a_data_error(tmp_path):
    from training_helpers import label_map

    from openimages_od.training.train import run_train

    out = tmp_path / "out"
    (out / "tfrecords" / "train").mkdir(parents=True)
    (out / "label_map.pbtxt").write_text(label_map().to_pbtxt())
    (out / "tfrecords" / "train" / "train-00000-of-00001.tfrecord").write_bytes(b"")  # not committed
    cfg = load_config(None, tiny_overrides(f"file://{out}"))
    with pytest.raises(DataError, match=r"no committed shards for split 'train'"):
        run_train(cfg)


def test_evaluate_continuous_picks_up_new_checkpoint_and_stops_on_sigterm(trained, tmp_path):
    out, _ = trained
    # A fresh output with the same shards and an empty model_dir.
    out2 = tmp_path / "out"
    shutil.copytree(out / "tfrecords", out2 / "tfrecords")
    shutil.copytree(out / "metadata", out2 / "metadata")
    shutil.copy(out / "label_map.pbtxt", out2 / "label_map.pbtxt")
    shutil.copy(out / "dataset.json", out2 / "dataset.json")  # the lockfile names the shards to read
    model2 = tmp_path / "model"
    model2.mkdir()
    args = [sys.executable, "-m", "openimages_od", "evaluate", "--continuous"]
    for o in tiny_overrides(f"file://{out2}", model_dir=str(model2), steps=1000) + [
        "evaluate.poll_interval_s=0.5",
        "evaluate.timeout_s=300",
    ]:
        args += ["--set", o]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        time.sleep(3)  # started, watching an empty model_dir
        assert proc.poll() is None
        for p in (out / "model").glob(f"ckpt-{STEPS}.*"):
            shutil.copy(p, model2 / p.name)
        (model2 / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{STEPS}"\n')
        metrics = out2 / "eval" / f"metrics-{STEPS}.json"
        deadline = time.monotonic() + 120
        while not metrics.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert metrics.exists(), (
            proc.communicate(timeout=5)[0][-3000:] if proc.poll() is not None else "timeout"
        )
        assert proc.poll() is None  # still watching for the next checkpoint
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert json.loads(metrics.read_text())["step"] == STEPS


@pytest.mark.slow
def test_multi_worker_training_on_loopback(trained, tmp_path):
    """Two CPU workers with TF_CONFIG on free loopback ports; only the chief writes to model_dir."""
    from openimages_od.devservices import free_port

    out, _ = trained
    model = tmp_path / "mw-model"
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    workers = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for i in range(2):
        env = _env()
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        )
        args = [sys.executable, "-m", "openimages_od", "train"]
        for o in tiny_overrides(f"file://{out}", model_dir=str(model), steps=2) + [
            "train.distribution=multi_worker",
            f"train.cache_dir={tmp_path / f'cache{i}'}",
            "train.repeat_factor_threshold=0.5",
        ]:  # class-aware sampling on every worker
            args += ["--set", o]
        procs.append(
            subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-4000:]
    assert (model / "ckpt-2.index").is_file()
    assert 'model_checkpoint_path: "ckpt-2"' in (model / "checkpoint").read_text()
    # One writer: the chief's summaries only, and no stray checkpoint folders.
    assert len(list((model / "train").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in model.iterdir() if p.is_dir()) == ["train"]


def _figures(m: dict) -> dict[str, float]:
    """Every number of a metrics document's coco/openimages sections (per-class AP included)."""
    out = {f"coco/{k}": v for k, v in m["coco"].items()}
    out["oi/mAP"] = m["openimages"]["mAP"]
    for cid, v in m["openimages"]["per_class"].items():
        out[f"oi/{cid}/ap"] = v["ap"]
        out[f"oi/{cid}/num_detections"] = v["num_detections"]
    return out


def test_predict_then_evaluate_predictions_reproduces_evaluate(trained, tmp_path):
    """Acceptance 4: `oiod predict` + `oiod evaluate --predictions` (CSV and COCO) give `oiod evaluate`'s figures."""
    from openimages_od.training.evaluate import evaluate_predictions, run_evaluate
    from openimages_od.training.predict import run_predict

    out, _ = trained
    # A 4-step model scores near RetinaNet's 0.01 prior: a low threshold gives ~100 detections per image.
    cfg = load_config(None, tiny_overrides(f"file://{out}", steps=STEPS) + ["evaluate.min_score=0.005"])
    assert run_evaluate(cfg) == 0
    ref = json.loads((out / "eval" / f"metrics-{STEPS}.json").read_text())
    assert run_predict(cfg, out=str(tmp_path / "pred")) == 0
    csv_text = (tmp_path / "pred" / "predictions.csv").read_text()
    assert csv_text.splitlines()[0] == "ImageID,LabelName,Score,XMin,XMax,YMin,YMax"
    info = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert info["num_images"] == ref["num_images"] and info["step"] == STEPS
    coco = json.loads((tmp_path / "pred" / "predictions.coco.json").read_text())
    assert len(coco) == len(csv_text.splitlines()) - 1 == info["num_detections"] > 100
    want = _figures(ref)
    for name in ("predictions.csv", "predictions.coco.json"):
        got_doc = evaluate_predictions(cfg, str(tmp_path / "pred" / name), out=str(tmp_path / f"ev-{name}"))
        assert got_doc["ignored"] == {"unknown_images": 0, "unknown_labels": 0}
        got = _figures(got_doc)
        assert got.keys() == want.keys()
        for k, v in want.items():
            if v is None:
                assert got[k] is None, (name, k)
            else:
                assert abs(got[k] - v) <= 1e-6, (name, k, got[k], v)
        analysis = json.loads((tmp_path / f"ev-{name}" / "analysis.json").read_text())
        assert set(analysis["per_class"]) == {"1", "2", "3"} and analysis["num_images"] == ref["num_images"]
    # The CLI: exit 0 for a good file, 2 with the line for a malformed one.
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageID,LabelName,Score,XMin,XMax,YMin,YMax\nabc,/m/018xm,high,0,1,0,1\n")
    args = [sys.executable, "-m", "openimages_od", "evaluate", "--predictions", str(bad)]
    for o in tiny_overrides(f"file://{out}"):
        args += ["--set", o]
    r = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "bad.csv: line 2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_predict_images_with_an_export_on_ray_matches_local(trained, tmp_path, ray_local):
    """`oiod predict --model EXPORT --images ... --ray`: the same files as in-process prediction."""
    from openimages_od.openimages.ids import source_id
    from openimages_od.training.export import run_export
    from openimages_od.training.predict import run_predict

    out, cfg = trained
    if not (out / "export" / "saved_model").is_dir():
        assert run_export(cfg) == 0
    jpgs = sorted(str(p) for p in (out.parent / "out-synth" / "bucket" / "validation").glob("*.jpg"))[:5]
    cfg1 = load_config(
        None, tiny_overrides(f"file://{out}") + ["ray.num_actors=1", "ray.num_cpus_per_actor=0.5"]
    )
    assert run_predict(cfg1, model=str(out / "export"), images=jpgs, out=str(tmp_path / "ray"), ray=True) == 0
    assert run_predict(cfg1, model=str(out / "export"), images=jpgs, out=str(tmp_path / "local")) == 0
    for name in ("predictions.csv", "predictions.coco.json"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text()
    info = json.loads((tmp_path / "ray" / "predict.json").read_text())
    assert info["num_images"] == 5 and info["workers"] == 1 and info["model"] == str(out / "export")
    ids = {Path(p).stem for p in jpgs}
    rows = (tmp_path / "ray" / "predictions.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] for r in rows} <= ids
    coco = json.loads((tmp_path / "ray" / "predictions.coco.json").read_text())
    assert {d["image_id"] for d in coco} <= {source_id(i) for i in ids}
