"""LoRA on any ``nn.Module``: every ``nn.Linear`` in a scope becomes a :class:`LoRALinear`.

``y = W x + b + (α / r) · B A dropout(x)`` with ``W, b`` frozen, ``A`` (r × d_in, Kaiming-uniform) and
``B`` (d_out × r, zeros, so the adapted model starts equal to the base model) trained.

**Dual modules** (FedMosaic, FedDPA, FedDAT): each layer holds a frozen ``global`` adapter and a
trainable ``local`` one, mixed by a gate β̃ ∈ (0, 1):
``y = W x + b + (α / r) · [β̃ · B_g A_g x + (1 − β̃) · B_l A_l x]``. Gates (:data:`GATES`):

* ``"scalar"`` — the paper's β̃ = σ(β), one learnable β per layer (initialised 0: β̃ = ½);
* ``"input"`` — the official code's input-conditioned gate: β̃ = σ(mean over tokens of x·w_gate
  (+ noise of std softplus(x·w_noise) in training)), ``w_gate``/``w_noise`` ∈ R^{d_in} initialised 0.

**PQ-LoRA** (FedMosaic's dimension-invariant module, ``add_lora(pq=...)``): at chosen layers the
update is ``B (P A x + Q)`` with ``A`` and ``B`` frozen (:class:`PQBasis`) and only ``P`` (r × r) and
``Q`` (r) trained, so models of different width share them; :func:`target_layers` picks the last
layer of each of N_B blocks of relative depth (block alignment across depths).

Only adapter tensors travel: :func:`adapter_state` returns the named tensors of one adapter (or the
gates), :func:`load_adapter_state` writes them back into either adapter, so a client can upload its
``local`` adapter and receive a ``global`` one. The base model's weights never leave.

Works on our :class:`~hetpfl.models.vlm.VisionLanguageModel` (scope ``language``, ``lm_head``
excluded, from the model's ``lora_scope``/``lora_exclude``) and on Hugging Face ``transformers``
models (pass ``scope="model"`` for a ``*ForCausalLM``; see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configuration import Validated, option
from ..rng import derive_seed

__all__ = ["ADAPTERS", "GATES", "LoRALinear", "LoRAOptions", "PQAdapter", "PQBasis", "pq_bases", "set_pq_bases", "target_layers", "adapter_mix", "adapter_parameters", "add_lora", "adapter_state", "gate_shares", "load_adapter_state",
           "lora_layers", "trainable_parameters"]

#: The adapters of a dual layer: ``local`` (trained, uploaded) and ``global`` (received, frozen).
ADAPTERS = ("local", "global")
#: How a dual layer mixes its two adapters (module docstring).
GATES = ("scalar", "input")


@dataclass(frozen=True)
class LoRAOptions(Validated):
    """The adapters of a run's clients (the config's ``models.lora``)."""

    rank: int = option(8, ge=1)  # r
    alpha: float = option(16.0, gt=0)  # the scale is alpha / r
    dropout: float = option(0.0, ge=0, lt=1)  # on the adapter's input
    gate: str = option("scalar", choices=GATES)  # how dual adapters are mixed (module docstring)

    def builder_options(self) -> dict[str, Any]:
        """The vision-language model builder's options for these adapters."""
        return {"lora_rank": self.rank, "lora_alpha": float(self.alpha), "lora_dropout": float(self.dropout),
                "lora_gate": self.gate}


class LoRAAdapter(nn.Module):
    """One low-rank update ``B A x`` (without the scale)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) draw for A

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class PQAdapter(nn.Module):
    """PQ-LoRA's trained part (FedMosaic): ``z ↦ z P + Q`` in the rank space of a frozen basis, so its
    shapes (r × r and r) depend on the rank alone, never on the layer's width. Starts at zero."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.P = nn.Parameter(torch.zeros(rank, rank))
        self.Q = nn.Parameter(torch.zeros(rank))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.P + self.Q


