#!/usr/bin/env bash
# Copy every finished run's summary.json and config.yaml from a results folder (runs/ is not committed)
# into a committed records folder, keeping the layout, so tables can be rebuilt and resumed elsewhere.
#
# Usage: benchmarks/keep_records.sh RUNS_DIR RECORDS_DIR   (e.g. runs/hetvqa docs/records/hetvqa)
#        KEEP_METRICS=1 benchmarks/keep_records.sh ...     also keeps metrics.jsonl (per-round figures)
set -euo pipefail
RUNS=${1:?results folder}
RECORDS=$(realpath -m "${2:?records folder}")
cd "$RUNS"
find . -name summary.json | sort | while read -r summary; do
  run=$(dirname "$summary")
  mkdir -p "$RECORDS/$run"
  cp "$run/summary.json" "$run/config.yaml" "$RECORDS/$run/"
  if [ "${KEEP_METRICS:-0}" = 1 ]; then cp "$run/metrics.jsonl" "$RECORDS/$run/"; fi
done
echo "records of $(find . -name summary.json | wc -l) runs in $RECORDS"
