"""Hostile configuration (issue #12, item 11): refused before any work, secrets never written.

Contract: :func:`load_config` either returns a valid :class:`Config` or raises
:class:`ConfigError` naming the file (or ``--set``) quickly and in bounded
memory; ``config.resolved.yaml`` keeps ``${VAR}`` references.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openimages_od.config import apply_overrides, dump_config, load_config, save_resolved
from openimages_od.errors import ConfigError
from openimages_od.storage import Storage

SECRET = "hunter2-s3cr3t"


def _bomb(levels: int = 12, width: int = 10) -> str:
    """The "billion laughs": each level aliases the previous one ``width`` times (10**12 leaves)."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "unknown_section:\n" + "\n".join("  " + ln for ln in lines) + "\n"


def test_alias_bomb_under_an_unknown_key_is_refused_at_once(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb\.yaml:\d+: the document expands to more than"):
        load_config(p)
    assert time.monotonic() - t0 < 5  # generous: it takes milliseconds; the old loader never finished


def _flow_bomb() -> str:
    # One flow document cannot define anchors it reuses later in a plain scalar, so nest them.
    inner = '&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for i in range(1, 8):
        inner = f"[&a{i} [{inner}, " + ", ".join([f"*a{i - 1}"] * 9) + "]]"
    return inner


def test_alias_bomb_in_a_set_override_is_refused():
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(None, ["selection.classes=" + _flow_bomb()])


def test_small_aliases_still_work(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(
        "x-common: &common {connect_timeout_s: 3, read_timeout_s: 7}\nsource:\n  images:\n    http: *common\n"
    )
    with pytest.raises(ConfigError, match="x-common: unknown key"):
        load_config(p)  # unknown top-level key: still an error, but a normal one
    p.write_text("source:\n  s3: &s3 {region: eu-west-1}\noutput:\n  s3: *s3\n")
    cfg = load_config(p)
    assert cfg.output.s3.region == "eu-west-1"


@pytest.mark.parametrize(
    "text,match",
    [
        ("a: &a [*a]\n", "refers to itself|not valid YAML"),
        ("x: " + "[" * 1000 + "]" * 1000 + "\n", "nested deeper|nested too deeply"),
        ("x: " + "{a: " * 100 + "1" + "}" * 100 + "\n", "nested deeper"),
    ],
)
def test_recursive_and_deep_yaml_is_refused(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


@pytest.mark.parametrize(
    "override",
    [
        "source.splits={'../../x': {boxes: b.csv}}",
        "source.splits={'a/b': {boxes: b.csv}}",
        "source.splits={'..': {boxes: b.csv}}",
        "source.splits={'': {boxes: b.csv}}",
        "selection.splits=['../x']",
        "train.split=../../etc",
        "evaluate.split=a\\b",
    ],
)
def test_split_names_must_be_safe_path_components(override):
    with pytest.raises(ConfigError, match="becomes a path component"):
        load_config(None, [override])


def test_ordinary_split_names_are_fine():
    cfg = load_config(
        None, ["source.splits={train: {boxes: a.csv}, validation-2: {boxes: b.csv}, v_3.x: {boxes: c}}"]
    )
    assert set(cfg.source.splits) == {"train", "validation-2", "v_3.x"}


@pytest.mark.parametrize(
    "template",
    [
        "{image_id:>999999999}",
        "{split:{image_id}}",
        "{image_id!r}",
        "{split.__class__}",
        "{image_id[0]}",
        "{0}",
        "{}",
        "{other}",
        "{image_id",
        "x" * 600,
    ],
)
def test_key_template_fields_only_without_format_specs(template):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="key_template"):
        load_config(None, [f"source.images.key_template='{template}'"])
    assert time.monotonic() - t0 < 5


def test_key_template_ordinary_layouts_are_fine():
    cfg = load_config(None, ["source.images.key_template=mirror/{split}/{image_id}.jpg"])
    assert cfg.source.images.key_template == "mirror/{split}/{image_id}.jpg"
    assert load_config(None, ["source.images.key_template='{{literal}}/{image_id}.jpg'"])


def test_env_secrets_stay_references_in_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("OIOD_TEST_SECRET", SECRET)
    monkeypatch.setenv("OIOD_TEST_ENDPOINT", f"http://user:{SECRET}@127.0.0.1:9")
    p = tmp_path / "c.yaml"
    p.write_text(
        "source:\n  images:\n    http:\n      user_agent: 'bot ${OIOD_TEST_SECRET}'\n"
        "output:\n  url: " + str(tmp_path / "out") + "\n  s3:\n    endpoint_url: ${OIOD_TEST_ENDPOINT}\n"
        "ray:\n  forward_env: [A, '${OIOD_TEST_SECRET}']\n"
    )
    cfg = load_config(p)
    assert cfg.source.images.http.user_agent == f"bot {SECRET}"  # expanded for use
    assert cfg.ray.forward_env == ["A", SECRET]
    text = dump_config(cfg)
    assert SECRET not in text
    assert "bot ${OIOD_TEST_SECRET}" in text and "${OIOD_TEST_ENDPOINT}" in text
    url = save_resolved(cfg, f"file://{tmp_path}/out", Storage())
    written = Storage().read_bytes(url).decode()
    assert SECRET not in written
    # It still round-trips in the same environment.
    (tmp_path / "resolved.yaml").write_text(written)
    again = load_config(tmp_path / "resolved.yaml")
    assert again.model_dump() == cfg.model_dump()
    # Overrides: an overridden value is written as it is, the others stay references.
    changed = apply_overrides(cfg, ["source.images.http.user_agent=plain"])
    text2 = dump_config(changed)
    assert "user_agent: plain" in text2 and "${OIOD_TEST_ENDPOINT}" in text2 and SECRET not in text2


def test_validation_errors_show_the_reference_not_the_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("OIOD_TEST_SECRET", SECRET)
    p = tmp_path / "c.yaml"
    p.write_text("ray:\n  num_actors: ${OIOD_TEST_SECRET}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert SECRET not in str(exc.value) and "${OIOD_TEST_SECRET}" in str(exc.value)
    assert "c.yaml:2" in str(exc.value)


# --------------------------------------------------------------------------- property-based fuzzing


_FRAGMENTS = st.sampled_from(
    [
        "source:",
        "  splits:",
        "    train: {boxes: b.csv}",
        "selection:",
        "  classes: [Car]",
        "ray:",
        "  num_actors: 2",
        "&a",
        "*a",
        "[",
        "]",
        "{",
        "}",
        ":",
        "- ",
        "  ",
        "\n",
        "'",
        '"',
        "!!python/object:os.system",
        "!!binary AAAA",
        "${X}",
        "${OIOD_UNSET_VAR_XYZ}",
        "<<: *a",
        "? ",
        "|",
        ">",
        "#",
        "---",
        "...",
        "%YAML 1.1",
        "\t",
        "\x00",
        "key_template: '{image_id:>9}'",
        "  images: {key_template: '{split}/{image_id}'}",
        "9" * 50,
        "1e999",
        ".nan",
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_FRAGMENTS, max_size=25))
def test_fuzzed_config_files_load_or_fail_with_config_error(tmp_path, parts):
    p = tmp_path / "fuzz.yaml"
    p.write_text("".join(x if x.endswith((":", " ", "\n")) else x + " " for x in parts))
    try:
        load_config(p)
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(
        [
            "ray.num_actors",
            "selection.classes",
            "source.images.key_template",
            "x.y",
            "train.split",
            "source.splits",
            "output.url",
        ]
    ),
    value=st.lists(
        st.sampled_from(list("[]{}&*!:,'\"-|>#%@`{}\\ a1./_\n\x00") + ["${X}", "&a", "*a"]), max_size=30
    ).map("".join),
)
def test_fuzzed_set_overrides_load_or_fail_with_config_error(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as exc:
        assert str(exc)
