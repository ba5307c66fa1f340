"""Adam and SGD on torch's fused CPU kernels, called directly (the ``fast`` kernels' optimizers).

``torch.optim.Adam(fused=True)`` and ``SGD(fused=True)`` update every parameter in one call of
``torch._fused_adam_`` / ``torch._fused_sgd_``. But building any ``torch.optim`` optimizer imports
torch's compiler stack (``torch._dynamo``: ~0.9 s, the largest import of a run after torch itself,
docs/performance.md) for guards that matter only under ``torch.compile``, which hetpfl never uses.
These two classes keep the same state, created the same way, and make the same kernel calls with the
same arguments, so their updates are torch's bit for bit (``tests/test_fused.py``) without the import.

They are what :meth:`hetpfl.learn.OptimOptions.build` returns under ``runtime.kernels=fast``; the
``reference`` kernels keep torch's own (unfused) optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ParamGroup = dict[str, Any]  # {"params": [tensor, ...], "lr": float}


class _Fused:
    """What both optimizers share: parameter groups, per-parameter state, ``zero_grad``."""

    def __init__(self, param_groups: Sequence[ParamGroup]) -> None:
        self.param_groups = [{"params": list(g["params"]), "lr": float(g["lr"])} for g in param_groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            # as torch: a parameter without a gradient this step is left alone, state and all
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, group["lr"])

    def _update(self, params: list[torch.Tensor], lr: float) -> None:
        raise NotImplementedError


class FusedAdam(_Fused):
    """``torch.optim.Adam(param_groups, betas=betas, weight_decay=weight_decay, fused=True)``."""

    def __init__(self, param_groups: Sequence[ParamGroup], *, betas: tuple[float, float],
                 weight_decay: float, eps: float = 1e-8) -> None:
        super().__init__(param_groups)
        self.betas, self.weight_decay, self.eps = betas, weight_decay, eps

    def _update(self, params: list[torch.Tensor], lr: float) -> None:
        for p in params:
            if p not in self.state:  # torch's fused state: a float32 step and two zero moments
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=lr,
                           beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                           eps=self.eps, maximize=False, grad_scale=None, found_inf=None)


class FusedSGD(_Fused):
    """``torch.optim.SGD(param_groups, momentum=momentum, weight_decay=weight_decay, fused=True)``."""

    def __init__(self, param_groups: Sequence[ParamGroup], *, momentum: float, weight_decay: float) -> None:
        super().__init__(param_groups)
        self.momentum, self.weight_decay = momentum, weight_decay

    def _update(self, params: list[torch.Tensor], lr: float) -> None:
        buffers: list[torch.Tensor | None] = []
        first_step = False
        if self.momentum != 0:
            buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            first_step = all(b is None for b in buffers)  # the kernel then starts each buffer at the gradient
            if first_step:  # later steps update the stored buffers in place
                buffers = [torch.empty_like(p.grad) for p in params]
                for p, b in zip(params, buffers):
                    self.state[p] = {"momentum_buffer": b}
        torch._fused_sgd_(params, [p.grad for p in params], buffers, weight_decay=self.weight_decay,
                          momentum=self.momentum, lr=lr, dampening=0.0, nesterov=False,
                          maximize=False, is_first_step=first_step, grad_scale=None, found_inf=None)


__all__ = ["FusedAdam", "FusedSGD"]
