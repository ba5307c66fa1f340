"""How one optimization runs: the optimizer's options, and which parameters it updates."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..configuration import Validated, option

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

    def build(self, params: Iterable[torch.Tensor] | nn.Module) -> torch.optim.Optimizer:
        """A fresh optimizer over ``params`` (any iterable of parameters, or a module's parameters)."""
        if isinstance(params, nn.Module):
            params = params.parameters()
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(self.beta1, 0.999), weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        raise ValueError(f"optimizer={self.optimizer!r} is not supported (allowed: {', '.join(OPTIMIZERS)})")


def select_parameters(module: nn.Module, where: Callable[[str], bool] | None = None) -> list[nn.Parameter]:
    """The trainable parameters of ``module`` (``requires_grad``) whose qualified name satisfies
    ``where`` (all of them when ``where`` is None), in ``named_parameters`` order.

    ``select_parameters(model, where=lambda name: "lora" in name)`` picks adapters only.
    """
    return [p for name, p in module.named_parameters() if p.requires_grad and (where is None or where(name))]