class PQBasis(nn.Module):
    """PQ-LoRA's frozen ``A`` (r × d_in, a Kaiming-uniform draw) and ``B`` (d_out × r, orthonormal
    columns: the Q factor of a Gaussian draw), drawn from ``seed`` alone so that every client of one
    architecture holds the same basis and their P and Q mean the same thing."""

    def __init__(self, in_features: int, out_features: int, rank: int, seed: int) -> None:
        super().__init__()
        if rank > min(in_features, out_features):
            raise ValueError(f"PQ-LoRA rank {rank} exceeds the layer's {in_features} -> {out_features} (B needs "
                             f"orthonormal columns)")
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and LoRA's A
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        b, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator))
        self.A = nn.Parameter(a, requires_grad=False)
        self.B = nn.Parameter(b.contiguous(), requires_grad=False)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one adapter (``local``) or two mixed by a gate (module docstring).

    ``pq_seed`` (not None) makes it a PQ-LoRA layer: a frozen :class:`PQBasis` and
    :class:`PQAdapter` adapters, ``y = W x + b + (α / r) · B (P A x + Q)`` per adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dual: bool = False,
                 gate: str = "scalar", gate_noise: bool = True, pq_seed: int | None = None) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        names = ADAPTERS if dual else ADAPTERS[:1]
        self.basis = None if pq_seed is None else PQBasis(base.in_features, base.out_features, rank, pq_seed)
        self.block: int | None = None  # a PQ layer's block (set by the model that places it)
        self.adapters = nn.ModuleDict({
            n: LoRAAdapter(base.in_features, base.out_features, rank) if pq_seed is None else PQAdapter(rank)
            for n in names})
        self.gate_kind = gate if dual else None
        self.gate_noise = gate_noise
        self.mix: Tensor | None = None  # a fixed global share (adapter_mix), else the gate decides
        self.shares: list[Tensor] | None = None  # β̃ of every forward pass, while gate_shares records
        if dual:
            self.adapters["global"].requires_grad_(False)
            if gate == "scalar":
                self.beta = nn.Parameter(torch.zeros(()))
            else:
                self.w_gate = nn.Parameter(torch.zeros(base.in_features))
                self.w_noise = nn.Parameter(torch.zeros(base.in_features))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # callers that read a Linear's weight (e.g. tied heads) still can
        return self.base.weight

    def gate(self, x: Tensor) -> Tensor:
        """β̃, the global adapter's share: a scalar, or one value per sample (broadcast over tokens);
        a share set by :func:`adapter_mix` replaces the learned gate."""
        if self.mix is not None:
            return self.mix.reshape(-1, *([1] * (x.dim() - 1))) if self.mix.dim() else self.mix
        if self.gate_kind == "scalar":
            return torch.sigmoid(self.beta)
        logit = x @ self.w_gate
        if self.training and self.gate_noise:
            logit = logit + torch.randn_like(logit) * F.softplus(x @ self.w_noise)
        per_sample = logit.mean(dim=-1) if x.dim() > 2 else logit  # mean over tokens
        return torch.sigmoid(per_sample).reshape(-1, *([1] * (x.dim() - 1)))

    @property
    def is_pq(self) -> bool:
        return self.basis is not None

    def update(self, which: str, h: Tensor) -> Tensor:
        """Adapter ``which``'s update of (dropped-out) input ``h``, before the scale."""
        if self.basis is None:
            return self.adapters[which](h)
        return F.linear(self.adapters[which](F.linear(h, self.basis.A)), self.basis.B)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(x)
        if self.gate_kind is None:
            return self.base(x) + self.scale * self.update("local", h)
        beta = self.gate(x)
        if self.shares is not None:
            self.shares.append(beta.detach().reshape(-1))
        mixed = beta * self.update("global", h) + (1 - beta) * self.update("local", h)
        return self.base(x) + self.scale * mixed


def _resolve(model: nn.Module, scope: str | None) -> tuple[nn.Module, str]:
    scope = scope if scope is not None else getattr(model, "lora_scope", "")
    root = model.get_submodule(scope) if scope else model
    return root, scope


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, *, dual: bool = False,
             gate: str = "scalar", gate_noise: bool = True, scope: str | None = None,
             exclude: tuple[str, ...] | None = None, pq: Callable[[str], bool] | None = None,
             pq_seed: int = 0) -> list[str]:
    """Replace every ``nn.Linear`` under ``scope`` (a submodule path; default the model's
    ``lora_scope``, else the whole model) whose name matches none of the ``exclude`` regexes
    (default the model's ``lora_exclude``, else ``("lm_head",)``) by a :class:`LoRALinear`, in place,
    and freeze everything else in ``model``. Layers whose name (relative to the scope) ``pq``
    accepts become PQ-LoRA layers, their frozen basis drawn from ``pq_seed``, the name and the shape.
    Returns the adapted layers' names (relative to ``model``).
    Raises ``ValueError`` for a bad rank/alpha/dropout/gate or a scope with no linear layer."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if gate not in GATES:
        raise ValueError(f"LoRA gate {gate!r} is not one of {', '.join(GATES)}")
    root, scope = _resolve(model, scope)
    exclude = exclude if exclude is not None else getattr(model, "lora_exclude", ("lm_head",))
    patterns = [re.compile(p) for p in exclude]
    targets = [(name, m) for name, m in root.named_modules()
               if isinstance(m, nn.Linear) and not any(p.search(name) for p in patterns)]
    if not targets:
        raise ValueError(f"LoRA: no nn.Linear under scope {scope or '<model>'!r} outside {list(exclude)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        seed = (derive_seed(pq_seed, "pq-basis", name, linear.in_features, linear.out_features, rank)
                if pq is not None and pq(name) else None)
        setattr(parent, child, LoRALinear(linear, rank, alpha, dropout, dual=dual, gate=gate, gate_noise=gate_noise,
                                          pq_seed=seed))
    prefix = f"{scope}." if scope else ""
    return [prefix + name for name, _ in targets]


@contextmanager
def adapter_mix(model: nn.Module, share: float | Tensor) -> Iterator[None]:
    """Within the block, every dual layer of ``model`` gives its global adapter the fixed share
    ``share`` (0: the local adapter alone, 1: the global one alone, ½: their average; a (B,) tensor:
    one share per sample) instead of its gate's."""
    layers = [layer for layer in lora_layers(model).values() if layer.gate_kind is not None]
    if not layers:
        raise ValueError("adapter_mix: the model has no dual adapters (add_lora with dual=True)")
    value = torch.as_tensor(share, dtype=torch.float32)
    for layer in layers:
        layer.mix = value
    try:
        yield
    finally:
        for layer in layers:
            layer.mix = None


