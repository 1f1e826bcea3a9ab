# The README's commands. Everything runs from a virtual environment in the clone (.venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; on a GPU machine override it, e.g. TORCH_SPEC='torch==2.13.0'
# with PIP_INDEX_URL pointing at the CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
# Debian packages the tests use: Fashion-MNIST (the image sets), Prometheus with promtool
# (tests/test_prometheus.py), Chromium, which renders /docs offline (tests/test_docs_browser.py),
# and podman with runc and debootstrap to build and run the image (tests/test_container.py);
# apt-get as root, else sudo
DEB_PACKAGES := dataset-fashion-mnist prometheus chromium podman runc debootstrap
APT_GET := $(if $(filter 0,$(shell id -u)),apt-get,sudo apt-get)
MODEL_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install demo test lint format bench-uci bench-methods bench-gap bench-serve bench-device bench-forecast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	test -z "$$missing" || $(APT_GET) install -y --no-install-recommends $$missing \
		|| ($(APT_GET) update && $(APT_GET) install -y --no-install-recommends $$missing) \
		|| echo "note: not installed: $$missing (as root: apt-get install $$missing)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	@test -d $(MODEL_DIR)/sine-gap || $(BIN)/credence-train --data toy:sine-gap --name sine-gap --out $(MODEL_DIR)
	@test -d $(MODEL_DIR)/moons || $(BIN)/credence-train --data toy:moons --name moons --out $(MODEL_DIR)
	@echo
	@echo "Serving $(MODEL_DIR) on http://$(HOST):$(PORT). In another shell, try:"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/v1/models/sine-gap:predict -H 'Content-Type: application/json' -d '{\"instances\": [[0.0], [2.5]], \"parameters\": {\"num_samples\": 200, \"seed\": 7}}'"
	@echo
	$(BIN)/credence-serve --model-dir $(MODEL_DIR) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check training service tests benchmarks examples
	$(BIN)/ruff format --check training service tests benchmarks examples

format: install
	$(BIN)/ruff format training service tests benchmarks examples
	$(BIN)/ruff check --fix training service tests benchmarks examples

# Benchmarks: never run by CI; each writes or prints a table with its command and machine.
# The UCI protocol on the five data sets, 20 splits each (43 minutes on the 2 cores);
# e.g. UCI_ARGS='--quick --methods mc_dropout' for 3 splits of MC dropout alone. The
# calibration plot needs the `bench` extra (matplotlib), installed here.
UCI_ARGS ?= --methods mc_dropout,ensemble,credence_defaults
bench-uci: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/uci.py $(UCI_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

bench-serve: install
	$(BIN)/python benchmarks/serve.py

bench-device: install
	$(BIN)/python benchmarks/device.py

bench-methods: install
	$(BIN)/python benchmarks/methods_vectorization.py

# Every method's gap/data epistemic-std ratio on toy:sine-gap, seeds 0-2, one thread
# (4 minutes on the 2 cores); e.g. GAP_ARGS="--runs 'variational --lr 0.01' --seeds 0-4".
GAP_ARGS ?=
bench-gap: install
	$(BIN)/python benchmarks/gap.py $(GAP_ARGS)

# CO2 forecasts with intervals: a Bayesian LSTM against SARIMA and ETS, rolling origins over
# the last 3 two-year blocks (docs/results/forecast.md and forecast.png); FORECAST_ARGS='--folds 1'
# for the last two years alone.
FORECAST_ARGS ?=
bench-forecast: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/forecast.py $(FORECAST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
