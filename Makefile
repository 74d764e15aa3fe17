# One entry point for people and CI. `make demo` runs the main job on embedded defaults,
# `make test` runs the whole suite; both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Installed before anything else so that no dependency can pull a multi-GB CUDA build of torch.
# On a GPU machine pass the build you want, e.g. `make setup GPU=1 TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
GPU ?= 0
PYTEST_ARGS ?=
# pytest-xdist workers; a test file stays on one worker (its module fixtures start servers once).
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint clean-venv stack-up stack-down

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
ifeq ($(GPU),1)
	$(PIP) install --quiet -e '.[test]'
	@# insightface depends on the CPU `onnxruntime`; both wheels own the same module, so swap them.
	$(PIP) uninstall --yes --quiet onnxruntime onnxruntime-gpu
	$(PIP) install --quiet --no-deps --force-reinstall 'onnxruntime-gpu>=1.17'
else
	$(PIP) install --quiet -e '.[cpu,test]'
endif
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/lynx demo

# The HTML-report test opens the report in headless Chromium; the script installs Debian's package
# only when no browser is found and it can (root + apt), else says how to provide one.
test: setup
	@scripts/ensure-chromium.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	@scripts/ensure-chromium.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not server" $(PYTEST_ARGS)

# A local production-like stack (Prefect server on the local PostgreSQL, SeaweedFS, pools,
# deployments, a CPU and a GPU worker on the tiny demo model), all under STACK_DIR; see README.
STACK_DIR ?= .stack
STACK_PORT ?= 4200
stack-up: setup
	$(PY) -m deployments.stack up --state-dir $(STACK_DIR) --port $(STACK_PORT)

stack-down:
	$(PY) -m deployments.stack down --state-dir $(STACK_DIR)

lint: setup
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
