"""FedMosaic (Seo et al., ICLR 2026): relevance-guided aggregation (RELA) of dimension-invariant
PQ-LoRA modules across clients whose models differ in width and depth.

Each client's language model carries dual adapters (a frozen global module and a trainable local
one, mixed by the gate, ``models.lora.gate``): at the last layer of each of N_B depth blocks every
linear is PQ-LoRA — frozen A and B, trained P (r × r) and Q (r), the same shapes at any width —
and elsewhere plain LoRA. A shared small frozen **proxy** model (the same pretrained backbone on
every client, no adapters) measures what each client's task asks of a model. Every round t:
  SERVER  sends client i its personal global module G_i (nothing in the first round: the global
          adapters start at zero, so the model starts as its backbone);
  CLIENT  loads G_i into the global adapter; trains the local adapter and the gate on batches from
          its memory (``step_fraction`` = 0.94 of the shared routine's steps: FedMosaic's 94 against
          FedIT's 100); every ``profile_every`` steps it takes a task profile on the step's batch —
          the gradient of the answer loss w.r.t. the proxy's last MLP output projection, its first
          ``row_fraction`` of rows, plus N(0, ``profile_noise``²) — averages the round's, and keeps an
          EMA ĝ ← (1 − α) ĝ + α g (α = ½); uploads its local adapter and ĝ;
  SERVER  S = the mean over profile columns of the clients' cosine-similarity matrices;
          w_ij = softmax over j ≠ i of S_ij / τ (τ = 0.5); G_i = Σ_j w_ij L_j — P and Q of block b
          from every client's block b (any width or depth), plain LoRA only from clients of i's
          architecture (weights renormalized over them).

Choices (``docs/fedmosaic.md`` has them all): N_B = 2 by default (the paper's 4 assumes 16–32
layers; our models have 2, 4 or 6 blocks, and N_B may not exceed the shallowest); the proxy is the
run's smallest architecture (the code uses its smallest, Llama-3.2-1B); P/Q of the two block families
pair by a linear's name (attention's q/k/v/o everywhere; a family's MLP names only within it);
``rela: false`` gives uniform weights over the others (the ablation "without RELA"),
``block_alignment: false`` pairs P/Q by absolute layer index ("without block alignment"),
``gate: false`` averages the two modules ("without the gate"), ``pq_lora: false`` puts plain LoRA
everywhere, shared across sizes by HetLoRA's zero-padding with RELA's weights ("without PQ-LoRA"); P, Q and
the gates learn at ``pq_lr_scale`` = 10 × the client learning rate (the code: 5e-5 against 2e-5 for
A and B, 2.5×; measured here, P and Q alone at 1e-3 learned nothing in 150 steps, at 1e-2 they did). Before federation,
every architecture but the proxy's has its PQ bases aligned to the proxy's (``alignment.py``: A
trained to match the proxy's codes, B from a least-squares map of outputs instead of the paper's
CCA; ``weight_alignment: false`` is the ablation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configuration import FieldError, Validated, option
from ..learn.loop import Objective, optimize
from ..learn.vlm import mixed_answer_loss
from ..messages import ArrayField, Message, Schema, StageSchema
from ..models import ModuleSpec
from ..models.vlm import VLM_SIZES
from ..models.lora import adapter_parameters, lora_layers, trainable_parameters
from .base import MAIN_SLOT, AlgorithmSpec, ClientContext, Comm, Server, ServerSetup, weight_fields
from .alignment import align_pq_bases
from .hetlora import cut_to, padded_average
from .rela import mix_by_weights, rela_weights, task_profile_gradient
from .vqa import (
    VQA_EVALUATE,
    FixedMix,
    VQAClient,
    adapter_arrays,
    backbone_only,
    load_adapter_arrays,
    local_steps,
    replay,
    vqa_module,
)

PROXY_SLOT = "proxy"
PQ_PREFIX = "w.pq"  # a PQ tensor's message key: w.pq<block>.<linear within the block>.<P|Q>


@dataclass
class FedMosaicConfig(Validated):
    num_blocks: int = option(2, ge=1)  # N_B: depth blocks, each with PQ-LoRA on its last layer
    temperature: float = option(0.5, gt=0)  # τ of RELA's softmax
    profile_every: int = option(10, ge=1)  # m: a task profile every m local steps
    row_fraction: float = option(0.4, gt=0, le=1)  # the profile's leading share of rows kept
    profile_noise: float = option(1e-4, ge=0)  # std of the Gaussian noise added to each profile
    profile_ema: float = option(0.5, gt=0, le=1)  # α of ĝ ← (1 − α) ĝ + α g
    proxy: str = "smallest"  # the shared frozen proxy: "smallest" of the run's architectures, or one of them
    rela: bool = True  # false: uniform weights over the other clients (the "without RELA" ablation)
    step_fraction: float = option(0.94, gt=0)  # of the shared routine's steps
    pq_lr_scale: float = option(10.0, gt=0)  # P, Q and the gates learn at this × client.lr (the code: 2.5)
    weight_alignment: bool = True  # align the other architectures' PQ bases to the proxy's before federation
    block_alignment: bool = True  # false: P/Q pair by absolute layer index, not by relative-depth block
    gate: bool = True  # false: global and local modules averaged (β̃ = ½), the gate unused
    pq_lora: bool = True  # false: plain LoRA everywhere, shared across sizes by HetLoRA's padding
    alignment_examples: int = option(20, ge=1)  # server examples per pretraining template and source
    alignment_steps: int = option(300, ge=1)  # Adam steps fitting each layer's A
    alignment_lr: float = option(0.01, gt=0)


def proxy_architecture(config: FedMosaicConfig, archs: list[str] | tuple[str, ...]) -> str:
    """The proxy's architecture: ``config.proxy``, or the smallest of ``archs`` (by size, then name)."""
    if config.proxy != "smallest":
        return config.proxy
    order = list(VLM_SIZES)
    return min(sorted(set(archs)), key=lambda a: order.index(a.rsplit("_", 1)[1]))


