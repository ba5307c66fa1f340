"""Write the Mosaic reproduction configs: configs/mosaic/<dataset>/a<alpha>/<models>/<method>.yaml.

The official setting (methods.md §4b) cut to CPU size: 10 clients, Dirichlet(alpha) over clients per
class with alpha in {0.01, 0.1, 1.0} and at least 10 private samples each, every client every round,
on MNIST, Fashion-MNIST and CIFAR-10; once with one architecture everywhere (``homogeneous``: Mosaic,
DENSE, FedFTG, FedGen, FedAvg, FedProx, FedBN, FedRS) and once with widths {1, 1/2, 1/4}
(``widths``: Mosaic, DFRD, FedRolex, HeteroFL). The data, client and round sections are the same for
every method of one (dataset, alpha, models) cell; only ``algorithm`` differs. Ablations of Mosaic on
MNIST alpha 0.1 go to configs/mosaic/ablations/.

Cuts (the paper -> here): 16k-50k private samples -> ``max_train_samples``; 100 rounds -> 20 (Mosaic:
15 FedAvg warm-up rounds, distillation, 5 fine-tuning rounds; the code: 40 warm-up of 100); generator
epochs 200 -> 5; distillation 1,500 steps -> 300; DENSE's 200 server epochs -> 20 (its clients train
20 local epochs once: the others' 20 rounds of 1 epoch), its distillation one pass over the pool per
epoch (a pool growing to 51,200 samples, ~20,000 steps in all) -> 100 steps per epoch (2,000).

Usage: .venv/bin/python benchmarks/make_mosaic_configs.py   (rewrites the folder; commit the result)
Run:   benchmarks/run_configs.sh configs/mosaic/mnist/a0.1 runs/mosaic/mnist/a0.1 "0 1 2"
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "configs" / "mosaic"
ALPHAS = (0.01, 0.1, 1.0)
DATASETS = {  # dataset -> (architecture, private samples, client options)
    "mnist": ("cnn_small", 10000, {}),
    "fashion_mnist": ("cnn_small", 10000, {}),
    "cifar10": ("cnn_small", 10000, {"augment": "crop_flip"}),
}
MOSAIC = {"name": "mosaic", "warmup_rounds": 15, "latent_dim": 64, "generator_width": 32, "generator_epochs": 5,
          "classifier_epochs": 5, "kd_steps": 300, "meta_steps": 150}
HOMOGENEOUS = {
    "mosaic": MOSAIC,
    "dense": {"name": "dense", "local_epochs": 20, "kd_steps": 100},
    "fedftg": {"name": "fedftg"},
    "fedgen": {"name": "fedgen"},
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedbn": {"name": "fedbn"},
    "fedrs": {"name": "fedrs"},
}
WIDTHS = {
    "mosaic": MOSAIC,
    "dfrd": {"name": "dfrd"},
    "fedrolex": {"name": "fedrolex"},
    "heterofl": {"name": "heterofl"},
}
ABLATIONS = {  # Mosaic on MNIST alpha 0.1, one architecture: each removes one part
    "full": {},
    "no_meta_model": {"teacher": "average"},
    "no_prototypes": {"meta_data": "generated"},
    "no_diversity": {"diversity_weight": 0.0},
    "one_generator": {"generators": "averaged"},
}


def config(dataset: str, alpha: float, models: str, method: str, algorithm: dict) -> dict:
    arch, samples, client_extra = DATASETS[dataset]
    one_shot = algorithm["name"] == "dense"
    return {
        "name": f"mosaic-{dataset}-a{alpha}-{models}",
        "seed": 0,
        "rounds": 1 if one_shot else 20,  # DENSE is one-shot: its round 0 is the whole method
        "eval_every": 5,
        "participation": 1.0,
        "algorithm": dict(algorithm),
        "data": {"dataset": dataset, "num_clients": 10, "partition": "dirichlet", "dirichlet_alpha": alpha,
                 "min_samples": 10, "public_fraction": 0.0, "max_train_samples": samples},
        "models": {"clients": [arch] if models == "homogeneous" else [arch, f"{arch}@0.5", f"{arch}@0.25"]},
        "client": {"local_epochs": 1, "batch_size": 32, "lr": 0.003, **client_extra},
    }


def write(path: Path, header: str, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    count = 0
    for dataset in DATASETS:
        for alpha in ALPHAS:
            for models, methods in (("homogeneous", HOMOGENEOUS), ("widths", WIDTHS)):
                for method, algorithm in methods.items():
                    header = (f"# Mosaic table (docs/results.md) at CPU scale: {dataset}, Dirichlet alpha {alpha}, "
                              f"{models}, method {method}.\n# Written by benchmarks/make_mosaic_configs.py "
                              "(its docstring lists the cuts); edit that script, not this file.\n")
                    write(ROOT / dataset / f"a{alpha}" / models / f"{method}.yaml", header,
                          config(dataset, alpha, models, method, algorithm))
                    count += 1
    for name, change in ABLATIONS.items():
        header = (f"# Mosaic ablation ({name}) on MNIST, Dirichlet alpha 0.1, one architecture.\n"
                  "# Written by benchmarks/make_mosaic_configs.py; edit that script, not this file.\n")
        body = config("mnist", 0.1, "homogeneous", "mosaic", {**MOSAIC, **change})
        body["name"] = f"mosaic-ablation-{name}"
        write(ROOT / "ablations" / f"{name}.yaml", header, body)
        count += 1
    print(f"wrote {count} configs under {ROOT}")


if __name__ == "__main__":
    main()
