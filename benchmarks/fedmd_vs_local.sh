#!/usr/bin/env bash
# FedMD vs Local on digits and Fashion-MNIST (20 clients, Dirichlet α=0.3, 3 seeds), then the table.
# Usage: benchmarks/fedmd_vs_local.sh [OUT_DIR]   (needs HETPFL_DATA_DIR for Fashion-MNIST)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fedmd_vs_local}
HETPFL=${HETPFL:-.venv/bin/hetpfl}
export HETPFL_DATA_DIR=${HETPFL_DATA_DIR:-$(realpath ../shared/data)}
for dataset in digits fashion_mnist; do
  for seed in 0 1 2; do
    "$HETPFL" run "configs/fedmd_vs_local/$dataset.yaml" -o "$OUT/$dataset/fedmd/seed$seed" --overwrite --set seed=$seed
    "$HETPFL" run "configs/fedmd_vs_local/$dataset.yaml" -o "$OUT/$dataset/local/seed$seed" --overwrite --set seed=$seed \
      --set algorithm=local --set name="$(basename "$dataset")-local"
  done
done
"$HETPFL" report "$OUT" -o "$OUT/report" --markdown
