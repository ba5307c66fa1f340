"""Every loss term, in one place.

Per-sample terms return one value per row (shape ``(B,)``) so callers can weight samples; the
others return a scalar. Future generator objectives (adversarial KL between teacher and student,
BatchNorm-statistics matching, entropy and class-diversity terms) belong here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against integer ``labels``."""
    return F.cross_entropy(logits, labels)


def restricted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, present: torch.Tensor,
                             alpha: float) -> torch.Tensor:
    """FedRS's restricted softmax: cross-entropy after scaling the logits of the classes the client
    lacks (``present`` is a bool mask over classes) by ``alpha`` in [0, 1]."""
    scale = torch.where(present, torch.ones_like(logits[0]), torch.full_like(logits[0], alpha))
    return F.cross_entropy(logits * scale, labels)


def proximal(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) · Σ ||p − a||² over paired parameters and fixed anchors (FedProx's proximal term,
    Ditto's pull towards the global model)."""
    total = sum(((p - a.detach()) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * mu * total


def kl_to_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample KL(target ‖ softmax(logits)); ``targets`` are probability rows."""
    return F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="none").sum(-1)


def l1_to_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample mean |logits − target|; ``targets`` are logits (FedMD's digest step)."""
    return (logits - targets).abs().mean(-1)


PER_SAMPLE_DISTILL: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl_to_targets,
    "l1_logits": l1_to_logits,
}
DISTILL_LOSSES = tuple(PER_SAMPLE_DISTILL)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of per-sample losses, each weighted by ``weights`` (default 1)."""
    return (per_sample * weights).mean() if weights is not None else per_sample.mean()


def noise_consistency(
    model: nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    noise_std: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """MSE(softmax(logits), softmax(model(x + ε))), ε ~ N(0, noise_std²) drawn from ``generator``,
    the noisy branch without gradient (COSMOS's noise-consistency term). ``logits`` is ``model(x)``."""
    if not torch.is_floating_point(x):
        raise ValueError(f"the noise-consistency term needs floating inputs, got {x.dtype}")
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device) * noise_std
    with torch.no_grad():
        p_noisy = F.softmax(model(x + noise), dim=-1)
    return F.mse_loss(F.softmax(logits, dim=-1), p_noisy)


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Targets at temperature T: p^(1/T) / sum p^(1/T). T=1 leaves them unchanged; T→0 is one-hot."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, None)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    out = np.exp(logp)
    return (out / out.sum(axis=-1, keepdims=True)).astype(np.float32)
