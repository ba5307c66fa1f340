"""Write the public-set-size sweep configs: configs/public_sweep/<dataset>/public<P>/<method>.yaml.

COSMOS's comparison (issue 15) as the public set grows: the COSMOS table's setting
(configs/cosmos/<dataset>/: 25 clients, 5 label groups, Dirichlet 5 within a group, 10 % mixing,
10 rounds, clients drawing ``mlp`` or ``cnn_small``) with public sets of 400, 2,000 and 5,000 inputs
and the same number of private images at every size (``PRIVATE``; the public set is carved out of
``max_train_samples``, so that is PRIVATE + P). Every method of one (dataset, size) cell trains on the
same private data.

Methods: COSMOS (its run reports both the client and the server measure), COMET (lr 8e-4, the code's),
both also with unit per-sample distillation weights (``*_unweighted``: ``client_weighting: none``),
FedMD as its paper runs it (``fedmd``: class scores averaged, L1 digest) and as COSMOS's code runs it
(``fedmd_cosmos``: probabilities averaged over all clients, KL, lr 2e-3), FedCT, Local, and the best
personalized and clustered weight-sharing baselines of the earlier tables, FedRep and CFL (on one
architecture, ``cnn_small``, as the COSMOS table runs FedAvg; they never see the public set, which
only changes which private images are drawn). The model-agnostic sections are the COSMOS table's
files unchanged, so a cell at P = 400 differs from that table only in its private size.

Usage: .venv/bin/python benchmarks/make_public_sweep_configs.py   (rewrites the folder; commit it)
Run:   benchmarks/public_sweep.sh   (resumable; then the table and the plot)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "configs" / "cosmos"
ROOT = REPO / "configs" / "public_sweep"
DATASETS = ("fashion_mnist", "mnist", "cifar10")
PUBLIC_SIZES = (400, 2000, 5000)
PRIVATE = 5000  # private training images at every public size (the COSMOS table: 3,000; CPU budget)
# method -> (the COSMOS table's file it starts from, algorithm section replacing that file's, or keys
# added to it)
METHODS: dict[str, tuple[str, dict | None]] = {
    "cosmos": ("cosmos", None),
    "comet": ("comet", None),
    # the code's per-sample weight w_b = n_i(class)/N_U shrinks the KL term as the public set grows
    # (docs/cosmos.md); these run the routine with w_b = 1 (``client_weighting: none``)
    "cosmos_unweighted": ("cosmos", {"client_weighting": "none"}),
    "comet_unweighted": ("comet", {"client_weighting": "none"}),
    "fedmd": ("fedmd", None),
    "fedmd_cosmos": ("fedmd", {"name": "fedmd_cosmos", "pretrain_epochs": 10, "distill_epochs": 1}),
    "fedct": ("fedct", None),
    "local": ("local", None),
    "fedrep": ("fedavg", {"name": "fedrep"}),
    # CFL's thresholds as calibrated for this partition in configs/clustered/fmnist_groups/cfl.yaml
    "cfl": ("fedavg", {"name": "cfl", "eps1": 0.9, "eps2": 1.5, "warmup_rounds": 3}),
}


def config(dataset: str, public_size: int, method: str) -> dict:
    source, algorithm = METHODS[method]
    tree = yaml.safe_load((SOURCE / dataset / f"{source}.yaml").read_text())
    tree["name"] = f"public-sweep-{dataset}-public{public_size}"
    if algorithm is not None and "name" in algorithm:
        tree["algorithm"] = dict(algorithm)
    elif algorithm is not None:
        tree["algorithm"].update(algorithm)
    tree["data"]["public_size"] = public_size
    tree["data"]["max_train_samples"] = PRIVATE + public_size
    return tree


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    for dataset in DATASETS:
        for size in PUBLIC_SIZES:
            for method in METHODS:
                path = ROOT / dataset / f"public{size}" / f"{method}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                header = (
                    f"# Public-set-size sweep (docs/results.md, issue 15): {dataset}, public set {size}, "
                    f"{PRIVATE} private images, method {method}.\n"
                    "# Written by benchmarks/make_public_sweep_configs.py from configs/cosmos/; edit that "
                    "script, not this file.\n"
                )
                path.write_text(header + yaml.safe_dump(config(dataset, size, method), sort_keys=False))


if __name__ == "__main__":
    main()
