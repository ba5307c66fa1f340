"""The Byzantine-clients table of docs/results.md (issue #13): FedAvg, FedMD and COSMOS with 0, 10, 20
and 30 % attacking clients, under each method's own aggregation and under a robust rule.

    .venv/bin/python benchmarks/byzantine_table.py runs/byzantine            # run what is missing, print
    .venv/bin/python benchmarks/byzantine_table.py runs/byzantine --seeds 0 1 --only fedmd

Resumable: every run is a results folder ``<out>/<method>/<attack>/<rule>/f<percent>/seed<S>``; a
complete one (status.json) is read, not run again. Configs: ``configs/byzantine/<method>.yaml``.
Progress on stderr, the markdown table on stdout.

The figure is what the method's clients get: FedAvg's global model on the global test set
(``global_test_acc``); FedMD's honest clients' own models (``honest_personalized_acc_mean``); COSMOS's
honest clients' cluster server models (``honest_server_acc_mean``, the paper's measure). With no
attacker every client is honest and the plain mean is the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hetpfl.config import load_config
from hetpfl.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
# method -> (attacks it meets, its robust rule's settings, the final measure)
PLAN = {
    "fedavg": (("sign_flipped_update", "label_flip"),
               {"aggregation.rule": "multi_krum", "aggregation.byzantine": 6}, "global_test_acc"),
    "fedmd": (("constant_soft_labels", "inverted_soft_labels", "random_soft_labels", "label_flip"),
              {"aggregation.rule": "median"}, "personalized_acc_mean"),
    "cosmos": (("constant_soft_labels", "inverted_soft_labels", "random_soft_labels", "label_flip"),
               {"aggregation.rule": "median"}, "server_acc_mean"),
}


def run_folder(out: Path, method: str, attack: str, rule: str, fraction: float, seed: int) -> Path:
    return out / method / attack / rule / f"f{round(100 * fraction):02d}" / f"seed{seed}"


def figure(folder: Path, measure: str) -> float | None:
    status = folder / "status.json"
    if not status.exists() or json.loads(status.read_text()).get("status") != "complete":
        return None
    final = json.loads((folder / "summary.json").read_text())["final"]
    return 100 * final.get(f"honest_{measure}", final[measure])


def ensure(folder: Path, method: str, attack: str, rule: str, fraction: float, seed: int) -> None:
    attacks, robust, measure = PLAN[method]
    if figure(folder, measure) is not None:
        return
    overrides = {"seed": seed, "name": f"byzantine-{method}"}
    if fraction > 0:
        overrides.update({"adversaries.attack": attack, "adversaries.fraction": fraction})
    if rule != "mean":
        overrides.update(robust)
    config = load_config(ROOT / "configs" / "byzantine" / f"{method}.yaml", [f"{k}={v}" for k, v in overrides.items()])
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    run_experiment(config, folder, overwrite=True)
    print(f"{folder.relative_to(folder.parents[4])}: {figure(folder, measure):.1f} % "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def _gap(value: float | None, clean: float | None) -> str:
    return "—" if value is None or clean is None else f"{value - clean:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where the runs go (resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=sorted(PLAN), default=list(PLAN))
    parser.add_argument("--print-only", action="store_true", help="do not run; print what is there")
    args = parser.parse_args()
    lines = ["| method | attack | rule | " + " | ".join(f"{round(100 * f)} %" for f in FRACTIONS)
             + " | 20 % vs clean, same rule | 20 % vs clean mean |", "|---|---|---|" + "---:|" * (len(FRACTIONS) + 2)]
    for method in args.only:
        attacks, robust, measure = PLAN[method]
        for attack in attacks:
            for rule in ("mean", robust["aggregation.rule"]):
                cells = []
                for fraction in FRACTIONS:
                    values = []
                    for seed in args.seeds:
                        # the clean run is the same for every attack: run it under the first one only
                        folder = run_folder(args.out, method, attacks[0] if fraction == 0 else attack, rule, fraction,
                                            seed)
                        if not args.print_only:
                            ensure(folder, method, attack, rule, fraction, seed)
                        value = figure(folder, measure)
                        if value is not None:
                            values.append(value)
                    cells.append(sum(values) / len(values) if len(values) == len(args.seeds) else None)
                if rule == "mean":
                    clean_mean = cells[0]
                shown = [("—" if c is None else f"{c:.1f}") for c in cells]
                shown += [_gap(cells[2], cells[0]), _gap(cells[2], clean_mean)]
                label = "mean (own)" if rule == "mean" else rule
                lines.append(f"| {method} | {attack} | {label} | " + " | ".join(shown) + " |")
    print(f"seeds: {' '.join(map(str, args.seeds))}; figures in percent; the last columns: the 20 % figure minus "
          f"the clean run's (0 %) under the same rule, and under the method's own mean")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
