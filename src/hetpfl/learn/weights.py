"""Model weights as named arrays, the form they travel in inside messages."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def state_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Model state as named arrays for a message: float tensors under ``w.``, integer buffers
    (BatchNorm's batch counter) under ``b.``."""
    out = {}
    for key, value in model.state_dict().items():
        array = value.detach().cpu().numpy().copy()
        out[("w." if np.issubdtype(array.dtype, np.floating) else "b.") + key] = array
    return out


def arrays_to_state(model: nn.Module, arrays: dict[str, np.ndarray], strict: bool = True) -> None:
    """Load a state sent by :func:`state_to_arrays` (names must match the model exactly; with
    ``strict=False``, a subset of its tensors, e.g. the shared part of a partly personal model)."""
    state = {k[2:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k[:2] in ("w.", "b.")}
    missing, unexpected = model.load_state_dict(state, strict=strict)
    if unexpected:
        raise ValueError(f"arrays for tensors the model does not have: {unexpected[:5]}")


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average ← decay · average + (1 − decay) · model``, parameter by parameter (buffers such
    as BatchNorm statistics are copied): an exponential moving average of a model's weights (Mosaic's
    EMA teacher, DFRD's EMA generator)."""
    for avg, new in zip(average.parameters(), model.parameters(), strict=True):
        avg.mul_(decay).add_(new.detach(), alpha=1.0 - decay)
    for avg, new in zip(average.buffers(), model.buffers(), strict=True):
        avg.copy_(new)
