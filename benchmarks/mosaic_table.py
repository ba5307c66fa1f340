"""Print docs/results.md's Mosaic table across α: the global model's test-set accuracy (the paper's
measure) per method and Dirichlet α, mean ± std over seeds, and Mosaic's gap to the best baseline,
from run folders or committed records laid out as <dataset>/a<α>/<models>/<method>/seed<S>.

    .venv/bin/python benchmarks/mosaic_table.py docs/records/mosaic/mnist
    .venv/bin/python benchmarks/mosaic_table.py docs/records/mosaic/mnist runs/mosaic/mnist   # records and new runs

The paper's claim reads off the last row of each block: Mosaic above every baseline (a positive gap),
the gap growing as α shrinks; the gap is also given seed by seed against the same baseline (each seed
is one partition, shared by every method), with on how many seeds Mosaic is above. Mosaic's teacher
(``teacher_test_acc``, scored once right after the distillation) is shown in brackets.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from hetpfl.report import find_runs, load_summary

ORDER = {"homogeneous": ["mosaic", "dense", "fedftg", "fedgen", "fedavg", "fedprox", "fedbn", "fedrs"],
         "widths": ["mosaic", "dfrd", "fedrolex", "heterofl"]}


def teacher_accuracy(run: Path) -> float | None:
    """Mosaic's teacher on the test set, from its metrics (records keep no metrics: None there)."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return None
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "teacher_test_acc" in row:
            return 100 * row["teacher_test_acc"]
    return None


def collect(roots: list[Path]) -> dict[tuple[str, str], dict[float, dict[int, float]]]:
    """{(models, method): {α: {seed: percent}}} and the teachers under (models, 'teacher')."""
    table: dict[tuple[str, str], dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in find_runs(roots):
        match = re.search(r"a([0-9.]+)/(homogeneous|widths)/([a-z_]+)/seed\d+$", run.as_posix())
        if not match:
            continue
        alpha, models, method = float(match[1]), match[2], match[3]
        summary = load_summary(run)
        table[(models, method)][alpha][summary["seed"]] = 100 * summary["final"]["global_test_acc"]
        teacher = teacher_accuracy(run) if method == "mosaic" else None
        if teacher is not None:
            table[(models, "teacher")][alpha][summary["seed"]] = teacher
    return table


def gap(mosaic: dict[int, float], baselines: list[dict[int, float]]) -> str:
    """Mosaic's mean minus the best baseline's (by mean), then the same difference seed by seed over
    the seeds both have (each seed is one partition, shared by every method): its mean ± std and on
    how many seeds Mosaic is above."""
    baselines = [b for b in baselines if b]
    if not mosaic or not baselines:
        return "—"
    best = max(baselines, key=lambda b: np.mean(list(b.values())))
    text = f"{np.mean(list(mosaic.values())) - np.mean(list(best.values())):+.1f}"
    paired = [mosaic[s] - best[s] for s in sorted(set(mosaic) & set(best))]
    if len(paired) > 1:
        above = sum(d > 0 for d in paired)
        text += f" (by seed {np.mean(paired):+.1f} ± {np.std(paired):.1f}, above on {above} of {len(paired)})"
    return text


def cell(by_seed: dict[int, float]) -> str:
    values = list(by_seed.values())
    if not values:
        return "—"
    return f"{np.mean(values):.1f}" + (f" ± {np.std(values):.1f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", type=Path, nargs="+", help="runs or records of one dataset (…/<dataset>), one folder or several")
    args = parser.parse_args()
    table = collect(args.roots)
    alphas = sorted({a for per in table.values() for a in per})
    for models, methods in ORDER.items():
        present = [m for m in methods if (models, m) in table]
        if not present:
            continue
        seeds = max(len(v) for m in present for v in table[(models, m)].values())
        print(f"\n{models} (global test-set accuracy %, {seeds} seed(s) at most)\n")
        print("| method | " + " | ".join(f"α = {a:g}" for a in alphas) + " |")
        print("|---|" + "---:|" * len(alphas))
        for method in present:
            cells = []
            for a in alphas:
                text = cell(table[(models, method)][a])
                if method == "mosaic" and table[(models, "teacher")][a]:
                    text += f" [{cell(table[(models, 'teacher')][a])}]"
                cells.append(text)
            print(f"| {method} | " + " | ".join(cells) + " |")
        gaps = [gap(table[(models, "mosaic")][a], [table[(models, m)][a] for m in present if m != "mosaic"])
                for a in alphas]
        print("| Mosaic − best baseline | " + " | ".join(gaps) + " |")


if __name__ == "__main__":
    main()
