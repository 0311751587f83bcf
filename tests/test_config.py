"""Strict, layered configuration and the CLI's handling of config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from openimages_od.config import Config, dump_config, load_config
from openimages_od.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openimages_od", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=kw.get("cwd", ROOT),
        env=kw.get("env"),
    )


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, monkeypatch):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_required_shipped_configs_exist():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"local-demo.yaml", "openimages-v7-s3.yaml", "openimages-v2-2017_07.yaml", "cluster.yaml"} <= names


def test_layers_defaults_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ray:\n  num_actors: 7\n  address: auto\nimage:\n  quality: 80\n")
    cfg = load_config(f, ["ray.num_actors=3", "train.steps=12"])
    assert cfg.ray.num_actors == 3  # --set beats the file
    assert cfg.ray.address == "auto"  # file beats defaults
    assert cfg.image.quality == 80
    assert cfg.train.steps == 12
    assert cfg.image.max_side == Config().image.max_side  # default kept


def test_unknown_key_in_set_names_full_key():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["no.such.key=1"])
    assert "no.such.key" in str(ei.value) and "--set" in str(ei.value)


def test_misspelt_key_names_file_line_and_suggestion(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("output:\n  url: /tmp/x\nray:\n  num_actors: 2\n  adress: auto\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    msg = str(ei.value)
    assert f"{f}:5" in msg and "ray.adress" in msg and "address" in msg


def test_wrong_type_names_expected_type(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert "train.steps" in str(ei.value) and "integer" in str(ei.value) and str(f) in str(ei.value)


def test_invalid_value_and_enum(tmp_path):
    with pytest.raises(ConfigError, match=r"ray\.num_actors.*greater than or equal to 1"):
        load_config(None, ["ray.num_actors=0"])
    with pytest.raises(ConfigError, match=r"train\.backbone.*'mobilenetv2'"):
        load_config(None, ["train.backbone=vgg"])
    with pytest.raises(ConfigError, match=r"train\.input_size.*multiple of 128.*128 or 256"):
        load_config(None, ["train.input_size=160"])
    with pytest.raises(ConfigError, match="http is read-only"):
        load_config(None, ["output.url=http://example.com/x"])


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="stepwise"):
        load_config(None, ["train.learning_rate.schedule=stepwise", "train.learning_rate.boundaries=[10]"])


def test_env_interpolation(tmp_path, monkeypatch):
    f = tmp_path / "e.yaml"
    f.write_text(
        "output:\n  url: ${OIOD_T_OUT}\n  s3:\n    endpoint_url: ${OIOD_T_EP:-}\n    region: ${OIOD_T_R:-eu-west-1}\n"
    )
    monkeypatch.setenv("OIOD_T_OUT", "s3://bkt/prefix")
    cfg = load_config(f)
    assert cfg.output.url == "s3://bkt/prefix"
    assert cfg.output.s3.endpoint_url is None
    assert cfg.output.s3.region == "eu-west-1"
    monkeypatch.delenv("OIOD_T_OUT")
    with pytest.raises(ConfigError, match="OIOD_T_OUT"):
        load_config(f)


def test_not_yaml_and_not_mapping(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("ray: [unclosed\n")
    with pytest.raises(ConfigError, match=str(f)):
        load_config(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "local-demo.yaml", ["ray.num_actors=5"])
    f = tmp_path / "config.resolved.yaml"
    f.write_text(dump_config(cfg))
    again = load_config(f)
    assert again == cfg
    assert yaml.safe_load(f.read_text())["ray"]["num_actors"] == 5


def test_derived_locations(tmp_path):
    cfg = load_config(None, [f"output.url={tmp_path}/out"])
    assert cfg.output_root == f"file://{tmp_path}/out"
    assert cfg.model_dir == f"file://{tmp_path}/out/model"
    assert cfg.export_dir == f"file://{tmp_path}/out/export"
    assert cfg.serve_model == cfg.export_dir
    cfg = load_config(None, ["output.url=s3://b/p/", "train.model_dir=s3://m/dir"])
    assert cfg.output_path("plan", "x") == "s3://b/p/plan/x"
    assert cfg.model_dir == "s3://m/dir"


# ---------------------------------------------------------------- CLI


def test_cli_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and "oiod" in out.stdout
    for cmd in ("plan", "prepare", "train", "evaluate", "export", "serve", "detect", "demo", "report"):
        h = run_cli(cmd, "--help")
        assert h.returncode == 0, h.stderr
        assert "--config" in h.stdout and "--set" in h.stdout


def test_cli_bad_set_exits_2_naming_key():
    out = run_cli("plan", "-c", "configs/local-demo.yaml", "--set", "no.such.key=1")
    assert out.returncode == 2
    assert "no.such.key" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_bad_file_exits_2(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("selection:\n  clases: [Car]\n")
    out = run_cli("plan", "-c", str(f))
    assert out.returncode == 2
    assert str(f) in out.stderr and "selection.clases" in out.stderr and "classes" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_malformed_set_exits_2():
    out = run_cli("plan", "--set", "justakey")
    assert out.returncode == 2 and "dotted.key=value" in out.stderr


def test_python_dash_m_entrypoint_matches_console_script():
    exe = Path(sys.executable).parent / "oiod"
    if not exe.exists():
        pytest.skip("console script not installed")
    a = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert a.returncode == 0 and a.stdout == run_cli("--version").stdout
