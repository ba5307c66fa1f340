"""The training loops every method shares: supervised fit, distillation, prediction, evaluation.

One implementation each. Algorithms call them with options instead of writing their own loops.
Inputs are NumPy arrays (float32 inputs, int64 labels, float32 probability targets); batches
are cut from tensors that share memory with them, so no DataLoader overhead on small models.
All shuffling and noise draw from the ``generator`` the caller passes (a per-client stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("adam", "sgd")
AUGMENTATIONS = ("none", "crop_flip", "flip")


@dataclass(frozen=True)
class OptimOptions:
    """How one training call optimizes: shared by fit and distill."""

    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    max_grad_norm: float | None = None

    def build(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        raise ValueError(f"optimizer={self.optimizer!r} is not supported (allowed: {', '.join(OPTIMIZERS)})")


def as_tensor(array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    """A tensor sharing memory with ``array`` when it may (read-only arrays are copied)."""
    array = np.asarray(array, dtype=dtype)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _batches(n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool, drop_last: bool):
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < batch_size and drop_last and start > 0:
            return
        if len(idx) < 2 and n > 1:
            return  # a lone sample breaks BatchNorm in train mode and adds nothing
        yield idx


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip (``flip``), plus a random crop after 4-pixel zero padding (``crop_flip``)."""
    if mode in (None, "none"):
        return x
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment={mode!r} is not supported (allowed: {', '.join(AUGMENTATIONS)})")
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


def _run_steps(
    model: nn.Module,
    n: int,
    loss_of_batch,
    *,
    epochs: float,
    batch_size: int,
    optim: OptimOptions,
    generator: torch.Generator | None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> dict[str, float]:
    """The one optimization loop: ``epochs`` passes (fractions allowed) of mini-batches of indices,
    each turned into a loss by ``loss_of_batch(idx)``; a fresh optimizer per call."""
    if n == 0 or epochs <= 0:
        return {"loss": float("nan"), "steps": 0}
    model.train()
    optimizer = optim.build(model.parameters())
    losses: list[float] = []
    max_steps = max(1, int(round(max(1, -(-n // batch_size)) * epochs)))
    while len(losses) < max_steps:
        for idx in _batches(n, batch_size, generator, shuffle=shuffle, drop_last=drop_last):
            loss = loss_of_batch(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if len(losses) >= max_steps:
                break
    return {"loss": float(np.mean(losses)), "steps": len(losses)}


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: float = 1.0,
    batch_size: int = 32,
    optim: OptimOptions = OptimOptions(),
    generator: torch.Generator | None = None,
    augment: str = "none",
) -> dict[str, float]:
    """Cross-entropy training on (x, y). Fractional ``epochs`` train that share of one pass."""
    xt, yt = as_tensor(x, np.float32), as_tensor(y, np.int64)

    def loss_of_batch(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(augment_batch(xt[idx], augment, generator)), yt[idx])

    return _run_steps(model, len(xt), loss_of_batch, epochs=epochs, batch_size=batch_size, optim=optim,
                      generator=generator)


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


DISTILL_LOSSES = ("kl", "l1_logits")


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
    xt = as_tensor(x, np.float32)
    target_array = np.asarray(targets, dtype=np.float32)
    tt = as_tensor(sharpen(target_array, temperature) if loss == "kl" else target_array, np.float32)
    if len(xt) != len(tt):
        raise ValueError(f"distill: {len(xt)} inputs but {len(tt)} target rows")
    wt = None if sample_weights is None else as_tensor(sample_weights, np.float32)

    def loss_of_batch(idx: torch.Tensor) -> torch.Tensor:
        xb, tb = xt[idx], tt[idx]
        logits = model(xb)
        if loss == "kl":
            per_sample = F.kl_div(F.log_softmax(logits, dim=-1), tb, reduction="none").sum(-1)
        else:
            per_sample = (logits - tb).abs().mean(-1)
        total = (per_sample * wt[idx]).mean() if wt is not None else per_sample.mean()
        if consistency_weight > 0:
            noise = torch.randn(xb.shape, generator=generator) * noise_std
            with torch.no_grad():
                p_noisy = F.softmax(model(xb + noise), dim=-1)
            total = total + consistency_weight * F.mse_loss(F.softmax(logits, dim=-1), p_noisy)
        return total

    return _run_steps(model, len(xt), loss_of_batch, epochs=epochs, batch_size=batch_size, optim=optim,
                      generator=generator, shuffle=shuffle, drop_last=drop_last)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Raw class scores (float32) of ``model`` in eval mode, in input order."""
    model.eval()
    xt = as_tensor(x, np.float32)
    out = [model(xt[i : i + batch_size]).float() for i in range(0, len(xt), batch_size)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax outputs (float32, rows sum to 1) of ``model`` in eval mode, in input order."""
    model.eval()
    xt = as_tensor(x, np.float32)
    if len(xt) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    out = [F.softmax(model(xt[i : i + batch_size]).float(), dim=-1) for i in range(0, len(xt), batch_size)]
    probs = torch.cat(out).numpy().astype(np.float32)
    return probs / probs.sum(axis=-1, keepdims=True)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on (x, y); ``n`` is the sample count."""
    if len(x) == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    model.eval()
    xt = as_tensor(x, np.float32)
    yt = as_tensor(y, np.int64)
    correct, loss_sum = 0, 0.0
    for i in range(0, len(xt), batch_size):
        logits = model(xt[i : i + batch_size])
        loss_sum += F.cross_entropy(logits, yt[i : i + batch_size], reduction="sum").item()
        correct += int((logits.argmax(-1) == yt[i : i + batch_size]).sum())
    return {"accuracy": correct / len(xt), "loss": loss_sum / len(xt), "n": int(len(xt))}


def state_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Model state as named arrays for a message: float tensors under ``w.``, integer buffers
    (BatchNorm's batch counter) under ``b.``."""
    out = {}
    for key, value in model.state_dict().items():
        array = value.detach().cpu().numpy().copy()
        out[("w." if np.issubdtype(array.dtype, np.floating) else "b.") + key] = array
    return out


def arrays_to_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load a state sent by :func:`state_to_arrays` (names must match the model exactly)."""
    state = {k[2:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k[:2] in ("w.", "b.")}
    model.load_state_dict(state, strict=True)
