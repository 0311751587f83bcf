# The two commands a newcomer needs (see README.md):
#   make demo   -- set up .venv and run `oiod demo` end to end (embedded default)
#   make test   -- set up .venv and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.oiod-installed

.PHONY: setup demo test browser clean

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

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) oiod-demo tests/artifacts
