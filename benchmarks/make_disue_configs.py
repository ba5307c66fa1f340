"""Write the DisUE comparison configs: configs/disue/<setting>/<method>.yaml and configs/disue/ablations/.

The paper's setting (methods.md §3: SVHN, CIFAR-10, CIFAR-100, Dir(ε), 100 clients, 500 rounds) cut
to CPU size: Fashion-MNIST and CIFAR-10 (SVHN and CIFAR-100 are not available offline), Dirichlet
alpha in {0.1, 0.5} over 100 clients with at least 10 samples each, 20 sampled per round, 20 rounds,
10,000 private samples in all, cnn_small everywhere. Also rotated MNIST (clusters are real: 20
clients in 4 rotation groups, full participation), whose data, client and round sections are those
of configs/clustered/rotated_mnist (the clustered table of the weight-sharing issue) so that DisUE
and FedGen join that table's runs.

Baselines' settings: IFCA and FeSEM K = 4 (the paper gives none; FeSEM needs K <= the 20 clients of a
round); CFL with the eps1/eps2/warm-up calibrated for these clients in configs/clustered (the code's
0.4/1.6 after 20 rounds never split at this scale); PACFL its defaults; FedProx mu 0.01; FedGen its
defaults; DisUE its defaults (cosine clustering of the round's updates, K by silhouette, class-wise
experts, server generator, 10 distillation iterations a round).

Ablations (Fashion-MNIST alpha 0.1 unless named): ``uniform_experts`` (plain mean of the experts),
``logit_class_experts`` (the per-class weights applied to each logit column instead of per sample),
``public_set`` (distillation on a public unlabeled set of 5 % of the data instead of the generator,
with per-logit class weights: public inputs carry no generated label),
``one_cluster`` (K = 1), ``low_distill_lr`` (the universal expert's SGD at 0.001 instead of 0.01: the
default's distillation moves the weights about as far as a round of local training), ``no_distillation``
(the universal expert is the round's FedAvg; the cluster experts stay), ``two_architectures`` (half the clients an MLP: one universal expert per
architecture, against the full run with cnn_small alone); on rotated MNIST ``projected_64`` and
``projected_512`` (clustering on CountSketches of the updates: what it costs in ARI against the full
rotated-MNIST run).

Usage: .venv/bin/python benchmarks/make_disue_configs.py   (rewrites the files; commit the result)
Run:   benchmarks/run_configs.sh configs/disue runs/disue "0 1 2" 2
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROOT = CONFIGS / "disue"
ROTATED = CONFIGS / "clustered" / "rotated_mnist"
SETTINGS = {  # setting -> (dataset, alpha, client options)
    "fmnist_a0.1": ("fashion_mnist", 0.1, {}),
    "fmnist_a0.5": ("fashion_mnist", 0.5, {}),
    "cifar10_a0.1": ("cifar10", 0.1, {"augment": "crop_flip"}),
    "cifar10_a0.5": ("cifar10", 0.5, {"augment": "crop_flip"}),
}
METHODS = {
    "disue": {"name": "disue"},
    "local": {"name": "local"},
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "ifca": {"name": "ifca", "num_clusters": 4},
    "cfl": {"name": "cfl", "eps1": 0.9, "eps2": 1.5, "warmup_rounds": 3},
    "fesem": {"name": "fesem", "num_clusters": 4},
    "pacfl": {"name": "pacfl"},
    "fedgen": {"name": "fedgen"},
}
ABLATIONS = {  # name -> (changes to the algorithm, changes to the rest of the config)
    "uniform_experts": ({"expert_weights": "uniform"}, {}),
    "logit_class_experts": ({"expert_weights": "class"}, {}),
    "public_set": ({"distill_data": "public", "expert_weights": "class"}, {"data": {"public_fraction": 0.05}}),
    "one_cluster": ({"num_clusters": 1}, {}),
    "low_distill_lr": ({"distill_lr": 0.001}, {}),
    "no_distillation": ({"distill_steps": 0}, {}),
    "two_architectures": ({}, {"models": {"clients": ["cnn_small", "mlp"]}}),
}
PROJECTIONS = (64, 512)


def config(setting: str, algorithm: dict) -> dict:
    dataset, alpha, client_extra = SETTINGS[setting]
    return {
        "name": f"disue-{setting}",
        "seed": 0,
        "rounds": 20,
        "eval_every": 5,
        "participation": 0.2,
        "algorithm": dict(algorithm),
        "data": {"dataset": dataset, "num_clients": 100, "partition": "dirichlet", "dirichlet_alpha": alpha,
                 "min_samples": 10, "public_fraction": 0.0, "max_train_samples": 10000},
        "models": {"clients": ["cnn_small"]},
        "client": {"local_epochs": 2, "batch_size": 32, "lr": 0.003, **client_extra},
    }


def rotated(algorithm: dict) -> dict:
    """configs/clustered/rotated_mnist/fedavg.yaml with another algorithm."""
    body = yaml.safe_load((ROTATED / "fedavg.yaml").read_text())
    return {**body, "algorithm": dict(algorithm)}


def write(path: Path, header: str, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    written = []
    tag = "# Written by benchmarks/make_disue_configs.py (its docstring lists the cuts); edit that script.\n"
    for setting in SETTINGS:
        for method, algorithm in METHODS.items():
            path = ROOT / setting / f"{method}.yaml"
            write(path, f"# DisUE comparison (docs/results.md) at CPU scale: {setting}, method {method}.\n" + tag,
                  config(setting, algorithm))
            written.append(path)
    for method in ("disue", "fedgen"):
        path = ROTATED / f"{method}.yaml"
        write(path, f"# Clustered-FL table (docs/results.md) at CPU scale: rotated MNIST, method {method}.\n" + tag,
              rotated(METHODS[method]))
        written.append(path)
    for name, (algorithm, rest) in ABLATIONS.items():
        body = config("fmnist_a0.1", {**METHODS["disue"], **algorithm})
        for section, changes in rest.items():
            body[section] = {**body[section], **changes}
        body["name"] = f"disue-ablation-{name}"
        path = ROOT / "ablations" / f"{name}.yaml"
        write(path, f"# DisUE ablation ({name}) on Fashion-MNIST, Dirichlet alpha 0.1.\n" + tag, body)
        written.append(path)
    for dim in PROJECTIONS:
        body = rotated({**METHODS["disue"], "projection_dim": dim})
        body["name"] = f"disue-ablation-projected_{dim}"
        path = ROOT / "ablations" / f"projected_{dim}.yaml"
        write(path, f"# DisUE ablation: rotated MNIST, clustering on {dim}-bucket sketches of the updates.\n" + tag,
              body)
        written.append(path)
    print(f"wrote {len(written)} configs")


if __name__ == "__main__":
    main()
