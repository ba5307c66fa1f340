"""Write FedMosaic's comparison configs (issue #12): configs/fedmosaic_runs/<scenario>/<method>.yaml and
configs/fedmosaic_runs/ablations/<name>.yaml.

The same protocol as issue #11's table (``make_hetvqa_runs.config``: 20 rounds, 10 clients, 500
training / 50 test examples per task subset, rank 8, Adam 1e-3, batch 8, 50 steps a round) on the
scenarios FedMosaic's claims need: homogeneous and two-size heterogeneous, dynamic and static, and the
cross-family one (``families_dynamic``: Llama and GPT blocks). Methods: FedMosaic and its five
heterogeneous baselines everywhere; issue #11's seven LoRA baselines on the scenarios their own table
(configs/hetvqa_runs: homo_dynamic, sizes_dynamic) does not cover. Ablations on sizes_dynamic:
without RELA, block alignment, weight alignment, the gate, or PQ-LoRA (plain LoRA shared across
sizes by HetLoRA's padding, with RELA's weights). Variants (configs/fedmosaic_runs/variants): FedMosaic
with another setting (``one_block``: N_B = 1 on sizes_dynamic; ``homo_dynamic_one_block``: the same on
homo_dynamic).

Usage: .venv/bin/python benchmarks/make_fedmosaic_runs.py   (rewrites the files; commit the result)
Run:   benchmarks/run_configs.sh configs/fedmosaic_runs runs/fedmosaic "0 1 2" 2
       (and configs/hetvqa_runs into runs/hetvqa for the seven baselines on the two dynamic scenarios)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_hetvqa_runs import METHODS as LORA_BASELINES  # noqa: E402
from make_hetvqa_runs import SCENARIOS as COVERED  # noqa: E402
from make_hetvqa_runs import config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "configs" / "fedmosaic_runs"
SCENARIOS = ("homo_dynamic", "sizes_dynamic", "homo_static", "sizes_static", "families_dynamic")
METHODS = ("fedmosaic", "feddistill", "fedmkt", "takfl", "hetlora", "flexlora")
ABLATIONS = {"no_rela": {"rela": False}, "no_block_alignment": {"block_alignment": False},
             "no_weight_alignment": {"weight_alignment": False}, "no_gate": {"gate": False},
             "no_pq_lora": {"pq_lora": False}}
#: FedMosaic with another setting, on a scenario: one block puts P/Q on the last layer only, where
#: two blocks make both layers of the 2-layer small model PQ layers (r² + r values each to train);
#: on homo_dynamic every client is that small model
VARIANTS = {"one_block": ("sizes_dynamic", {"num_blocks": 1}),
            "homo_dynamic_one_block": ("homo_dynamic", {"num_blocks": 1})}


def write(path: Path, tree: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by benchmarks/make_fedmosaic_runs.py (edit that, not this)\n"
                    + yaml.safe_dump(tree, sort_keys=False))


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    count = 0
    for scenario in SCENARIOS:
        methods = METHODS + (() if scenario in COVERED else LORA_BASELINES)
        for method in methods:
            write(ROOT / scenario / f"{method}.yaml", config(scenario, method))
            count += 1
    settings = [("ablations", name, "sizes_dynamic", options) for name, options in ABLATIONS.items()]
    settings += [("variants", name, scenario, options) for name, (scenario, options) in VARIANTS.items()]
    for folder, name, scenario, options in settings:
        tree = config(scenario, "fedmosaic")
        tree["name"] = f"hetvqa-{scenario}-fedmosaic-{name.removeprefix(scenario + '_')}"
        tree["algorithm"].update(options)
        write(ROOT / folder / f"{name}.yaml", tree)
        count += 1
    print(f"wrote {count} configs under {ROOT}")


if __name__ == "__main__":
    main()
