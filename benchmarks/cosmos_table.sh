#!/usr/bin/env bash
# The COSMOS reproduction table at CPU scale: 3 datasets x 6 methods x 3 seeds, two runs at a
# time (one torch thread each), then `hetpfl report` regenerates the table from the run folders.
# Usage: benchmarks/cosmos_table.sh [OUT_DIR] [PARALLEL]   (needs HETPFL_DATA_DIR; ~25 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
exec benchmarks/run_configs.sh configs/cosmos "${1:-runs/cosmos_table}" "0 1 2" "${2:-2}" '^smoke'
