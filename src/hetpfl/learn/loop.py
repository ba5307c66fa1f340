"""The one optimization loop: objectives (parameters, optimizer options, loss, module modes) stepped
over the batches of a batch source. ``fit``, ``distill`` and generator or adapter training use it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .options import OptimOptions


@dataclass(frozen=True, eq=False)
class Objective:
    """One optimizer's share of a step: ``loss(batch)`` minimized over ``params`` only.

    ``params``: the parameters it updates, any subset (a module means all its parameters), in a
    fixed order (gradient clipping sums norms in that order). Each call of :func:`optimize` builds a
    fresh optimizer from ``optim`` over them and clips their gradient norm to ``optim.max_grad_norm``.
    Before each of its turns, the modules in ``train`` are put in train mode, then those in ``eval``
    in eval mode (so ``eval`` may name submodules of a trained module). ``repeats``: optimizer steps
    on each batch. ``name``: the key of its mean loss in the result of :func:`optimize`.
    """

    loss: Callable[[Any], torch.Tensor]
    params: Iterable[torch.Tensor] | nn.Module
    optim: OptimOptions = OptimOptions()
    train: Sequence[nn.Module] = ()
    eval: Sequence[nn.Module] = ()
    repeats: int = 1
    name: str = "loss"
    after_step: Callable[[], None] | None = None  # called after each optimizer step (e.g. an EMA update)
    lr_scales: Mapping[int, float] | None = None  # {id(parameter): factor}: those learn at factor × lr

    def __post_init__(self) -> None:
        params = self.params.parameters() if isinstance(self.params, nn.Module) else self.params
        object.__setattr__(self, "params", tuple(params))
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "eval", tuple(self.eval))
        if self.repeats < 1:
            raise ValueError(f"objective {self.name!r}: repeats={self.repeats} must be >= 1")
        if self.name == "steps":
            raise ValueError("an objective may not be named 'steps' (the key of the step count)")

    def set_modes(self) -> None:
        for module in self.train:
            module.train()
        for module in self.eval:
            module.eval()


def _mean(losses: list[torch.Tensor]) -> float:
    """``float(np.mean([loss.item() ...]))`` with one host transfer for all steps."""
    if not losses:
        return float("nan")
    return float(np.mean(torch.stack([loss.to(torch.float64) for loss in losses]).cpu().numpy()))


def optimize(
    objectives: Objective | Sequence[Objective], batches: Iterable[Any], *, steps: int | None = None
) -> dict[str, float]:
    """Step every objective, in order, on each batch of ``batches``, for ``steps`` batches (default:
    ``len(batches)`` when it has one, else until the source ends; never more than it gives).

    Per objective and step: its modes are set, then ``repeats`` times: loss, gradients of its own
    trainable parameters only, clipping, optimizer step. Modules stay in the modes the last
    objective set. Returns each objective's mean loss under its name, and ``steps``, the batches used.
    """
    objectives = (objectives,) if isinstance(objectives, Objective) else tuple(objectives)
    names = [o.name for o in objectives]
    if not objectives or len(set(names)) != len(names):
        raise ValueError(f"optimize needs at least one objective and distinct names, got {names}")
    if steps is None and hasattr(batches, "__len__"):
        steps = len(batches)
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    done = 0
    if steps != 0:
        optimizers = [o.optim.build(o.params, o.lr_scales) for o in objectives]
        leaves = [[p for p in o.params if p.requires_grad] for o in objectives]
        for o, trainable in zip(objectives, leaves):
            if not trainable:
                raise ValueError(f"objective {o.name!r} has no trainable parameters")
        source = iter(batches)
        while steps is None or done < steps:  # pull no batch past the last step: sources draw lazily
            try:
                batch = next(source)
            except StopIteration:
                break
            for o, optimizer, trainable in zip(objectives, optimizers, leaves):
                o.set_modes()
                for _ in range(o.repeats):
                    loss = o.loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward(inputs=trainable)
                    if o.optim.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(o.params, o.optim.max_grad_norm)
                    optimizer.step()
                    if o.after_step is not None:
                        o.after_step()
                    recorded[o.name].append(loss.detach())
            done += 1
    return {**{name: _mean(losses) for name, losses in recorded.items()}, "steps": done}