def fedmosaic_modules(arch: str, config: FedMosaicConfig, data: Any = None) -> dict[str, ModuleSpec]:
    """The adapted model (dual adapters, PQ-LoRA on N_B target layers) and the frozen proxy."""
    archs = list(getattr(data, "backbone_options", {}) or [arch])
    return {MAIN_SLOT: vqa_module(arch, data, dual=True, lora_pq_blocks=config.num_blocks if config.pq_lora else 0),
            PROXY_SLOT: backbone_only(proxy_architecture(config, archs), data)}


def check_fedmosaic(config: FedMosaicConfig, run: Any) -> None:
    archs = sorted(set(run.client_archs))
    shallowest = min(VLM_SIZES[a.rsplit("_", 1)[1]].depth for a in archs)
    if config.num_blocks > shallowest:
        raise FieldError("num_blocks", config.num_blocks, f"at most the shallowest model's depth ({shallowest} in {archs})")
    if config.proxy != "smallest" and config.proxy not in archs:
        raise FieldError("proxy", config.proxy, f"'smallest' or one of the run's architectures ({', '.join(archs)}): "
                                                f"every client needs its pretrained backbone")


def align_before_federation(config: FedMosaicConfig, run: Any) -> dict[str, Any]:
    """The one-time weight alignment (``alignment.py``), unless ``weight_alignment`` is off."""
    if not config.weight_alignment or not config.pq_lora:
        return {}
    report = align_pq_bases(run, proxy_architecture(config, run.client_archs), config.num_blocks,
                            config.alignment_examples, config.alignment_steps, config.alignment_lr)
    return {"weight_alignment": report} if report else {}


def shared_names(model: torch.nn.Module, block_alignment: bool = True) -> dict[str, str]:
    """Message key of each local-adapter tensor: PQ tensors by block (or, without block alignment,
    by absolute layer index ``L<i>``) and linear, shared across architectures; plain LoRA tensors by
    their own name, shared within one architecture."""
    out = {}
    for name, layer in lora_layers(model).items():
        for param, _ in layer.adapters["local"].named_parameters():
            if not layer.is_pq:
                out[f"{name}.{param}"] = f"w.{name}.{param}"
                continue
            index, within = name.split(".blocks.", 1)[1].split(".", 1)
            slot = layer.block if block_alignment else f"L{index}"
            out[f"{name}.{param}"] = f"{PQ_PREFIX}{slot}.{within}.{param}"
    return out


def pq_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The local adapter's P and Q tensors (PQ-LoRA layers)."""
    return [p for layer in lora_layers(model).values() if layer.is_pq for p in layer.adapters["local"].parameters()]


