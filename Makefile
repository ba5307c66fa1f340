# Two commands a user needs:  `make demo` (set up + run the default experiment) and `make test`.
# Everything else is a building block of those two.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Points the tests and the real-data experiments at the offline copies beside the checkout.
export HETPFL_DATA_DIR ?= $(abspath ../shared/data)
export RAY_USAGE_STATS_ENABLED=0
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing later can resolve a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0" numpy
	$(PY) -m pip install --quiet -e ".[flower,mnist1d,hf,privacy,dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/hetpfl run configs/default.yaml -o runs/default --overwrite

# Flower's Ray simulation and the loopback deployment start their own processes: they run after
# the rest, alone, so they never compete with a second pytest worker for the two cores.
test: setup
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not flower"
	$(PY) -m pytest -q -m flower

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
