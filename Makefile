# `make pipeline` runs the whole pipeline on params.yaml; `make test` runs the test suite.
# Both create the virtual environment first (.venv, with the project installed in editable mode).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# glibc hands freed blocks above 128 KiB back to the kernel, so each multi-MB activation of an image EBM's
# Langevin step is page-faulted in afresh (~1500 faults a step for the 28×28 CNN at batch 128). Keeping them
# in the heap measured 12-15% less CPU per step, library and textbook loop alike (benchmarks/sampling.py).
export MALLOC_MMAP_THRESHOLD_ ?= 67108864
export MALLOC_TRIM_THRESHOLD_ ?= 268435456
export MALLOC_TOP_PAD_ ?= 67108864

.PHONY: pipeline test lint install data chromium

install: $(STAMP)

# Fashion-MNIST's original IDX files from Debian (the pipeline reads them without the network). Where the
# package cannot be installed (no apt, not root) the pipeline goes on without it: prepare_images then lets
# torchvision download the files (images.data.download), and says what to do if there is no network either.
# apt is tried once per virtual environment (the stamp), not at every `make test`.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DATA_STAMP := $(VENV)/.fashion-mnist-checked
data: $(DATA_STAMP)

$(DATA_STAMP): | $(STAMP)
	test -d $(FASHION_MNIST) \
		|| apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) \
		|| echo "could not install Debian's dataset-fashion-mnist: prepare_images will try torchvision's download" \
			"(images.data.download in params.yaml), or name a copy of the original files in images.data.local_copy" >&2
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

pipeline: $(STAMP) data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m flows.pipeline

# Headless Chromium: tests/test_mlflow_ui.py (and scripts/mlflow_ui_screenshot.py) open the MLflow UI in it.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
		|| apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) \
		|| { echo "could not install Debian's chromium; the MLflow UI test needs it" >&2; exit 1; }

# Two test workers share two cores: OpenMP's default wait policy would spin waiting for a partner thread
# that is not scheduled (up to 80x slower per sampler step). Stage processes and the `ebm` command choose the
# policy from the machine's load (ebm/runtime.py).
test: export OMP_WAIT_POLICY ?= PASSIVE
test: $(STAMP) data chromium
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -n 2 -q $(PYTEST_ARGS); status=$$?; \
		if [ $$status -eq 5 ]; then echo "pytest collected no tests: a failure of the suite, not a pass" >&2; fi; \
		exit $$status

lint: $(STAMP)
	$(BIN)/ruff check ebm flows tests benchmarks scripts
	$(BIN)/mypy ebm
