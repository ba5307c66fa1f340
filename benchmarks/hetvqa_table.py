"""Print docs/results.md's HetVQA table (Self, worst client, Others, forgetting, fast adaptation, the
dual-adapter methods' mean gate share of the global module on their own test inputs, bytes, seconds,
and for FedMosaic Pearson's r between its last RELA weights and the scenario's true relatedness over
client pairs) as mean ± std over seeds from run folders or committed records (folders with
summary.json).

    .venv/bin/python benchmarks/hetvqa_table.py docs/records/hetvqa/homo_dynamic
    .venv/bin/python benchmarks/hetvqa_table.py runs/fedmosaic/ablations
    .venv/bin/python benchmarks/hetvqa_table.py docs/records/hetvqa/sizes_dynamic docs/records/fedmosaic/sizes_dynamic

A measure a run does not report (forgetting in a static scenario) is a dash. ``--earlier`` adds seeds
whose run folders are gone but whose per-method figures were published (a JSON file naming its
source); those seeds enter the mean and std like the others and are listed per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from hetpfl.report import find_runs, load_summary

LABEL = {"sft": "Local (SFT)", "fedit": "FedIT", "ditto_lora": "Ditto", "fedsim": "FedSim", "feddpa": "FedDPA",
         "feddat": "FedDAT", "perada": "PerAda", "feddistill": "FedDistill", "fedmkt": "FedMKT", "takfl": "TAKFL",
         "hetlora": "HetLoRA", "flexlora": "FlexLoRA", "fedmosaic": "FedMosaic",
         "no_rela": "FedMosaic without RELA (uniform weights)", "no_pq_lora": "FedMosaic without PQ-LoRA (HetLoRA's)",
         "no_block_alignment": "FedMosaic without block alignment",
         "no_weight_alignment": "FedMosaic without weight alignment", "no_gate": "FedMosaic without the gate",
         "one_block": "FedMosaic with one block (N_B = 1)",
         "homo_dynamic_one_block": "FedMosaic with one block (N_B = 1) on homo_dynamic"}
#: the rows' order: as LABEL lists them (a row whose folder is not named there comes last)
ORDER = list(LABEL)
# column -> the summary's final measure (fractions; shown in percent)
MEASURES = {"Self": "personalized_acc_mean", "worst client": "personalized_acc_worst10", "Others": "others_mean",
            "forgetting": "forgetting_mean", "new type zero-shot": "zeroshot_new_type_mean",
            "new type adapted": "adapt_new_type_mean", "new domain zero-shot": "zeroshot_new_domain_mean",
            "new domain adapted": "adapt_new_domain_mean", "global share": "global_share_mean"}


def collect(records: Path | list[Path], earlier: Path | None) -> dict[str, dict[int, dict[str, float]]]:
    """{method: {seed: {column: percent}}} plus the upload (MB per client, and kB per client and round)
    and wall seconds. A row is named by its run's folder (``<method>/seed<S>``), so the ablations, which
    all run ``fedmosaic``, keep rows of their own."""
    table: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for run in find_runs(records if isinstance(records, list) else [records]):
        s = load_summary(run)
        row = {col: 100 * s["final"][key] for col, key in MEASURES.items() if key in s["final"]}
        row["MB up"] = s["bytes_up_per_client_mean"] / 1e6
        if s.get("rounds"):
            row["kB up per round"] = s["bytes_up_per_client_mean"] / 1e3 / s["rounds"]
        row["seconds"] = s["wall_time_s"]
        rela = s.get("client_matrices", {}).get("rela_weights", {}).get("truth_correlation")
        if rela is not None:  # FedMosaic: how closely the last round's RELA weights follow the truth
            row["RELA r"] = rela
        method = run.parent.name if run.name.startswith("seed") else s["algorithm"]
        if s["seed"] in table[method]:
            sys.exit(f"{run}: a second run of {method} with seed {s['seed']}; give each run its own folder")
        table[method][s["seed"]] = row
    if earlier is not None:
        published = json.loads(earlier.read_text())
        for method, row in published["methods"].items():
            if published["seed"] in table[method]:
                sys.exit(f"{earlier}: seed {published['seed']} of {method} is also a record; drop one")
            table[method][published["seed"]] = dict(row)
    return table


def cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean, std = float(np.mean(values)), float(np.std(values))
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(table: dict[str, dict[int, dict[str, float]]]) -> str:
    lines = ["| method | seeds | Self | worst client | Others | forgetting | new type: zero-shot → adapted "
             "| new domain: zero-shot → adapted | gate's global share % | MB up per client | kB up per client and round | RELA ~ truth (r) | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in [m for m in ORDER if m in table] + sorted(set(table) - set(ORDER)):
        seeds = table[method]

        def values(col: str, seeds: dict[int, dict[str, float]] = seeds) -> list[float]:
            return [row[col] for row in seeds.values() if col in row]

        minutes = [v / 60 for v in values("seconds")]
        lines.append(
            f"| {LABEL.get(method, method)} | {','.join(map(str, sorted(seeds)))} | {cell(values('Self'))} "
            f"| {cell(values('worst client'))} | {cell(values('Others'))} | {cell(values('forgetting'))} "
            f"| {cell(values('new type zero-shot'))} → {cell(values('new type adapted'))} "
            f"| {cell(values('new domain zero-shot'))} → {cell(values('new domain adapted'))} "
            f"| {cell(values('global share'))} | {cell(values('MB up'), 2)} | {cell(values('kB up per round'), 1)} | {cell(values('RELA r'), 2)} "
            f"| {cell(minutes)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, nargs="+",
                        help="run folders or committed records (with summary.json) of one scenario, one or several")
    parser.add_argument("--earlier", type=Path, help="published figures of seeds whose run folders are gone")
    args = parser.parse_args(argv)
    print(markdown(collect(args.records, args.earlier)))


if __name__ == "__main__":
    main()
