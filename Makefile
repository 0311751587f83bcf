# The two commands a newcomer needs (see README.md):
#   make demo   -- set up .venv and run `oiod demo` end to end (embedded default)
#   make test   -- set up .venv, run `make lint`, then the whole test suite (what CI runs)
#   make lint   -- ruff (lint + format check) and mypy; fails on any finding
#   make images -- build the worker, serve and train images with podman (no registry needed)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.oiod-installed

.PHONY: setup demo lint test browser containers images images-ci containers-train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,serve,dev,bench]"
	# TF Model Garden without its declared deps (they pull GPU TensorFlow and
	# tensorflow-text, which conflict with tensorflow-cpu 2.21); see pyproject.toml.
	$(BIN)/python -m pip install --quiet --no-deps tf-models-official==2.20.0 tf-keras==2.21.0
	touch $(STAMP)

demo: setup
	$(BIN)/oiod demo $(DEMO_ARGS)

# Headless Chromium for the browser tests (Debian package; needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium not installed: browser tests will be skipped"; fi; }

# podman, buildah, debootstrap and runc for the container lane and `make images`
# (Debian packages; needs root or sudo). Without them the lane is skipped.
containers:
	@command -v podman >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc uidmap >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc uidmap >/dev/null; \
	  else echo "podman not installed: the container lane will be skipped"; fi; }

# All three images (localhost/openimages-od-{worker,serve,train}:$(TAG)); build
# times and sizes go to build/images.jsonl. See docker/README.md.
TAG ?= dev
images: containers
	TAG=$(TAG) docker/build-images.sh worker serve train

# What the test suite's container lane needs (the train image is too big for CI).
# Always rebuilt, so the lane never runs stale code: the dependency layers are
# cached (keyed on pyproject.toml and docker/constraints.txt), so an unchanged
# tree costs seconds and a source edit only the package's own --no-deps install.
images-ci: containers
	@if [ "$$(id -u)" = 0 ] && command -v podman >/dev/null 2>&1; then \
	  TAG=$(TAG) docker/build-images.sh worker serve; fi

# The train image's part of the lane (train, evaluate, export Jobs and TensorBoard), outside CI.
containers-train: setup containers
	TAG=$(TAG) docker/build-images.sh train
	OIOD_IMAGE_TAG=$(TAG) $(BIN)/python -m pytest -m containers -k train_image -s tests/test_containers.py

# Static checks, first in `make test` so CI fails on a finding before the long suite runs.
# mypy's file list, strictness and the pydantic plugin are in pyproject.toml ([tool.mypy]).
LINT_PATHS := openimages_od tests benchmarks
lint: setup
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test: setup lint browser images-ci
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) oiod-demo tests/artifacts
