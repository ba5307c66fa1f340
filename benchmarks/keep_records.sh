#!/usr/bin/env bash
# Copy every finished run's summary.json and config.yaml from a results folder (runs/ is not committed)
# into a committed records folder, keeping the layout, so tables can be rebuilt and resumed elsewhere.
#
# Usage: benchmarks/keep_records.sh RUNS_DIR RECORDS_DIR   (e.g. runs/hetvqa docs/records/hetvqa)
set -euo pipefail
RUNS=${1:?results folder}
RECORDS=$(realpath -m "${2:?records folder}")
cd "$RUNS"
find . -name summary.json | sort | while read -r summary; do
  run=$(dirname "$summary")
  mkdir -p "$RECORDS/$run"
  cp "$run/summary.json" "$run/config.yaml" "$RECORDS/$run/"
done
echo "records of $(find . -name summary.json | wc -l) runs in $RECORDS"
