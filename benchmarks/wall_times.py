"""Print each run's wall time as a markdown table: one row per run folder (relative to ROOT, seed folders
collapsed into columns), one column per seed.

Usage: .venv/bin/python benchmarks/wall_times.py runs/width    (any folder run_configs.sh filled)
Read the figures with what ran beside them (run_configs.sh's PARALLEL, other jobs on the machine).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def wall_times(root: Path) -> str:
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for summary in sorted(root.rglob("summary.json")):
        run = summary.parent
        data = json.loads(summary.read_text())
        key = str(run.parent.relative_to(root)) if run.name.startswith("seed") else str(run.relative_to(root))
        table[key][int(data["seed"])] = float(data["wall_time_s"])
    seeds = sorted({s for row in table.values() for s in row})
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for key, row in sorted(table.items()):
        lines.append(f"| {key} | " + " | ".join(f"{row[s]:.1f}" if s in row else "—" for s in seeds) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: wall_times.py RUNS_FOLDER")
    print(wall_times(Path(sys.argv[1])))
