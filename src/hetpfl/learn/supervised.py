"""Supervised fit and distillation on soft targets: thin uses of the one loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .batches import IndexBatches
from .losses import DISTILL_LOSSES, PER_SAMPLE_DISTILL, cross_entropy, noise_consistency, sharpen, weighted_mean
from .loop import Objective, optimize
from .options import OptimOptions
from .tensors import as_input_tensor, as_tensor, augment_batch, check_augment


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: float = 1.0, steps: int | None = None,
        batch_size: int = 32,
        optim: OptimOptions = OptimOptions(), generator: torch.Generator | None = None,
        augment: str = "none", params: Iterable[torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
        penalty: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """Supervised training on (x, y). Fractional ``epochs`` train that share of one pass; ``steps``
    (when given) fixes the number of optimizer steps instead, passes repeating as needed.

    ``params``: the parameters to update (default: all of ``model``'s, e.g. a head only);
    ``loss_fn(logits, labels)``: the data term (default cross-entropy); ``penalty()``: a term added
    to every step's loss (e.g. a proximal pull towards the global weights)."""
    check_augment(augment)
    xt, yt = as_input_tensor(x), as_tensor(y, np.int64)
    if len(xt) != len(yt):
        raise ValueError(f"fit: {len(xt)} inputs but {len(yt)} labels")

    def loss(idx: torch.Tensor) -> torch.Tensor:
        value = loss_fn(model(augment_batch(xt[idx], augment, generator)), yt[idx])
        return value if penalty is None else value + penalty()

    batches = IndexBatches(len(xt), batch_size, epochs=epochs, steps=steps, generator=generator)
    return optimize(Objective(loss, model if params is None else params, optim, train=(model,)), batches)


def distill(
    model: nn.Module,
    x: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: float = 1.0,
    batch_size: int = 32,
    optim: OptimOptions = OptimOptions(),
    generator: torch.Generator | None = None,
    loss: str = "kl",
    temperature: float = 1.0,
    consistency_weight: float = 0.0,
    noise_std: float = 0.05,
    sample_weights: np.ndarray | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> dict[str, float]:
    """Distill ``targets`` into ``model`` on inputs ``x``.

    ``loss="kl"``: targets are probability rows; per sample KL(target ‖ softmax(model(x))), with
    ``temperature`` applied to the targets only (the student's logits are not divided).
    ``loss="l1_logits"``: targets are logits (class scores); per sample mean |model(x) − target|
    (FedMD's digest step).
    Per-sample losses are weighted by ``sample_weights`` (default 1) and averaged over the batch.
    ``consistency_weight`` λ > 0 adds λ · MSE(softmax(model(x)), softmax(model(x + ε))),
    ε ~ N(0, noise_std²), the noisy branch without gradient (COSMOS's noise-consistency term).
    """
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"distill loss={loss!r} is not supported (allowed: {', '.join(DISTILL_LOSSES)})")
    xt = as_input_tensor(x)
    target_array = np.asarray(targets, dtype=np.float32)
    tt = as_tensor(sharpen(target_array, temperature) if loss == "kl" else target_array, np.float32)
    if len(xt) != len(tt):
        raise ValueError(f"distill: {len(xt)} inputs but {len(tt)} target rows")
    wt = None if sample_weights is None else as_tensor(sample_weights, np.float32)
    per_sample = PER_SAMPLE_DISTILL[loss]

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = xt[idx]
        logits = model(xb)
        total = weighted_mean(per_sample(logits, tt[idx]), None if wt is None else wt[idx])
        if consistency_weight > 0:
            consistency = noise_consistency(model, xb, logits, noise_std=noise_std, generator=generator)
            total = total + consistency_weight * consistency
        return total

    batches = IndexBatches(len(xt), batch_size, epochs=epochs, generator=generator, shuffle=shuffle,
                           drop_last=drop_last)
    return optimize(Objective(batch_loss, model, optim, train=(model,)), batches)
