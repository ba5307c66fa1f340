"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024) on LoRA clients: clients of different LoRA ranks share one global adapter of the
largest rank, by zero-padding, with sparsity-weighted aggregation and local rank self-pruning.

Client k has rank r_k (``ranks``: per architecture; else the run's ``models.lora.rank``). Every round t:
  SERVER  sends client k the leading r_k rank components of the global adapter (A's first r_k rows,
          B's first r_k columns), cut to its layer's width;
  CLIENT  loads them, trains on its memory (the shared routine), then **self-prunes**: while its
          last kept rank component contributes less than ``prune_ratio`` × the mean contribution of
          its kept components (contribution of component i: ||B[:, i]|| · ||A[i, :]||), it drops it
          (its rank shrinks for good, never below ``min_rank``); uploads its adapter with the dropped
          components zero;
  SERVER  per layer, zero-pads every upload to the largest rank and averages with weights ∝
          ||B_k A_k||_F (the Frobenius norm of the client's update in that layer: "sparsity-weighted").

Choices: FedMosaic's comparison uses HetLoRA across model sizes (its "without PQ-LoRA" ablation), so
layers of different widths are aggregated too — each entry over the clients whose layer has it (a
width extension of the paper's rank-only zero-padding; along the rank the zeros of lower-rank
clients count, as the paper's padding does); layers pair by name (a deeper model's extra layers
only among models that have them); a layer's norms are taken on the corner all its holders share
(on whole matrices a wider model's norm is larger by its width alone; the first runs summed the
norms over whole models, so with adapters of equal entry size the 4-layer, 2×-wide clients
outweighed the 2-layer ones 4:1 in every layer they share, and the small clients ended at 0.37
accuracy against FlexLoRA's 0.64; docs/results.md). The self-pruning rule and its ratio are
ours (the paper prunes trailing components whose norm falls, with a decay factor): documented, and
0 turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..configuration import FieldError, Validated, option
from ..messages import Message, Schema, StageSchema
from ..models import ModuleSpec
from ..models.lora import lora_layers
from .base import MAIN_SLOT, AlgorithmSpec, ClientContext, Comm, Server, ServerSetup, weight_fields
from .vqa import VQA_EVALUATE, VQAClient, adapter_arrays, load_adapter_arrays, train_on_memory, vqa_module


@dataclass
class HetLoRAConfig(Validated):
    ranks: dict[str, int] = field(default_factory=dict)  # architecture -> its clients' rank (else models.lora.rank)
    prune_ratio: float = option(0.1, ge=0, lt=1)  # self-pruning threshold (0: never prune)
    min_rank: int = option(1, ge=1)  # self-pruning never goes below this


def client_rank(arch: str, config: HetLoRAConfig, data: Any) -> int:
    return int(config.ranks.get(arch, getattr(data, "backbone_options", {}).get(arch, {}).get("lora_rank", 8)))


def hetlora_modules(arch: str, config: HetLoRAConfig, data: Any = None) -> dict[str, ModuleSpec]:
    return {MAIN_SLOT: vqa_module(arch, data, lora_rank=client_rank(arch, config, data))}


def check_hetlora(config: HetLoRAConfig, run: Any) -> None:
    for arch, rank in config.ranks.items():
        if arch not in run.client_archs:
            raise FieldError(f"ranks.{arch}", rank, f"not an architecture of this run ({', '.join(sorted(set(run.client_archs)))})")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < config.min_rank:
            raise FieldError(f"ranks.{arch}", rank, f"must be an int >= min_rank ({config.min_rank})")


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``array`` zero-padded to ``shape`` (leading corner), and the mask of its entries."""
    out, mask = np.zeros(shape), np.zeros(shape, dtype=bool)
    out[tuple(slice(0, n) for n in array.shape)] = array
    mask[tuple(slice(0, n) for n in array.shape)] = True
    return out, mask


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0]


def update_norms(uploads: dict[int, dict[str, np.ndarray]]) -> dict[str, dict[int, float]]:
    """HetLoRA's sparsity weights (unnormalized), per LoRA layer: each holder's ||B_k A_k||_F on the
    corner of the layer every holder has. With one width this is the paper's per-layer norm; across
    widths it compares like with like (on its whole matrix a wider model's norm grows with its width,
    and its uploads would outweigh a narrower model's on the corner they share)."""
    norms: dict[str, dict[int, float]] = {}
    for layer in sorted({_layer(k) for a in uploads.values() for k in a if k.endswith(".lora_A")}):
        holders = [c for c, a in uploads.items() if f"{layer}.lora_A" in a and f"{layer}.lora_B" in a]
        rows = min(uploads[c][f"{layer}.lora_B"].shape[0] for c in holders)
        cols = min(uploads[c][f"{layer}.lora_A"].shape[1] for c in holders)
        norms[layer] = {c: float(np.linalg.norm(uploads[c][f"{layer}.lora_B"][:rows].astype(np.float64)
                                                @ uploads[c][f"{layer}.lora_A"][:, :cols])) or 1e-12
                        for c in holders}
    return norms


def padded_average(uploads: dict[int, dict[str, np.ndarray]], weights: dict[int, float],
                   layer_weights: dict[str, dict[int, float]] | None = None) -> dict[str, np.ndarray]:
    """Per LoRA tensor, the weighted average of the uploads zero-padded to the largest shape: along
    the rank (A's rows, B's columns) the padded zeros count, as HetLoRA's padding; across widths each
    entry is averaged over the clients whose layer has it. A tensor's weights are its layer's in
    ``layer_weights`` where given, else ``weights``; clients of weight 0 are left out."""
    def weights_of(name: str) -> dict[int, float]:
        return layer_weights.get(_layer(name), weights) if layer_weights else weights

    out = {}
    for name in sorted({k for c, a in uploads.items() for k in a if weights_of(k).get(c, 0) > 0}):
        w = weights_of(name)
        holders = [c for c in uploads if name in uploads[c] and w.get(c, 0) > 0]
        is_a = name.endswith(".lora_A")
        shape = tuple(max(uploads[c][name].shape[d] for c in holders) for d in range(2))
        total, weight = np.zeros(shape), np.zeros(shape)
        for c in holders:
            padded, mask = _pad(uploads[c][name].astype(np.float64), shape)
            width_mask = mask.any(axis=0, keepdims=True) if is_a else mask.any(axis=1, keepdims=True)
            total += w[c] * padded
            weight += w[c] * np.broadcast_to(width_mask, shape)
        out[name] = (total / np.maximum(weight, 1e-12)).astype(np.float32)
    return out


def aggregate(uploads: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """HetLoRA's rule: the padded average, each layer weighted by its uploads' update norms."""
    return padded_average(uploads, {}, layer_weights=update_norms(uploads))


def cut_to(own: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``received`` tensors cut to the leading corner of this model's shapes (its own where missing)."""
    return {k: np.array(received[k][tuple(slice(0, n) for n in v.shape)]) if k in received else v
            for k, v in own.items()}


class HetLoRAServer(Server):
    def __init__(self, config: HetLoRAConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.global_adapter: dict[str, np.ndarray] = {}  # the largest rank and width of every layer

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        replies = comm.ask("train", {c: Message(dict(self.global_adapter)) for c in clients})
        if replies:
            self.global_adapter = aggregate({c: dict(r.arrays) for c, r in replies.items()})
        return {"mean_rank": float(np.mean([r.scalars["rank"] for r in replies.values()])) if replies else 0.0}


class HetLoRAClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        model, config = ctx.model, self.config
        own = adapter_arrays(model)
        rank = int(ctx.state.get("rank", next(v.shape[0] for k, v in own.items() if k.endswith(".lora_A"))))
        if message.arrays:  # the leading components of the global adapter, cut to this model's shapes
            load_adapter_arrays(model, cut_to(own, dict(message.arrays)))
        _zero_beyond(model, rank)
        train_on_memory(ctx)
        rank = _self_prune(model, rank, config.prune_ratio, config.min_rank)
        _zero_beyond(model, rank)
        ctx.state["rank"] = rank
        return Message(adapter_arrays(model), {"num_examples": len(ctx.state["memory_task"]), "rank": rank})


def _contributions(model) -> np.ndarray:
    """Per rank component, the summed ||B[:, i]|| · ||A[i, :]|| over the model's adapted layers."""
    total = None
    for layer in lora_layers(model).values():
        adapter = layer.adapters["local"]
        part = (adapter.lora_B.detach().norm(dim=0) * adapter.lora_A.detach().norm(dim=1)).numpy()
        total = part if total is None else total + part
    return total


def _self_prune(model, rank: int, ratio: float, floor: int) -> int:
    contributions = _contributions(model)
    while rank > floor and ratio > 0 and contributions[rank - 1] < ratio * contributions[:rank].mean():
        rank -= 1
    return rank


def _zero_beyond(model, rank: int) -> None:
    """Components from ``rank`` on are dropped: zero in A's rows and B's columns."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            adapter = layer.adapters["local"]
            adapter.lora_A[rank:] = 0
            adapter.lora_B[:, rank:] = 0


SPEC = AlgorithmSpec(
    name="hetlora",
    config_cls=HetLoRAConfig,
    server_cls=HetLoRAServer,
    client_cls=HetLoRAClient,
    schemas={"train": StageSchema(down=Schema(prefix_arrays=weight_fields()),
                                  up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int, "rank": int})),
             "evaluate": VQA_EVALUATE},
    summary="HetLoRA: rank-heterogeneous LoRA, zero-padded sparsity-weighted aggregation, local rank self-pruning.",
    client_modules=hetlora_modules,
    check_run=check_hetlora,
    task_kind="vqa",
)
