"""The fast kernels' optimizers (hetpfl.learn.fused) against torch's fused ones: the same updates, bit
for bit, and no import of torch's compiler stack."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from hetpfl.learn import OptimOptions
from hetpfl.learn.fused import FusedAdam, FusedSGD


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 3))


def _train(model: nn.Module, make_optimizer, steps: int = 6) -> list[torch.Tensor]:
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    generator = torch.Generator().manual_seed(7)
    for step in range(steps):
        x = torch.randn(8, 2, 8, 8, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        if step % 3 == 1:  # a parameter without a gradient on some steps: skipped, its state untouched
            params[-1].grad = None
        optimizer.step()
    return [p.detach().clone() for p in params]


def _groups(params: list[torch.Tensor], lr: float) -> list[dict]:
    return [{"params": params[:2], "lr": lr * 10}, {"params": params[2:], "lr": lr}]  # two rates, as lr_scales makes


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_adam_is_torchs_fused_adam_bit_for_bit(weight_decay: float) -> None:
    ours = _train(_model(0), lambda ps: FusedAdam(_groups(ps, 1e-3), betas=(0.5, 0.999), weight_decay=weight_decay))
    torchs = _train(_model(0), lambda ps: torch.optim.Adam(_groups(ps, 1e-3), betas=(0.5, 0.999),
                                                           weight_decay=weight_decay, fused=True))
    start = [p.detach() for p in _model(0).parameters()]
    assert all(not torch.equal(a, s) for a, s in zip(ours, start))  # it trained
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01)])
def test_fused_sgd_is_torchs_fused_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    ours = _train(_model(1), lambda ps: FusedSGD(_groups(ps, 0.05), momentum=momentum, weight_decay=weight_decay))
    torchs = _train(_model(1), lambda ps: torch.optim.SGD(_groups(ps, 0.05), momentum=momentum,
                                                          weight_decay=weight_decay, fused=True))
    start = [p.detach() for p in _model(1).parameters()]
    assert all(not torch.equal(a, s) for a, s in zip(ours, start))
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))


def test_the_kernels_choose_the_optimizer() -> None:
    from hetpfl.kernels import current_kernels, set_kernels
    params = list(_model(0).parameters())
    before = current_kernels()
    try:
        set_kernels("fast")
        assert isinstance(OptimOptions(optimizer="adam").build(params), FusedAdam)
        assert isinstance(OptimOptions(optimizer="sgd").build(params), FusedSGD)
        assert isinstance(OptimOptions().build([torch.zeros(3, dtype=torch.float64, requires_grad=True)]),
                          torch.optim.Adam)  # not float32: the fused CPU kernels take float32 only
        set_kernels("reference")
        assert isinstance(OptimOptions().build(params), torch.optim.Adam)
    finally:
        set_kernels(before)


def test_training_on_the_fast_kernels_does_not_import_torchs_compiler_stack() -> None:
    # a fresh interpreter: this test process may have imported torch._dynamo already
    script = ("import sys, torch\n"
              "from hetpfl.learn import OptimOptions\n"
              "model = torch.nn.Linear(4, 2)\n"
              "optimizer = OptimOptions(max_grad_norm=1.0).build(model)\n"
              "model(torch.ones(3, 4)).sum().backward()\n"
              "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)\n"
              "optimizer.step()\n"
              "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
