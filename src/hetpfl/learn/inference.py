"""Prediction and evaluation: the model in eval mode, no gradients, fixed-size chunks in input order."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tensors import as_input_tensor, as_tensor


def _logits(model: nn.Module, x: np.ndarray, batch_size: int) -> torch.Tensor | None:
    model.eval()
    xt = as_input_tensor(x)
    out = [model(xt[i : i + batch_size]).float() for i in range(0, len(xt), batch_size)]
    return torch.cat(out) if out else None


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Raw class scores (float32) of ``model`` in eval mode, in input order."""
    logits = _logits(model, x, batch_size)
    return logits.numpy().astype(np.float32) if logits is not None else np.zeros((0, 0), np.float32)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax outputs (float32, rows sum to 1) of ``model`` in eval mode, in input order."""
    logits = _logits(model, x, batch_size)
    if logits is None:
        return np.zeros((0, 0), dtype=np.float32)
    probs = F.softmax(logits, dim=-1).numpy().astype(np.float32)
    return probs / probs.sum(axis=-1, keepdims=True)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512, *,
             groups: np.ndarray | None = None, num_groups: int = 0) -> dict[str, Any]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on (x, y); ``n`` is the sample count.

    With ``groups`` (an int id in ``0..num_groups-1`` per sample, e.g. its task), also
    ``group_correct`` and ``group_count``: int64 arrays of length ``num_groups``."""
    if len(x) == 0:
        empty = {} if groups is None else {"group_correct": np.zeros(num_groups, np.int64),
                                           "group_count": np.zeros(num_groups, np.int64)}
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0, **empty}
    model.eval()
    xt = as_input_tensor(x)
    yt = as_tensor(y, np.int64)
    hits, loss_sum = [], 0.0
    for i in range(0, len(xt), batch_size):
        logits = model(xt[i : i + batch_size])
        loss_sum += F.cross_entropy(logits, yt[i : i + batch_size], reduction="sum").item()
        hits.append(logits.argmax(-1) == yt[i : i + batch_size])
    hit = torch.cat(hits).numpy()
    out: dict[str, Any] = {"accuracy": int(hit.sum()) / len(xt), "loss": loss_sum / len(xt), "n": int(len(xt))}
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64)
        out["group_correct"] = np.bincount(groups, weights=hit, minlength=num_groups).astype(np.int64)
        out["group_count"] = np.bincount(groups, minlength=num_groups).astype(np.int64)
    return out
