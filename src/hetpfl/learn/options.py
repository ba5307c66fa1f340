"""How one optimization runs: the optimizer's options, and which parameters it updates."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..configuration import Validated, option
from ..kernels import fused_optimizers
from .fused import FusedAdam, FusedSGD

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class OptimOptions(Validated):
    """How one training call optimizes: shared by fit, distill and every objective of ``optimize``.

    The defaults and rules of every optimizer option live here once (the client routine's config
    section, ``ClientTraining``, inherits them)."""

    lr: float = option(1e-3, gt=0)
    optimizer: str = option("adam", choices=OPTIMIZERS)
    weight_decay: float = option(0.0, ge=0)
    momentum: float = option(0.9, ge=0, lt=1)
    max_grad_norm: float | None = option(None, gt=0)
    beta1: float = option(0.9, ge=0, lt=1)  # Adam's first-moment decay (DCGAN training uses 0.5)

    def build(self, params: Iterable[torch.Tensor] | nn.Module,
              lr_scales: Mapping[int, float] | None = None) -> torch.optim.Optimizer | FusedAdam | FusedSGD:
        """A fresh optimizer over ``params`` (any iterable of parameters, or a module's parameters).
        ``lr_scales``: ``{id(parameter): factor}`` for parameters that learn at ``factor × lr`` (e.g.
        FedMosaic's P and Q); the others at ``lr``."""
        if isinstance(params, nn.Module):
            params = params.parameters()
        groups: dict[float, list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault(float((lr_scales or {}).get(id(p), 1.0)), []).append(p)
        param_groups = [{"params": ps, "lr": self.lr * scale} for scale, ps in groups.items()]
        fused = fused_optimizers([p for ps in groups.values() for p in ps])  # unless runtime.kernels=reference
        if self.optimizer == "adam":
            betas = (self.beta1, 0.999)
            if fused:
                return FusedAdam(param_groups, betas=betas, weight_decay=self.weight_decay)
            return torch.optim.Adam(param_groups, lr=self.lr, betas=betas, weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            if fused:
                return FusedSGD(param_groups, momentum=self.momentum, weight_decay=self.weight_decay)
            return torch.optim.SGD(param_groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        raise ValueError(f"optimizer={self.optimizer!r} is not supported (allowed: {', '.join(OPTIMIZERS)})")


def select_parameters(module: nn.Module, where: Callable[[str], bool] | None = None) -> list[nn.Parameter]:
    """The trainable parameters of ``module`` (``requires_grad``) whose qualified name satisfies
    ``where`` (all of them when ``where`` is None), in ``named_parameters`` order.

    ``select_parameters(model, where=lambda name: "lora" in name)`` picks adapters only.
    """
    return [p for name, p in module.named_parameters() if p.requires_grad and (where is None or where(name))]
