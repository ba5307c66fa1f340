"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024) on LoRA clients: average the full-size updates, not A and B.

Every round t:
  SERVER  sends each client the adapter (A_a, B_a) of its architecture a;
  CLIENT  loads it, trains on its memory (the shared routine, as FedIT), uploads its A_k, B_k, n_k;
  SERVER  for every adapted layer and architecture: ΔW̄ = Σ n_k B_k A_k / Σ n_k (the full-size update
          each client's adapter stands for), then its truncated SVD ΔW̄ ≈ U_r Σ_r V_rᵀ is handed back
          as B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ (rank r of the clients).

FedIT averages A and B separately, and the average of products is not the product of averages;
FlexLoRA's reconstruction is exact up to the rank-r truncation. Choices: the singular values are
split evenly between B and A (the paper assigns the truncated factors without fixing the split;
the product, which is what the model computes, is the same either way); the run's clients share one
rank (``models.lora.rank``), so every client of an architecture gets the same factors — with
ranks per client the same SVD would be cut at each client's rank. Full-size updates of different
widths cannot be averaged: as FedIT, per architecture only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..messages import Message
from .base import AlgorithmSpec
from .fedit import FedITClient, FedITServer
from .vqa import ADAPTERS_ROUND, VQA_EVALUATE, vqa_modules


@dataclass
class FlexLoRAConfig:
    """FlexLoRA has no hyperparameters beyond the shared client routine."""


def svd_average(replies: dict[int, Message], members: list[int]) -> dict[str, np.ndarray]:
    """The rank-r factors of the example-weighted mean of ``members``' full-size updates, per layer."""
    sizes = np.array([float(replies[c].scalars["num_examples"]) for c in members])
    weights = sizes / sizes.sum()
    out = {}
    layers = sorted(k[: -len(".lora_A")] for k in replies[members[0]].arrays if k.endswith(".lora_A"))
    for layer in layers:
        a_key, b_key = f"{layer}.lora_A", f"{layer}.lora_B"
        full = sum(w * replies[c].arrays[b_key].astype(np.float64) @ replies[c].arrays[a_key].astype(np.float64)
                   for w, c in zip(weights, members))
        rank = replies[members[0]].arrays[a_key].shape[0]
        u, s, vt = np.linalg.svd(full, full_matrices=False)
        root = np.sqrt(s[:rank])
        out[b_key] = (u[:, :rank] * root).astype(np.float32)
        out[a_key] = (root[:, None] * vt[:rank]).astype(np.float32)
    return out


class FlexLoRAServer(FedITServer):
    def aggregate(self, replies: dict[int, Message]) -> None:
        archs = self.setup.client_archs
        for arch in sorted({archs[c] for c in replies}):
            self.global_adapters[arch] = svd_average(replies, [c for c in sorted(replies) if archs[c] == arch])


SPEC = AlgorithmSpec(
    name="flexlora",
    config_cls=FlexLoRAConfig,
    server_cls=FlexLoRAServer,
    client_cls=FedITClient,
    schemas={"train": ADAPTERS_ROUND, "evaluate": VQA_EVALUATE},
    summary="FlexLoRA: average the clients' full-size LoRA updates per architecture, hand back their rank-r SVD.",
    client_modules=vqa_modules,
    task_kind="vqa",
)
