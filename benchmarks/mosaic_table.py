"""Print docs/results.md's Mosaic table across α: the global model's test-set accuracy (the paper's
measure) per method and Dirichlet α, mean ± std over seeds, and Mosaic's gap to the best baseline,
from run folders or committed records laid out as <dataset>/a<α>/<models>/<method>/seed<S>.

    .venv/bin/python benchmarks/mosaic_table.py docs/records/mosaic/mnist
    .venv/bin/python benchmarks/mosaic_table.py docs/records/mosaic/mnist runs/mosaic/mnist   # records and new runs

The paper's claim reads off the last row of each block: Mosaic above every baseline (a positive gap),
the gap growing as α shrinks; the gap is also given seed by seed against the same baseline (each seed
is one partition, shared by every method), with on how many seeds Mosaic is above. Mosaic's teacher
(``teacher_test_acc``, scored once right after the distillation) is shown in brackets.

``--costs`` prints what each run moved and took instead: megabytes up and down per client (mean over
α and seeds) and the wall minutes per α (mean ± std over seeds; what ran beside a run is not known
here, see docs/results.md).

``--ablations`` prints the ablation table instead: each variant under the given folder
(``<variant>/seed<S>``) beside the full run (``--full``, the same config as the table's MNIST α 0.1
Mosaic, ``configs/mosaic/ablations/full.yaml``, run on the ablations' machine), with the
teacher and the global model right after the distillation, the final global model, and the final
difference to the full run seed by seed (same partitions):

    .venv/bin/python benchmarks/mosaic_table.py --ablations docs/records/mosaic/ablations \
        --full docs/records/mosaic/ablations/full
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from hetpfl.report import find_runs
from hetpfl.report import load_summary as _load_summary

#: One read of a run's summary however many measures of it a table collects (``--costs`` reads three).
load_summary = cache(_load_summary)

ORDER = {"homogeneous": ["mosaic", "dense", "fedftg", "fedgen", "fedavg", "fedprox", "fedbn", "fedrs"],
         "widths": ["mosaic", "dfrd", "fedrolex", "heterofl"]}


def distillation_round(run: Path) -> dict[str, float]:
    """Mosaic's teacher and global model on the test set in the round of the distillation, in percent
    (``teacher``, ``global``), from its metrics; empty where the folder keeps none."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "teacher_test_acc" in row:
            return {"teacher": 100 * row["teacher_test_acc"], "global": 100 * row["global_test_acc"]}
    return {}


def teacher_accuracy(run: Path) -> float | None:
    """Mosaic's teacher on the test set, from its metrics (None where the folder keeps none)."""
    return distillation_round(run).get("teacher")


#: What ``--costs`` reads of each run's summary: megabytes per client, up and down; wall minutes.
COSTS = {"MB up per client": lambda s: s["bytes_up_per_client_mean"] / 1e6,
         "MB down per client": lambda s: s["bytes_down_per_client_mean"] / 1e6,
         "minutes": lambda s: s["wall_time_s"] / 60}


