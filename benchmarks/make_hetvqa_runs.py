"""Write the HetVQA comparison configs: configs/hetvqa_runs/<scenario>/<method>.yaml.

FedMosaic's protocol (methods.md §2.2: 10 clients, 4 tasks each, 5 rounds per task, 20 rounds, full
participation, LoRA on every linear layer of the language model) on HetVQA at CPU scale: the
scenarios `homo_dynamic` (ten vlm_llama_s clients) and `sizes_dynamic` (four vlm_llama_s and six
vlm_llama_m: two sizes of one family, different width and depth), each client's backbone pretrained
once by the default recipe (cached). Per task subset 500 training examples (100 arrive each round),
50 test examples (Self), 10 of them per task for Others; after the run 25 steps of fast adaptation on
100 examples of each unseen task.

Client routine (the same for every method, as in FedMosaic): Adam at 1e-3 (calibrated: docs/results.md),
batch 8, local_epochs 4 (50 steps a round for FedIT and SFT; the methods with several passes per step
take their step_fraction of it), LoRA rank 8, alpha 16. Methods at their defaults (their files say
where each comes from).

Usage: .venv/bin/python benchmarks/make_hetvqa_runs.py   (rewrites the files; commit the result)
Run:   benchmarks/run_configs.sh configs/hetvqa_runs runs/hetvqa "0 1 2" 2
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROOT = CONFIGS / "hetvqa_runs"
SCENARIOS = ("homo_dynamic", "sizes_dynamic")
METHODS = ("sft", "fedit", "ditto_lora", "fedsim", "feddpa", "feddat", "perada")


def config(scenario: str, method: str) -> dict:
    return {
        "name": f"hetvqa-{scenario}-{method}",
        "rounds": 20,
        "algorithm": {"name": method},
        "data": {"dataset": "hetvqa", "num_clients": 10,
                 "options": {"scenario": f"configs/hetvqa/{scenario}.yaml", "train_per_task": 500, "test_per_task": 50,
                             "others_per_task": 10, "adaptation_steps": 25, "adaptation_examples": 100}},
        "models": {"lora": {"rank": 8, "alpha": 16}},
        "client": {"optimizer": "adam", "lr": 0.001, "batch_size": 8, "local_epochs": 4},
    }


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    for scenario in SCENARIOS:
        for method in METHODS:
            path = ROOT / scenario / f"{method}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# written by benchmarks/make_hetvqa_runs.py (edit that, not this)\n"
                            + yaml.safe_dump(config(scenario, method), sort_keys=False))
    print(f"wrote {len(SCENARIOS) * len(METHODS)} configs under {ROOT}")


if __name__ == "__main__":
    main()
