#!/usr/bin/env bash
# The public-set-size sweep (issue 15): 3 datasets x public {400, 2000, 5000} x 8 methods x 3 seeds,
# PARALLEL runs at a time, resumable (finished runs are kept), then the table and the plot.
# Usage: benchmarks/public_sweep.sh [OUT_DIR=runs/public_sweep] [SEEDS="0 1 2"] [PARALLEL=2] [ONLY_REGEX]
#   ONLY_REGEX picks configs by their path under configs/public_sweep, e.g. '^fashion_mnist/'.
#   (needs HETPFL_DATA_DIR; the configs are benchmarks/make_public_sweep_configs.py's output)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/public_sweep}
benchmarks/run_configs.sh configs/public_sweep "$OUT" "${2:-0 1 2}" "${3:-2}" '^$' "${4:-.}" || true
${PYTHON:-.venv/bin/python} benchmarks/public_sweep_table.py "$OUT" --plot "$OUT/public_sweep.png"