def collect(roots: list[Path], measure: Callable[[dict], float] | None = None
            ) -> dict[tuple[str, str], dict[float, dict[int, float]]]:
    """{(models, method): {α: {seed: value}}}: the final global test-set accuracy in percent, or
    ``measure(summary)``; with the accuracy, the teachers under (models, 'teacher')."""
    table: dict[tuple[str, str], dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in find_runs(roots):
        match = re.search(r"a([0-9.]+)/(homogeneous|widths)/([a-z_]+)/seed\d+$", run.as_posix())
        if not match:
            continue
        alpha, models, method = float(match[1]), match[2], match[3]
        summary = load_summary(run)
        if measure is not None:
            table[(models, method)][alpha][summary["seed"]] = measure(summary)
            continue
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


def cell(by_seed: dict[int, float], seeds: int = 0) -> str:
    """Mean ± std over seeds; "(n=k)" where a cell has fewer seeds (k) than the table's ``seeds``."""
    values = list(by_seed.values())
    if not values:
        return "—"
    text = f"{np.mean(values):.1f}" + (f" ± {np.std(values):.1f}" if len(values) > 1 else "")
    return text + (f" (n={len(values)})" if len(values) < seeds else "")


def collect_ablations(root: Path, full: Path) -> dict[str, dict[str, dict[int, float]]]:
    """{variant: {measure: {seed: value}}} for every ``<variant>/seed<S>`` under ``root`` and the full
    run's seeds (variant ``full``); measures: ``teacher`` and ``global`` in the distillation round,
    ``final`` global test-set accuracy (percent) and ``minutes``."""
    table: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for variant, run in [*(("full", r) for r in find_runs([full])), *((r.parent.name, r) for r in find_runs([root]))]:
        summary = load_summary(run)
        seed = summary["seed"]
        table[variant]["final"][seed] = 100 * summary["final"]["global_test_acc"]
        table[variant]["minutes"][seed] = summary["wall_time_s"] / 60
        for measure, value in distillation_round(run).items():
            table[variant][measure][seed] = value
    return table


def ablation_markdown(table: dict[str, dict[str, dict[int, float]]]) -> str:
    full = table.get("full", {}).get("final", {})
    lines = ["| variant | seeds | teacher, distillation round % | global, distillation round % | global, final % "
             "| final − full (by seed) | minutes |", "|---|---|---:|---:|---:|---:|---:|"]
    for variant in ["full", *sorted(v for v in table if v != "full")]:
        measures = table[variant]
        paired = [measures["final"][s] - full[s] for s in sorted(set(measures["final"]) & set(full))]
        difference = "—" if variant == "full" or not paired else (
            f"{np.mean(paired):+.1f}" + (f" ± {np.std(paired):.1f}, above on {sum(d > 0 for d in paired)} of {len(paired)}"
                                          if len(paired) > 1 else ""))
        lines.append(f"| {variant} | {','.join(map(str, sorted(measures['final'])))} | {cell(measures['teacher'])} "
                     f"| {cell(measures['global'])} | {cell(measures['final'])} | {difference} | {cell(measures['minutes'])} |")
    return "\n".join(lines)


def costs_markdown(roots: list[Path]) -> str:
    """What each method's runs moved (MB per client, up and down: mean over α and seeds) and took
    (wall minutes per α, mean ± std over seeds), one block per model set."""
    tables = {name: collect(roots, measure) for name, measure in COSTS.items()}
    alphas = sorted({a for per in tables["minutes"].values() for a in per})
    blocks = []
    for models, methods in ORDER.items():
        present = [m for m in methods if (models, m) in tables["minutes"]]
        if not present:
            continue
        lines = [f"{models}\n", "| method | MB up per client | MB down per client | "
                 + " | ".join(f"minutes, α = {a:g}" for a in alphas) + " |", "|---|---:|---:|" + "---:|" * len(alphas)]
        for method in present:
            moved = [np.mean([v for per in tables[k][(models, method)].values() for v in per.values()])
                     for k in ("MB up per client", "MB down per client")]
            minutes = [cell(tables["minutes"][(models, method)][a]) for a in alphas]
            lines.append(f"| {method} | {moved[0]:.2f} | {moved[1]:.2f} | " + " | ".join(minutes) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", type=Path, nargs="+", help="runs or records of one dataset (…/<dataset>), one folder or several;"
                                                           " with --ablations, the ablations' folder")
    parser.add_argument("--ablations", action="store_true", help="print the ablation table (module docstring)")
    parser.add_argument("--full", type=Path, help="with --ablations: the full Mosaic run's folder (its seed<S> runs)")
    parser.add_argument("--costs", action="store_true", help="print megabytes per client and wall minutes (module docstring)")
    args = parser.parse_args()
    if args.costs:
        print(costs_markdown(args.roots))
        return
    if args.ablations:
        if args.full is None or len(args.roots) != 1:
            parser.error("--ablations takes one folder of ablations and --full FOLDER")
        print(ablation_markdown(collect_ablations(args.roots[0], args.full)))
        return
    table = collect(args.roots)
    alphas = sorted({a for per in table.values() for a in per})
    for models, methods in ORDER.items():
        present = [m for m in methods if (models, m) in table]
        if not present:
            continue
        seeds = max(len(v) for m in present for v in table[(models, m)].values())
        print(f"\n{models} (global test-set accuracy %, {seeds} seed(s) at most; (n=k): a cell with k seeds so far)\n")
        print("| method | " + " | ".join(f"α = {a:g}" for a in alphas) + " |")
        print("|---|" + "---:|" * len(alphas))
        for method in present:
            cells = []
            for a in alphas:
                text = cell(table[(models, method)][a], seeds)
                if method == "mosaic" and table[(models, "teacher")][a]:
                    text += f" [{cell(table[(models, 'teacher')][a])}]"
                cells.append(text)
            print(f"| {method} | " + " | ".join(cells) + " |")
        gaps = [gap(table[(models, "mosaic")][a], [table[(models, m)][a] for m in present if m != "mosaic"])
                for a in alphas]
        print("| Mosaic − best baseline | " + " | ".join(gaps) + " |")


if __name__ == "__main__":
    main()
