"""RELA, FedMosaic's relevance-guided aggregation: task profiles and the weights they give.

* :func:`task_profile_gradient`: a client's task profile on one batch — the gradient of the answer
  loss with respect to the last MLP's output projection of a **shared frozen proxy model** (the same
  pretrained small model on every client, adapters off), its first ``row_fraction`` of rows kept and
  Gaussian noise added (FedMosaic's sanitisation);
* :func:`rela_weights`: from the clients' profiles, S = the mean over profile columns of the
  clients' cosine-similarity matrices, and w_ij = softmax over j ≠ i of S_ij / τ (self excluded);
* :func:`mix_by_weights`: the personal global module G_i = Σ_j w_ij L_j over the clients that hold
  each tensor (weights renormalized over them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..learn.vlm import answer_logits

__all__ = ["mix_by_weights", "profile_layer", "rela_weights", "task_profile_gradient"]


def profile_layer(model: nn.Module) -> nn.Linear:
    """The proxy's last MLP output projection (``down_proj`` or ``fc_out``): where profiles are taken."""
    mlp = model.language.blocks[-1].mlp
    return getattr(mlp, "down_proj", None) or mlp.fc_out


def task_profile_gradient(proxy: nn.Module, batches: Sequence, row_fraction: float, noise_std: float,
                          generator: torch.Generator) -> np.ndarray:
    """The sanitized gradient of the answer loss on ``batches`` (one step's batches, weighted by size)
    with respect to :func:`profile_layer`'s weight: its first ``ceil(row_fraction × rows)`` rows plus
    N(0, noise_std²) noise. The proxy's weights are left untouched (no optimizer step)."""
    weight = profile_layer(proxy).weight
    total = sum(int(b.text.shape[0]) for b in batches)
    was_training = proxy.training
    proxy.eval()
    weight.requires_grad_(True)
    try:
        loss = sum(nn.functional.cross_entropy(*answer_logits(proxy, b)) * (b.text.shape[0] / total) for b in batches)
        (grad,) = torch.autograd.grad(loss, weight)
    finally:
        weight.requires_grad_(False)
        proxy.train(was_training)
    rows = max(1, int(np.ceil(row_fraction * grad.shape[0])))
    kept = grad[:rows]
    noise = torch.randn(kept.shape, generator=generator) * noise_std
    return (kept + noise).detach().numpy().astype(np.float32)


def rela_weights(profiles: np.ndarray, temperature: float) -> np.ndarray:
    """``(n, n)`` weights from ``profiles`` ``(n, rows, cols)``: S_ij = mean over columns k of
    cos(profiles[i, :, k], profiles[j, :, k]); row i is softmax over j ≠ i of S_ij / τ (w_ii = 0).
    A single client gets no weights (an all-zero row)."""
    n = profiles.shape[0]
    p = profiles.astype(np.float64)
    unit = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    similarity = np.einsum("irk,jrk->ij", unit, unit) / p.shape[2]
    logits = similarity / temperature
    np.fill_diagonal(logits, -np.inf)
    weights = np.zeros((n, n))
    if n > 1:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights = shifted / shifted.sum(axis=1, keepdims=True)
    return weights


def mix_by_weights(weights: Mapping[int, float], modules: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Σ_j w_j L_j per tensor name over the clients ``j`` that hold it, the weights renormalized over
    those (a tensor no weighted client holds is left out)."""
    out: dict[str, np.ndarray] = {}
    names = sorted({k for m in modules.values() for k in m})
    for name in names:
        holders = [(w, modules[j][name]) for j, w in weights.items() if name in modules[j] and w > 0]
        total = sum(w for w, _ in holders)
        if total > 0:
            out[name] = (sum(w * a.astype(np.float64) for w, a in holders) / total).astype(np.float32)
    return out