@contextmanager
def gate_shares(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every dual layer of ``model`` records the global adapter's share β̃ of each
    forward pass (one value per sample, or one per pass for a scalar gate or a fixed share) into the
    yielded list — how much of the global module the model uses. Empty for a model without dual layers."""
    layers = [layer for layer in lora_layers(model).values() if layer.gate_kind is not None]
    shares: list[Tensor] = []
    for layer in layers:
        layer.shares = shares
    try:
        yield shares
    finally:
        for layer in layers:
            layer.shares = None


def target_layers(depth: int, num_blocks: int) -> list[int]:
    """The layers that carry PQ-LoRA in a model of ``depth`` layers cut into ``num_blocks`` blocks of
    relative depth: the last layer of each, ``{s−1, 2s−1, …, depth−1}`` with ``s = depth // num_blocks``
    (FedMosaic's ``get_target_layers``). Block ``b`` of any model pairs with block ``b`` of any other.
    Raises ``ValueError`` unless 1 <= ``num_blocks`` <= ``depth``."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= depth:
        raise ValueError(f"PQ-LoRA blocks: num_blocks must be an int in 1..{depth} (the model's depth), got {num_blocks!r}")
    step = depth // num_blocks
    return [step * (b + 1) - 1 for b in range(num_blocks - 1)] + [depth - 1]


def pq_bases(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Copies of every PQ-LoRA layer's frozen basis: ``{layer: (A, B)}``."""
    return {name: (layer.basis.A.detach().clone(), layer.basis.B.detach().clone())
            for name, layer in lora_layers(model).items() if layer.is_pq}


@torch.no_grad()
def set_pq_bases(model: nn.Module, bases: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Replace PQ-LoRA layers' frozen bases (e.g. by FedMosaic's weight alignment); every named layer
    must be a PQ layer with bases of the same shapes."""
    layers = lora_layers(model)
    for name, (a, b) in bases.items():
        layer = layers.get(name)
        if layer is None or not layer.is_pq:
            raise ValueError(f"set_pq_bases: {name!r} is not a PQ-LoRA layer of the model")
        if a.shape != layer.basis.A.shape or b.shape != layer.basis.B.shape:
            raise ValueError(f"set_pq_bases: {name!r} takes A {tuple(layer.basis.A.shape)} and B "
                             f"{tuple(layer.basis.B.shape)}, got {tuple(a.shape)} and {tuple(b.shape)}")
        layer.basis.A.copy_(a)
        layer.basis.B.copy_(b)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapted layers by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _check_which(which: str) -> None:
    if which not in (*ADAPTERS, "gate"):
        raise ValueError(f"adapter {which!r} is not one of {', '.join((*ADAPTERS, 'gate'))}")


def _adapter_tensors(model: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The live tensors of adapter ``which`` (or the gates), keyed as :func:`adapter_state` gives them."""
    _check_which(which)
    out: dict[str, nn.Parameter] = {}
    for name, layer in lora_layers(model).items():
        if which == "gate":
            out.update({f"{name}.{k}": v for k, v in layer.named_parameters(recurse=False)})
        elif which in layer.adapters:
            out.update({f"{name}.{k}": v for k, v in layer.adapters[which].named_parameters()})
    if not out:
        raise ValueError(f"the model has no {which!r} adapter tensors (add_lora with dual=True for 'global'/'gate')")
    return out


def adapter_state(model: nn.Module, which: str = "local") -> dict[str, Tensor]:
    """Copies of one adapter's tensors (``"local"``, ``"global"``) or of the gates (``"gate"``),
    keyed ``<layer>.lora_A``/``<layer>.lora_B`` (``<layer>.<gate parameter>``): what a client sends."""
    return {k: v.detach().clone() for k, v in _adapter_tensors(model, which).items()}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, Tensor], which: str = "local") -> None:
    """Write ``state`` (keys as :func:`adapter_state` gives them) into adapter ``which`` (or the
    gates). Every key must match a tensor of the same shape, and every tensor must be given."""
    own = _adapter_tensors(model, which)
    if own.keys() != state.keys():
        missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        raise ValueError(f"adapter state for {which!r} does not match the model: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"adapter tensor {key!r}: shape {tuple(value.shape)}, the model's is {tuple(own[key].shape)}")
        own[key].copy_(value)


def adapter_parameters(model: nn.Module, which: str = "local") -> list[nn.Parameter]:
    """The live parameters of adapter ``which`` (or the gates), in layer order (what an optimizer
    updates when a method trains that adapter alone)."""
    return list(_adapter_tensors(model, which).values())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters local training updates (after :func:`add_lora`: the local adapters and gates)."""
    return [p for p in model.parameters() if p.requires_grad]
