#!/usr/bin/env bash
# The COSMOS reproduction table at CPU scale: 3 datasets x 6 methods x 3 seeds, two runs at a
# time (one torch thread each), then `hetpfl report` regenerates the table from the run folders.
# Usage: benchmarks/cosmos_table.sh [OUT_DIR] [PARALLEL]   (needs HETPFL_DATA_DIR; ~25 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cosmos_table}
PARALLEL=${2:-2}
export HETPFL=${HETPFL:-.venv/bin/hetpfl}
export HETPFL_DATA_DIR=${HETPFL_DATA_DIR:-$(realpath ../shared/data)}
export OUT
jobs=()
for dataset in mnist fashion_mnist cifar10; do
  for method in cosmos comet fedct fedmd local fedavg; do
    for seed in 0 1 2; do
      jobs+=("$dataset $method $seed")
    done
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P "$PARALLEL" -L 1 bash -c '
  dir="$OUT/$0/$1/seed$2"
  [ -f "$dir/summary.json" ] && exit 0   # finished runs are kept: the script resumes
  mkdir -p "$(dirname "$dir")"
  "$HETPFL" run "configs/cosmos/$0/$1.yaml" --set seed=$2 -o "$dir" > "$dir.log" 2>&1 \
    || { echo "FAILED: $0 $1 seed $2 (see $dir.log)"; exit 1; }
  echo "done: $0 $1 seed $2 ($(grep -o "done in [0-9.]*s" "$dir.log"))"'
"$HETPFL" report "$OUT" -o "$OUT/report" --markdown
