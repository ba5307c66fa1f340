"""Print docs/results.md's public-set-size table and draw its plot, from the sweep's run folders
(or committed records) laid out as <dataset>/public<P>/<method>/seed<S>.

    .venv/bin/python benchmarks/public_sweep_table.py runs/public_sweep --plot docs/images/public_sweep.png

Two tables per dataset, mean ± std over seeds of the clients' mean accuracy on their own test splits:
*as the paper reports* (COSMOS by its server measure, the cluster's server model on each client's
split; every baseline by its client measure) and *like for like* (every method by its clients' own
models). Below each, COSMOS (server measure) minus the best model-agnostic baseline, and minus the
original FedMD. The plot, one panel per dataset, draws the paper's convention and COSMOS's client
measure (dashed).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from hetpfl.report import find_runs, load_summary

# row label -> (method folder, the measure in the summary's `final`)
PAPER = {
    "COSMOS (server measure)": ("cosmos", "server_acc_mean"),
    "COSMOS, w_b = 1 (server measure)": ("cosmos_unweighted", "server_acc_mean"),
    "COMET": ("comet", "personalized_acc_mean"),
    "COMET, w_b = 1": ("comet_unweighted", "personalized_acc_mean"),
    "FedMD, COSMOS's code (mean of probabilities)": ("fedmd_cosmos", "personalized_acc_mean"),
    "FedMD, original (mean of scores)": ("fedmd", "personalized_acc_mean"),
    "FedCT": ("fedct", "personalized_acc_mean"),
    "Local": ("local", "personalized_acc_mean"),
    "FedRep (one architecture)": ("fedrep", "personalized_acc_mean"),
    "CFL (one architecture)": ("cfl", "personalized_acc_mean"),
}
LIKE_FOR_LIKE = {"COSMOS (client measure)": ("cosmos", "personalized_acc_mean"),
                 "COSMOS, w_b = 1 (client measure)": ("cosmos_unweighted", "personalized_acc_mean"),
                 **{k: v for k, v in PAPER.items() if not v[0].startswith("cosmos")}}
PAPERS_BASELINES = ("comet", "fedmd_cosmos", "fedct")  # as COSMOS's code runs them
MODEL_AGNOSTIC = (*PAPERS_BASELINES, "fedmd", "local", "comet_unweighted")
DATASETS = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}


def collect(root: Path, seeds: set[int] | None = None) -> dict[tuple[str, str, str], dict[int, list[float]]]:
    """{(dataset, method, measure): {public size: [percent per seed]}}, over ``seeds`` (default all)."""
    table: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in find_runs([root]):
        match = re.search(r"([a-z0-9_]+)/public(\d+)/([a-z_]+)/seed(\d+)$", run.as_posix())
        if not match or (seeds is not None and int(match[4]) not in seeds):
            continue
        dataset, size, method = match[1], int(match[2]), match[3]
        final = load_summary(run)["final"]
        for measure in ("personalized_acc_mean", "server_acc_mean"):
            if isinstance(final.get(measure), (int, float)):
                table[(dataset, method, measure)][size].append(100 * final[measure])
    return table


def cell(values: list[float], seeds: int = 0) -> str:
    """Mean ± std; a cell with fewer than the table's ``seeds`` says how many it has."""
    if not values:
        return "—"
    text = f"{np.mean(values):.2f}" + (f" ± {np.std(values):.2f}" if len(values) > 1 else "")
    return text + (f" (n={len(values)})" if len(values) < seeds else "")


def gap(table, dataset: str, size: int, baselines: tuple[str, ...], cosmos: str = "cosmos") -> str:
    """COSMOS's server measure (run ``cosmos``) minus the best of ``baselines`` (client measure), on
    mean accuracies."""
    cosmos = table.get((dataset, cosmos, "server_acc_mean"), {}).get(size)
    others = [np.mean(table[(dataset, m, "personalized_acc_mean")][size]) for m in baselines
              if table.get((dataset, m, "personalized_acc_mean"), {}).get(size)]
    if not cosmos or not others:
        return "—"
    return f"{np.mean(cosmos) - max(others):+.2f}"


def markdown(table, dataset: str, rows: dict[str, tuple[str, str]], title: str) -> str:
    sizes = sorted({s for (d, _, _), by in table.items() if d == dataset for s in by})
    seeds = max((len(v) for (d, _, _), by in table.items() if d == dataset for v in by.values()), default=0)
    lines = [f"{DATASETS.get(dataset, dataset)}, {title} (mean client accuracy %, mean ± std over {seeds} seed(s); "
             "(n=k): a cell with only k seeds so far)", "",
             "| method | " + " | ".join(f"public {s:,}" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for label, key in rows.items():
        by_size = table.get((dataset, *key), {})
        lines.append(f"| {label} | " + " | ".join(cell(by_size.get(s, []), seeds) for s in sizes) + " |")
    if "COSMOS (server measure)" in rows:
        for label, baselines, cosmos in (
                ("COSMOS (server) − best of the paper's baselines (COMET, FedMD as its code, FedCT)",
                 PAPERS_BASELINES, "cosmos"),
                ("COSMOS (server) − original FedMD", ("fedmd",), "cosmos"),
                ("COSMOS, w_b = 1 (server) − best model-agnostic baseline (any weighting, Local)",
                 MODEL_AGNOSTIC, "cosmos_unweighted")):
            lines.append(f"| {label} | " + " | ".join(gap(table, dataset, s, baselines, cosmos) for s in sizes) + " |")
    return "\n".join(lines)


def plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(k[0] == d for k in table)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(5.2 * len(datasets), 9), 5.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        lines = {**PAPER, "COSMOS (client measure)": LIKE_FOR_LIKE["COSMOS (client measure)"]}
        for i, (label, key) in enumerate(lines.items()):
            by_size = table.get((dataset, *key), {})
            sizes = sorted(by_size)
            if not sizes:
                continue
            means = [np.mean(by_size[s]) for s in sizes]
            stds = [np.std(by_size[s]) for s in sizes]
            cosmos_client = key == ("cosmos", "personalized_acc_mean")
            style = ("--" if cosmos_client else "-." if key[0].endswith("_unweighted")
                     else "-" if key[0] in ("cosmos", *MODEL_AGNOSTIC) else ":")
            ax.errorbar(sizes, means, yerr=stds, marker="o", linestyle=style, capsize=3, label=label,
                        color="C0" if key[0] == "cosmos" else f"C{i}",
                        linewidth=2.5 if key[0].startswith("cosmos") else 1.2)
        ax.set_xscale("log")
        ax.set_xticks(sorted({s for k, by in table.items() if k[0] == dataset for s in by}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("public set size (inputs)")
        ax.set_ylabel("mean client accuracy %")
        ax.set_title(DATASETS[dataset])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("Mean client accuracy as the public set grows (5,000 private images; COSMOS by both measures)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="runs/public_sweep or a records folder")
    parser.add_argument("--plot", type=Path, help="write the PNG here")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: every seed found)")
    args = parser.parse_args()
    if not args.root.is_dir():
        parser.error(f"root: {args.root} is not a folder")
    table = collect(args.root, set(args.seeds) if args.seeds else None)
    if not table:
        parser.error(f"root: no finished runs laid out as <dataset>/public<P>/<method>/seed<S> under {args.root}")
    for dataset in DATASETS:
        if any(k[0] == dataset for k in table):
            print(markdown(table, dataset, PAPER, "as the paper reports"), end="\n\n")
            print(markdown(table, dataset, LIKE_FOR_LIKE, "like for like (every method's own client models)"),
                  end="\n\n")
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
