"""Write HetVQA's scenario files: configs/hetvqa/<models>_<mode>.yaml.

Ten clients with four tasks each, in the structure of FedMosaic's DRAKE scenarios (methods.md §2b
3.3): three groups of related clients, whose tasks are disjoint subsets (``/k``) of the same
task-and-source, so a client has truly related peers and unrelated ones — digits (clients 0-3:
MNIST and scikit-learn digits), fashion (4-6) and objects (7-9, CIFAR-10) — with one
new-visual-domain task in most clients' lists. Every client starts on a recognition or attribute
task and meets comparison, odd-one-out or reasoning later (the order differs between clients, and
all switch at once in the dynamic mode). Unseen tasks, for fast adaptation after the run: two new
task types (the difference of two digits, counting animals) and three new domains.

Models: ``homo`` — vlm_llama_s everywhere; ``sizes`` — two sizes of one family, 4 x vlm_llama_s and
6 x vlm_llama_m (FedMosaic's 4 x 1B + 6 x 3B); ``families`` — two families, 2 x vlm_llama_s,
5 x vlm_llama_m and 3 x vlm_gpt_m (its Llama-1B / Llama-3B / Qwen-1.5B = 2/5/3).
Modes: ``dynamic`` (PFL-Dynamic: tasks switch every 5 rounds) and ``static`` (PFL-Static).

Usage: .venv/bin/python benchmarks/make_hetvqa_scenarios.py   (rewrites the files; commit the result)
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "configs" / "hetvqa"

TASKS = [
    ["recognize_mnist/0", "parity_mnist/0", "same_mnist/0", "sum_mnist/0"],
    ["parity_mnist/1", "recognize_mnist/1", "larger_mnist/0", "odd_mnist/0"],
    ["recognize_digits/0", "sum_digits/0", "odd_digits/0", "magnitude_mnist/0"],
    ["magnitude_mnist/1", "same_mnist/1", "sum_mnist/1", "recognize_mnist@rotate/0"],
    ["recognize_fashion_mnist/0", "wearable_fashion_mnist/0", "same_fashion_mnist/0", "odd_fashion_mnist/0"],
    ["wearable_fashion_mnist/1", "recognize_fashion_mnist/1", "odd_fashion_mnist/1", "same_fashion_mnist@invert/0"],
    ["recognize_fashion_mnist@invert/0", "same_fashion_mnist/1", "wearable_fashion_mnist/2", "odd_fashion_mnist/2"],
    ["recognize_cifar10/0", "living_cifar10/0", "same_cifar10/0", "odd_cifar10/0"],
    ["living_cifar10/1", "recognize_cifar10/1", "odd_cifar10/1", "same_cifar10@noise/0"],
    ["recognize_cifar10@noise/0", "same_cifar10/1", "living_cifar10/2", "odd_cifar10/2"],
]
UNSEEN = {
    "new_type": ["difference_mnist/0", "count_cifar10/0"],
    "new_domain": ["parity_mnist@invert/2", "living_cifar10@rotate/3", "odd_fashion_mnist@noise/3"],
}
MODELS = {
    "homo": ["vlm_llama_s"] * 10,
    "sizes": ["vlm_llama_s"] * 2 + ["vlm_llama_m"] * 2 + ["vlm_llama_s"] + ["vlm_llama_m"] * 2
    + ["vlm_llama_s"] + ["vlm_llama_m"] * 2,
    "families": ["vlm_llama_s", "vlm_llama_m", "vlm_gpt_m", "vlm_llama_m", "vlm_llama_s", "vlm_gpt_m",
                 "vlm_llama_m", "vlm_llama_m", "vlm_gpt_m", "vlm_llama_m"],
}


def main() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    for models_name, models in MODELS.items():
        assert len(models) == len(TASKS)
        for mode in ("dynamic", "static"):
            scenario = {
                "name": f"{models_name}_{mode}",
                "mode": mode,
                "rounds_per_task": 5,
                "clients": [{"model": m, "tasks": t} for m, t in zip(models, TASKS)],
                "unseen": UNSEEN,
            }
            path = ROOT / f"{models_name}_{mode}.yaml"
            path.write_text("# written by benchmarks/make_hetvqa_scenarios.py (edit that, not this)\n"
                            + yaml.safe_dump(scenario, sort_keys=False, default_flow_style=None, width=120))
            print(path.relative_to(ROOT.parents[1]))


if __name__ == "__main__":
    main()
