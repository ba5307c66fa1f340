#!/usr/bin/env bash
# Run every config under CONFIG_DIR (recursively, *.yaml) for each seed, PARALLEL runs at a time,
# into OUT_DIR/<config path without .yaml>/seed<S>. Resumable: a run whose summary.json exists is
# skipped, so the script can be started again after an interruption. Then `hetpfl report` tables it.
#
# Usage: benchmarks/run_configs.sh CONFIG_DIR OUT_DIR [SEEDS="0 1 2"] [PARALLEL=2] [EXCLUDE_REGEX] [INCLUDE_REGEX]
#   (the regexes match config paths relative to CONFIG_DIR, e.g. '^mnist/')
#   (needs HETPFL_DATA_DIR for real datasets; the Makefile's default is ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG_DIR=${1:?config folder}
OUT=${2:?results folder}
SEEDS=${3:-0 1 2}
PARALLEL=${4:-2}
EXCLUDE=${5:-^$}
INCLUDE=${6:-.}
export HETPFL=${HETPFL:-.venv/bin/hetpfl}
export HETPFL_DATA_DIR=${HETPFL_DATA_DIR:-$(realpath ../shared/data)}
export OUT CONFIG_DIR
jobs=()
while IFS= read -r config; do
  rel=${config#"$CONFIG_DIR"/}
  [[ "$rel" =~ $EXCLUDE ]] && continue
  [[ "$rel" =~ $INCLUDE ]] || continue
  for seed in $SEEDS; do
    jobs+=("${rel%.yaml} $seed")
  done
done < <(find "$CONFIG_DIR" -name '*.yaml' | sort)
echo "${#jobs[@]} runs ($PARALLEL at a time) from $CONFIG_DIR into $OUT"
printf '%s\n' "${jobs[@]}" | xargs -r -P "$PARALLEL" -L 1 bash -c '
  dir="$OUT/$0/seed$1"
  [ -f "$dir/summary.json" ] && exit 0   # finished runs are kept: the script resumes
  mkdir -p "$(dirname "$dir")"
  "$HETPFL" run "$CONFIG_DIR/$0.yaml" --set seed=$1 -o "$dir" --overwrite > "$dir.log" 2>&1 \
    || { echo "FAILED: $0 seed $1 (see $dir.log)"; exit 1; }
  echo "done: $0 seed $1 ($(grep -o "done in [0-9.]*s" "$dir.log"))"'
"$HETPFL" report "$OUT" -o "$OUT/report" --markdown
