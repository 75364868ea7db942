# One command sets up and runs the main job (`make quickstart`); one sets up and runs the tests
# (`make test`). The Python stack (~6 GB) lives in one venv outside the clone, keyed by the hash of
# what it was built from, so repeated clones and CI runs reuse it; a fresh machine builds it.
SHELL := /bin/bash
PYTHON ?= python3
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/flexivit
VENV_KEY := $(shell cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
VENV ?= $(CACHE_DIR)/venv-$(VENV_KEY)
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
RECIPE ?= fashion_mnist
OUT ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: setup data quickstart test test-fast clean-venv

# No file prerequisites: the hash in the venv's path already names what it was built from (a fresh clone's
# newer file times would otherwise rebuild a venv that is up to date).
$(VENV)/.complete:
	# Venvs built from older constraints/pyproject are ~6 GB each: keep only the one being built.
	find "$(CACHE_DIR)" -maxdepth 1 -name 'venv-*' ! -name 'venv-$(VENV_KEY)' -exec rm -rf {} + 2>/dev/null || true
	rm -rf "$(VENV)"
	$(PYTHON) -m venv "$(VENV)"
	# One resolver pass over everything, with torch/torchvision pinned by constraints.txt.
	"$(PY)" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch "$@"

# The venv is shared between clones, so point its editable install at this checkout every time.
setup: $(VENV)/.complete data
	@"$(PY)" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

# Fashion-MNIST, our embedded dataset, ships as a Debian package.
data:
	@test -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

quickstart: setup
	"$(VENV)/bin/flexivit" train $(RECIPE) --out $(OUT)

test: setup
	"$(PY)" -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	"$(PY)" -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf "$(VENV)"
