"""The differential-privacy table of docs/results.md (issue #13): accuracy against the privacy spent
(ε at δ = 1e-5, client level) for COSMOS, FedMD (predictions) and FedAvg (weights), sweeping the
Gaussian mechanism's noise multiplier.

    .venv/bin/python benchmarks/privacy_table.py runs/privacy --seeds 0 1 2   # run what is missing, print
    .venv/bin/python benchmarks/privacy_table.py runs/privacy --methods fedavg --clip-weights 1 10

The setting is the Byzantine table's (``configs/byzantine/<method>.yaml``: digits, 20 clients in 5
label groups, 8 rounds). Resumable: each run is a results folder ``<out>/<method>/sigma<σ>/seed<S>``,
read again once complete. Progress on stderr, the markdown table on stdout. The figure is COSMOS's
cluster server models on their clients' test splits (the paper's measure), FedMD's clients' own
models and FedAvg's global model on the global test set; ε is the largest over clients (each uploads
once per round: one release for predictions, one for FedAvg's weights). FedAvg runs at every
``--clip-weights`` bound (``privacy.clip_weights``: the L2 bound of a client's update).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hetpfl.config import load_config
from hetpfl.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
NOISE = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0)  # 0: no mechanism
MEASURE = {"cosmos": "server_acc_mean", "fedmd": "personalized_acc_mean", "fedavg": "global_test_acc"}
NAME = {"cosmos": "COSMOS", "fedmd": "FedMD", "fedavg": "FedAvg"}


def ensure(folder: Path, method: str, sigma: float, seed: int, clip_weights: float | None = None) -> dict:
    status = folder / "status.json"
    if not (status.exists() and json.loads(status.read_text()).get("status") == "complete"):
        overrides = {"seed": seed, "name": f"privacy-{method}"}
        if sigma > 0:
            overrides.update({"privacy.mechanism": "gaussian", "privacy.noise_multiplier": sigma})
            if clip_weights is not None:
                overrides["privacy.clip_weights"] = clip_weights
        config = load_config(ROOT / "configs" / "byzantine" / f"{method}.yaml",
                             [f"{k}={v}" for k, v in overrides.items()])
        started = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        run_experiment(config, folder, overwrite=True)
        print(f"{method} σ={sigma}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["cosmos", "fedmd", "fedavg"], choices=sorted(MEASURE))
    parser.add_argument("--clip-weights", type=float, nargs="+", default=[1.0, 10.0])
    args = parser.parse_args()
    columns = [(m, None) for m in args.methods if m != "fedavg"]
    columns += [("fedavg", c) for c in args.clip_weights] if "fedavg" in args.methods else []
    header = [NAME[m] if c is None else f"{NAME[m]} (clip {c:g})" for m, c in columns]
    lines = [f"| noise multiplier σ | ε (δ = 1e-5) | {' | '.join(header)} |", "|---:|---:|" + "---:|" * len(columns)]
    for sigma in NOISE:
        cells, eps = [], "∞ (no mechanism)"
        for method, clip in columns:
            figures = []
            for seed in args.seeds:
                name = f"sigma{sigma:g}" if clip is None or sigma == 0 else f"sigma{sigma:g}-clip{clip:g}"
                summary = ensure(args.out / method / name / f"seed{seed}", method, sigma, seed, clip)
                figures.append(100 * summary["final"][MEASURE[method]])
                if "privacy" in summary:  # the same for every seed: it depends on σ, rounds and δ only
                    eps = f"{summary['privacy']['epsilon_max']:.3g}"
            cells.append(f"{np.mean(figures):.1f} ± {np.std(figures):.1f}" if len(figures) > 1 else f"{figures[0]:.1f}")
        lines.append(f"| {sigma:g} | {eps} | " + " | ".join(cells) + " |")
    print(f"seeds {' '.join(map(str, args.seeds))}; accuracy in percent, mean ± std over seeds")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