class FedMosaicServer(Server):
    def __init__(self, config: FedMosaicConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        self.personal: dict[str, dict[str, np.ndarray]] = {}  # client id (str) -> G_i
        self.relevance = np.zeros((setup.num_clients, setup.num_clients))  # the latest RELA weights

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        replies = comm.ask("train", {c: Message(dict(self.personal.get(str(c), {}))) for c in clients})
        ids = sorted(replies)
        if not ids:
            return {}
        if self.config.rela:
            weights = rela_weights(np.stack([replies[c].arrays["profile"] for c in ids]), self.config.temperature)
        else:
            weights = (1 - np.eye(len(ids))) / max(1, len(ids) - 1)
        self.relevance[np.ix_(ids, ids)] = weights
        uploads = {c: {k: v for k, v in replies[c].arrays.items() if k.startswith("w.")} for c in ids}
        archs = self.setup.client_archs
        for a, i in enumerate(ids):
            if not self.config.pq_lora:  # the ablation: every LoRA tensor across sizes, zero-padded
                self.personal[str(i)] = padded_average(uploads, {j: weights[a, b] for b, j in enumerate(ids)})
                continue
            pq = mix_by_weights({j: weights[a, b] for b, j in enumerate(ids)},
                                {j: {k: v for k, v in uploads[j].items() if k.startswith(PQ_PREFIX)} for j in ids})
            same = {j: weights[a, b] for b, j in enumerate(ids) if archs[j] == archs[i]}
            lora = mix_by_weights(same, {j: {k: v for k, v in uploads[j].items() if not k.startswith(PQ_PREFIX)}
                                         for j in same})
            self.personal[str(i)] = {**pq, **lora}
        off_diagonal = weights[~np.eye(len(ids), dtype=bool)]
        return {"rela_max_weight": float(weights.max()), "rela_weight_std": float(off_diagonal.std())}


    def heatmaps(self) -> dict[str, tuple[np.ndarray, str]]:
        return {"rela_weights": (self.relevance, "RELA weights w_ij, last round (row i: client i's G_i)")}


class FedMosaicClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        model, proxy, config = ctx.model, ctx.modules[PROXY_SLOT], self.config
        names = shared_names(model, config.block_alignment)
        if message.arrays:  # G_i; a tensor no related client holds stays at zero (no update)
            own = adapter_arrays(model, "global")
            received = {"w." + name: message.arrays[key] for name, key in names.items() if key in message.arrays}
            zeros = {k: np.zeros_like(v) for k, v in own.items()}
            load_adapter_arrays(model, cut_to(zeros, received), "global")  # cut: padded across sizes
        profiles: list[np.ndarray] = []

        def profiled(batches):
            for step, batch in enumerate(batches):
                if step % config.profile_every == 0:
                    profiles.append(task_profile_gradient(proxy, batch, config.row_fraction, config.profile_noise,
                                                          ctx.generator("profile", step)))
                yield batch

        fast = self.adaptation_lr_scales(ctx)
        trained = trainable_parameters(model) if config.gate else adapter_parameters(model, "local")
        combined = model if config.gate else FixedMix(model, 0.5)
        with replay(ctx) as batches:
            optimize(Objective(lambda b: mixed_answer_loss(combined, b), trained, ctx.training.optim(),
                               train=(model,), lr_scales=fast), profiled(batches),
                     steps=local_steps(ctx, config.step_fraction))
        profile = np.mean(profiles, axis=0)
        if "profile" in ctx.state:
            profile = (1 - config.profile_ema) * ctx.state["profile"] + config.profile_ema * profile
        ctx.state["profile"] = profile.astype(np.float32)
        local = adapter_arrays(model, "local")
        arrays = {names[k[2:]]: v for k, v in local.items()}
        return Message({**arrays, "profile": ctx.state["profile"]}, {"num_examples": len(ctx.state["memory_task"])})

    def adaptation_lr_scales(self, ctx: ClientContext) -> dict[int, float]:
        """P, Q and the gates learn at ``pq_lr_scale`` × lr, in training and in the fast adaptation."""
        return {id(p): self.config.pq_lr_scale for p in [*adapter_parameters(ctx.model, "gate"), *pq_parameters(ctx.model)]}

    def evaluated_model(self, ctx: ClientContext) -> torch.nn.Module:
        return ctx.model if self.config.gate else FixedMix(ctx.model, 0.5)


SPEC = AlgorithmSpec(
    name="fedmosaic",
    config_cls=FedMosaicConfig,
    server_cls=FedMosaicServer,
    client_cls=FedMosaicClient,
    schemas={
        "train": StageSchema(
            down=Schema(prefix_arrays=weight_fields()),
            up=Schema(prefix_arrays=weight_fields(), arrays={"profile": ArrayField(dtype="float32", shape=None)},
                      scalars={"num_examples": int}),
        ),
        "evaluate": VQA_EVALUATE,
    },
    summary="FedMosaic: PQ-LoRA shared across widths and depths, personal global modules weighted by task relevance (RELA).",
    client_modules=fedmosaic_modules,
    check_run=check_fedmosaic,
    setup_run=align_before_federation,
    task_kind="vqa",
)
