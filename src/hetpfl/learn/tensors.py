"""NumPy arrays in, tensors out: input conversion that keeps the input's kind, and augmentation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop_flip", "flip")


def as_tensor(array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    """A tensor sharing memory with ``array`` when it may (read-only arrays are copied)."""
    array = np.asarray(array, dtype=dtype)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def input_dtype(array: np.ndarray) -> type[np.generic]:
    """The dtype model inputs are given in: int64 for integer inputs (token ids), float32 otherwise."""
    return np.int64 if np.issubdtype(np.asarray(array).dtype, np.integer) else np.float32


def as_input_tensor(x: np.ndarray) -> torch.Tensor:
    """Model inputs as a tensor that keeps their kind: integers (token ids) become int64,
    everything else float32 (as :func:`as_tensor` does)."""
    return as_tensor(x, input_dtype(x))


def check_augment(mode: str | None) -> None:
    if mode is not None and mode not in AUGMENTATIONS:
        raise ValueError(f"augment={mode!r} is not supported (allowed: {', '.join(AUGMENTATIONS)})")


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip (``flip``), plus a random crop after 4-pixel zero padding (``crop_flip``)."""
    if mode in (None, "none"):
        return x
    check_augment(mode)
    if x.dim() != 4:
        return x  # only images are flipped or cropped
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if mode == "crop_flip":
        pad, (b, c, h, w) = 4, x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return x
