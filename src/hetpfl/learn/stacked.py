"""Many same-architecture models trained as one (the ``batched`` executor's local training,
distillation and predictions).

Small models on small batches are overhead-bound on a CPU: a step of one client's ``mlp`` or
``cnn_small`` spends most of its time outside the arithmetic. :func:`fit_many` trains a group of
clients' models as one stacked model — linear layers as batched matrix products over the client
dimension, convolutions as one grouped convolution (``groups`` = clients) — so each step is a few
large kernels instead of many small ones. The same loop distills (a job's ``loss``: one of
:func:`hetpfl.learn.distill`'s per-sample losses on target rows), and :func:`predict_many` gives
every model's class scores on shared inputs in one pass.

What each client gets is what :func:`hetpfl.learn.fit` gives it, up to the order of float sums:
its own batches and augmentation from its own random stream (drawn in the same order), its own
batch-mean loss (the group's loss is the sum of the clients', so each client's gradient is its
own), its own gradient-norm clip, its own optimizer state and step count (Adam's bias correction
included), and no update once its own steps are done (clients with less data are masked). Batch
norm layers normalize each client's channels by that client's own rows (padding rows of a short
batch and masked clients left out of the statistics) and keep each client's running statistics.
Only stacks of the layers in :data:`STACKABLE` are batched (containers whose ``forward`` is a
sequence of them, such as MobileNet's depthwise-separable block, unrolled; see
:func:`sequential_layers`), and only on small inputs, where it pays (:data:`MAX_INPUT_AREA`);
:func:`stack_signature` returns None for any other model, and the caller trains it one client at a
time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import AddChannel, HetModel
from .batches import IndexBatches
from .loop import _mean
from .losses import PER_SAMPLE_DISTILL
from .options import OptimOptions
from .tensors import as_input_tensor, as_tensor, augment_batch, check_augment

_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Identity)
_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
STACKABLE = (nn.Flatten, nn.Linear, AddChannel, *_CONVS, *_NORMS, *_PER_CHANNEL)
# Stacking pays where a step is overhead-bound, i.e. on small inputs. Measured (docs/performance.md):
# 1.3-1.5x on 8x8 digits for mlp and cnn_small; mlp on 28x28 MNIST 0.8x at 2 steps a client, even at
# 8; a grouped convolution on 28x28 maps 1.5-2.6x slower than the clients' own (its backward pass).
# Models stack when each input channel holds at most this many values (16x16; vectors: length).
MAX_INPUT_AREA = 256


def sequential_layers(module: nn.Module) -> list[nn.Module]:
    """``module`` as the flat list of layers its forward applies in turn: an ``nn.Sequential`` is
    unrolled, and so is any module that says its forward is one (an ``as_sequential()`` method
    returning that ``nn.Sequential``); any other module is one layer."""
    if isinstance(module, nn.Sequential):
        return [layer for child in module for layer in sequential_layers(child)]
    as_sequential = getattr(module, "as_sequential", None)
    return sequential_layers(as_sequential()) if callable(as_sequential) else [module]


def _layers(model: nn.Module) -> list[nn.Module] | None:
    if not isinstance(model, HetModel) or not isinstance(model.body, nn.Sequential):
        return None
    if any(not p.requires_grad for p in model.parameters()):
        return None  # frozen parts: not a plain stack of weights
    layers = [*sequential_layers(model.body), model.head]
    buffers = sum(1 for _ in model.buffers())
    if buffers != sum(1 for layer in layers if isinstance(layer, _NORMS) for _ in layer.buffers()):
        return None  # state the stacked model would not carry
    return layers


def stack_signature(model: nn.Module) -> tuple | None:
    """A hashable description of ``model``'s layers when it can be stacked (models with equal
    signatures stack together), else None."""
    layers = _layers(model)
    if layers is None:
        return None
    shape = model.input_shape
    if math.prod(shape[1:] if len(shape) > 1 else shape) > MAX_INPUT_AREA:
        return None
    signature: list[tuple] = [("input", tuple(shape))]  # the stacked batch holds one input shape
    grouped = False  # whether activations are in the channel-stacked layout here (after a convolution)
    for layer in layers:
        if not isinstance(layer, STACKABLE):
            return None
        if isinstance(layer, _CONVS):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                return None
            entry = (type(layer).__name__, tuple(layer.weight.shape), layer.bias is not None, layer.stride,
                     layer.padding, layer.dilation, layer.groups)
            grouped = True
        elif isinstance(layer, _NORMS):
            # per-client statistics need the channel-stacked layout; a cumulative average
            # (momentum None) or batch statistics at evaluation are not carried
            if not grouped or not layer.track_running_stats or layer.momentum is None:
                return None
            entry = (type(layer).__name__, layer.num_features, layer.eps, layer.momentum, layer.affine)
        elif isinstance(layer, nn.Linear):
            entry = ("Linear", tuple(layer.weight.shape), layer.bias is not None)
            grouped = False
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return None
            entry = ("Flatten",)
            grouped = False
        else:
            entry = (type(layer).__name__, repr(layer))
            grouped = grouped and not isinstance(layer, AddChannel)
        signature.append(entry)
    return tuple(signature)


class StackedModel(nn.Module):
    """N models of one signature as one: every weight stacked on a leading client dimension.

    ``forward`` maps ``(N, B, *input_shape)`` to ``(N, B, num_classes)``. Between convolutions the
    activations are laid out as ``(B, N·C, *spatial)``, so one grouped convolution applies every
    client's kernels to its own channels and the per-channel layers (ReLU, pooling) act as they do
    on one model. Batch norm keeps each client's running statistics (buffers stacked like the
    weights); in train mode it normalizes each client's channels over that client's rows in
    ``valid`` (``(N, B)``, default all), and only clients with valid rows update their statistics
    and count a batch, as a model that did not run would not."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        signatures = {stack_signature(m) for m in models}
        if len(signatures) != 1 or None in signatures:
            raise ValueError("StackedModel needs models of one stackable architecture")
        self.n = len(models)
        self.layers = _layers(models[0])
        self.channels_last = any(isinstance(layer, nn.Conv2d) and layer.weight.is_contiguous(memory_format=torch.channels_last)
                                 and not layer.weight.is_contiguous() for layer in self.layers)
        per_model = [_layers(m) for m in models]
        self.weights = nn.ParameterList()
        self._slots: list[tuple[int, str]] = []  # (layer index, "weight" | "bias") of each stacked tensor
        for i, layer in enumerate(self.layers):
            for name in ("weight", "bias"):
                if isinstance(layer, (nn.Linear, *_CONVS)) and getattr(layer, name) is not None:
                    tensors = [getattr(ls[i], name).detach() for ls in per_model]
                    if isinstance(layer, nn.Linear) and name == "weight":  # kept as (in, out): bmm reads it as is
                        tensors = [t.t() for t in tensors]
                    self.weights.append(nn.Parameter(torch.stack(tensors).contiguous()))
                    self._slots.append((i, name))
                elif isinstance(layer, _NORMS) and getattr(layer, name) is not None:
                    self.weights.append(nn.Parameter(torch.stack([getattr(ls[i], name).detach() for ls in per_model])))
                    self._slots.append((i, name))
            if isinstance(layer, _NORMS):
                for name in _NORM_BUFFERS:
                    self.register_buffer(f"{name}_{i}", torch.stack([getattr(ls[i], name).detach() for ls in per_model]))
        self._index = {slot: k for k, slot in enumerate(self._slots)}

    def _norm(self, i: int, layer: nn.Module, h: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Batch norm ``i`` on ``h`` in the grouped layout ``(B, N·C, *spatial)``."""
        weight, bias = self._param(i, "weight"), self._param(i, "bias")
        mean, var, batches = (getattr(self, f"{name}_{i}") for name in _NORM_BUFFERS)
        flat_weight = None if weight is None else weight.reshape(-1)
        flat_bias = None if bias is None else bias.reshape(-1)
        if not self.training or valid is None or bool(valid.all()):
            if self.training:
                batches.add_(1)
            # one kernel for the whole group: per channel of N·C is per client and channel
            return F.batch_norm(h, mean.view(-1), var.view(-1), flat_weight, flat_bias, self.training,
                                layer.momentum, layer.eps)
        b, n, positions = h.shape[0], self.n, [1] * (h.dim() - 2)
        grouped = h.reshape(b, n, -1, *h.shape[2:])  # (B, N, C, *spatial)
        rows = valid.t().to(h.dtype).reshape(b, n, 1, *positions)
        dims = (0, *range(3, grouped.dim()))  # each client's own rows and positions
        count = valid.sum(1).to(h.dtype) * math.prod(h.shape[2:])
        denominator = count.clamp(min=1).reshape(1, n, 1, *positions)
        batch_mean = (grouped * rows).sum(dims, keepdim=True) / denominator
        centred = grouped - batch_mean
        batch_var = (centred.square() * rows).sum(dims, keepdim=True) / denominator
        out = centred * torch.rsqrt(batch_var + layer.eps)
        if weight is not None:
            out = out * weight.reshape(1, n, -1, *positions)
        if bias is not None:
            out = out + bias.reshape(1, n, -1, *positions)
        with torch.no_grad():  # running statistics of the clients that ran, as F.batch_norm updates them
            ran = count > 0
            unbiased = batch_var.reshape(n, -1) * (count / (count - 1).clamp(min=1)).reshape(n, 1)
            momentum = layer.momentum
            mean[ran] = (1 - momentum) * mean[ran] + momentum * batch_mean.reshape(n, -1)[ran]
            var[ran] = (1 - momentum) * var[ran] + momentum * unbiased[ran]
            batches[ran] += 1
        return out.reshape(h.shape)

    def _param(self, i: int, name: str) -> torch.Tensor | None:
        k = self._index.get((i, name))
        return None if k is None else self.weights[k]

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        n, b = x.shape[:2]
        h, grouped = x, False  # grouped: (B, N·C, *spatial); else (N, B, ...)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _CONVS):
                if not grouped:
                    h = h.transpose(0, 1).reshape(b, n * h.shape[2], *h.shape[3:])
                    grouped = True
                weight, bias = self._param(i, "weight"), self._param(i, "bias")
                weight = weight.reshape(-1, *weight.shape[2:])
                if self.channels_last:  # the layout the run's kernels give the models (hetpfl.kernels)
                    h, weight = h.contiguous(memory_format=torch.channels_last), weight.contiguous(memory_format=torch.channels_last)
                conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
                h = conv(h, weight, None if bias is None else bias.reshape(-1),
                         layer.stride, layer.padding, layer.dilation, groups=n * layer.groups)
                continue
            if isinstance(layer, _NORMS):
                h = self._norm(i, layer, h, valid)
                continue
            if isinstance(layer, _PER_CHANNEL):
                h = layer(h)
                continue
            if grouped:  # back to (N, B, C, *spatial) before a layer that reads whole samples
                h = h.reshape(b, n, -1, *h.shape[2:]).transpose(0, 1)
                grouped = False
            if isinstance(layer, AddChannel):
                h = h.unsqueeze(2)
            elif isinstance(layer, nn.Flatten):
                h = h.reshape(n, b, -1)
            else:  # Linear: (N, B, in) @ (N, in, out) + (N, 1, out)
                weight, bias = self._param(i, "weight"), self._param(i, "bias")
                h = torch.bmm(h, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight)
        return h

    @torch.no_grad()
    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy each client's slice of the stacked weights (and batch norm statistics) into its own model."""
        for model, c in zip(models, range(self.n)):
            layers = _layers(model)
            for (i, name), stacked in zip(self._slots, self.weights):
                value = stacked[c].t() if isinstance(layers[i], nn.Linear) and name == "weight" else stacked[c]
                getattr(layers[i], name).copy_(value)
            for i, layer in enumerate(layers):
                if isinstance(layer, _NORMS):
                    for name in _NORM_BUFFERS:
                        getattr(layer, name).copy_(getattr(self, f"{name}_{i}")[c])


class StackedOptimizer:
    """One torch optimizer per client, as :meth:`OptimOptions.build` makes it (fused kernels or not,
    as the run's kernels say), over that client's slices of the stacked weights: per-client step
    counts and state, and a step only for the clients active at it."""

    def __init__(self, params: Sequence[torch.Tensor], options: OptimOptions, n: int) -> None:
        self.params, self.options, self.n = list(params), options, n
        # leaves sharing the stacked storage: an optimizer updates a client's slice in place
        self.slices = [[p.detach()[c] for p in self.params] for c in range(n)]
        self.optimizers = [options.build(slices) for slices in self.slices]

    def clip(self) -> None:
        """Each client's gradient norm over all its parameters to ``max_grad_norm`` (as
        ``nn.utils.clip_grad_norm_`` does for one model)."""
        limit = self.options.max_grad_norm
        if limit is None:
            return
        squares = sum(p.grad.reshape(self.n, -1).pow(2).sum(1) for p in self.params)
        scale = (limit / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad.mul_(scale.reshape(-1, *[1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, active: Sequence[int]) -> None:
        """One optimizer step for each client in ``active`` (the others keep weights and state)."""
        for c in active:
            for leaf, p in zip(self.slices[c], self.params):
                leaf.grad = p.grad[c]
            self.optimizers[c].step()


@dataclass(frozen=True)
class FitJob:
    """One client's share of :func:`fit_many`: what :func:`hetpfl.learn.fit` would be called with
    (``loss="cross_entropy"``, ``y`` integer labels), or :func:`hetpfl.learn.distill` (``loss`` one of
    its per-sample losses, ``y`` the target rows as it uses them: logits for ``l1_logits``,
    sharpened probabilities for ``kl``)."""

    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    generator: torch.Generator
    epochs: float = 1.0
    steps: int | None = None
    loss: str = "cross_entropy"


def _per_sample_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "cross_entropy":
        return lambda logits, labels: F.cross_entropy(logits, labels, reduction="none")
    if kind not in PER_SAMPLE_DISTILL:
        raise ValueError(f"fit_many: loss={kind!r} is not supported (allowed: cross_entropy, {', '.join(PER_SAMPLE_DISTILL)})")
    return PER_SAMPLE_DISTILL[kind]


def fit_many(jobs: Sequence[FitJob], *, batch_size: int = 32, optim: OptimOptions = OptimOptions(),
             augment: str = "none") -> list[dict[str, float]]:
    """Train every job's model at once, each as ``fit`` (or ``distill``, by the jobs' ``loss``) trains
    it (same batches, same augmentation draws, same optimizer, float sums in another order). The
    models must share one :func:`stack_signature` and the jobs one loss. Returns ``fit``'s result for
    each job."""
    check_augment(augment)
    kinds = {job.loss for job in jobs}
    if len(kinds) > 1:
        raise ValueError(f"fit_many: the jobs of one group share a loss, not {sorted(kinds)}")
    per_sample_loss = _per_sample_loss(kinds.pop() if kinds else "cross_entropy")
    data = [(as_input_tensor(job.x), as_tensor(job.y, np.int64 if job.loss == "cross_entropy" else np.float32))
            for job in jobs]
    sources = [IndexBatches(len(x), batch_size, epochs=job.epochs, steps=job.steps, generator=job.generator)
               for job, (x, _) in zip(jobs, data)]
    counts = [len(source) for source in sources]
    losses: list[list[torch.Tensor]] = [[] for _ in jobs]
    for members in fill_groups(counts):
        _fit_stacked([jobs[c] for c in members], [data[c] for c in members], [sources[c] for c in members],
                     [losses[c] for c in members], per_sample_loss, optim, augment)
    for job, count in zip(jobs, counts):
        if count:  # as fit leaves it: in train mode once it has stepped
            job.model.train()
    return [{"loss": _mean(ls), "steps": count} for ls, count in zip(losses, counts)]


# A stacked step costs about the whole group's work however few of its clients are still active, so
# a group runs as sub-groups whose step counts are within this share of their largest. Measured on
# the project machine (AMD, both cores busy; docs/performance.md, "Batch norm, depthwise convolutions,
# sub-groups by step count"): equal-size groups of 10 / 25 clients stack at 1.40x / 2.14x (mlp),
# 2.28x / 1.15x (cnn_small) and 1.38x / 1.10x (mobilenet_small) on 8x8 digits; clients of 60, 115 and
# 200 rows in one group made it 2.0x (cnn_small) to 2.4x (mobilenet_small) slower than one by one.
MIN_FILL = 0.8


def fill_groups(counts: Sequence[int], min_fill: float = MIN_FILL) -> list[list[int]]:
    """The indices of ``counts`` (each job's step count) split into sub-groups stacked together: in
    decreasing count, a job joins the current sub-group while its count is at least ``min_fill`` of
    the sub-group's first (largest)."""
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    groups: list[list[int]] = []
    for c in order:
        if groups and counts[c] >= min_fill * counts[groups[-1][0]]:
            groups[-1].append(c)
        else:
            groups.append([c])
    return [sorted(group) for group in groups]


def _fit_stacked(jobs: Sequence[FitJob], data: Sequence[tuple[torch.Tensor, torch.Tensor]], sources: Sequence[IndexBatches],
                 losses: Sequence[list[torch.Tensor]], per_sample_loss: Callable, optim: OptimOptions,
                 augment: str) -> None:
    """One stacked model's training loop over ``jobs`` (each job's step losses appended to its list)."""
    models = [job.model for job in jobs]
    stacked = StackedModel(models).train()
    optimizer = StackedOptimizer(list(stacked.weights), optim, len(jobs))
    counts = [len(source) for source in sources]
    iterators = [iter(source) for source in sources]
    n = len(jobs)
    for step in range(max(counts, default=0)):
        active = [c for c, count in enumerate(counts) if step < count]  # the others are done: masked
        batches = {c: next(iterators[c]) for c in active}
        width = max(len(idx) for idx in batches.values())  # no padding where every active batch is short alike
        inputs = torch.zeros(n, width, *data[0][0].shape[1:], dtype=data[0][0].dtype)
        labels = torch.zeros(n, width, *data[0][1].shape[1:], dtype=data[0][1].dtype)
        weights = torch.zeros(n, width)
        for c, idx in batches.items():
            x, y = data[c]
            inputs[c, : len(idx)] = augment_batch(x[idx], augment, jobs[c].generator)
            labels[c, : len(idx)] = y[idx]
            weights[c, : len(idx)] = 1.0 / len(idx)
        logits = stacked(inputs, weights > 0)
        per_sample = per_sample_loss(logits.reshape(n * width, -1), labels.reshape(n * width, *labels.shape[2:]))
        per_client = (per_sample.reshape(n, width) * weights).sum(1)  # each client's batch mean
        for p in stacked.weights:
            p.grad = None
        per_client.sum().backward()
        optimizer.clip()
        optimizer.step(active)
        for c in active:
            losses[c].append(per_client[c].detach())
    stacked.write_back(models)


@torch.no_grad()
def predict_many(models: Sequence[nn.Module], x: np.ndarray, batch_size: int = 512) -> list[np.ndarray]:
    """:func:`hetpfl.learn.predict_logits` of every model on the same inputs at once: each model's raw
    class scores (float32) in input order, up to float summation order. The models must share one
    :func:`stack_signature`."""
    stacked, n = StackedModel(models).eval(), len(models)
    for model in models:  # as predict_logits leaves it
        model.eval()
    xt = as_input_tensor(x)
    chunks = [stacked(xt[i : i + batch_size].unsqueeze(0).expand(n, *xt[i : i + batch_size].shape))
              for i in range(0, len(xt), batch_size)]
    if not chunks:
        return [np.zeros((0, 0), np.float32) for _ in models]
    logits = torch.cat(chunks, dim=1).float()
    return [logits[c].numpy().astype(np.float32) for c in range(n)]


@torch.no_grad()
def evaluate_many(models: Sequence[nn.Module], xs: Sequence[np.ndarray], ys: Sequence[np.ndarray],
                  batch_size: int = 512, *, groups: Sequence[np.ndarray] | None = None,
                  num_groups: int = 0) -> list[dict[str, Any]]:
    """:func:`hetpfl.learn.evaluate` of every model on its own (x, y) (and ``groups``) at once, the
    same keys, up to float summation order: each chunk of the longest set is one stacked pass,
    shorter sets padded. The models must share one :func:`stack_signature`."""
    stacked, n = StackedModel(models).eval(), len(models)
    for model in models:  # as evaluate leaves it
        model.eval()
    data = [(as_input_tensor(x), as_tensor(y, np.int64)) for x, y in zip(xs, ys)]
    hits: list[list[torch.Tensor]] = [[] for _ in models]
    loss_sums = [0.0] * n
    longest = max((len(x) for x, _ in data), default=0)
    for i in range(0, longest, batch_size):
        inputs = torch.zeros(n, min(batch_size, longest - i), *data[0][0].shape[1:], dtype=data[0][0].dtype)
        for c, (x, _) in enumerate(data):
            inputs[c, : len(x[i : i + batch_size])] = x[i : i + batch_size]
        logits = stacked(inputs)
        for c, (_, y) in enumerate(data):
            k = len(y[i : i + batch_size])
            if k:
                loss_sums[c] += F.cross_entropy(logits[c, :k], y[i : i + k], reduction="sum").item()
                hits[c].append(logits[c, :k].argmax(-1) == y[i : i + k])
    out: list[dict[str, Any]] = []
    for c, (x, _) in enumerate(data):
        hit = torch.cat(hits[c]).numpy() if hits[c] else np.zeros(0, dtype=bool)
        result: dict[str, Any] = ({"accuracy": int(hit.sum()) / len(x), "loss": loss_sums[c] / len(x), "n": int(len(x))}
                                  if len(x) else {"accuracy": float("nan"), "loss": float("nan"), "n": 0})
        if groups is not None:
            ids = np.asarray(groups[c], dtype=np.int64)
            result["group_correct"] = np.bincount(ids, weights=hit, minlength=num_groups).astype(np.int64)
            result["group_count"] = np.bincount(ids, minlength=num_groups).astype(np.int64)
        out.append(result)
    return out


__all__ = ["MAX_INPUT_AREA", "STACKABLE", "FitJob", "StackedModel", "StackedOptimizer", "evaluate_many", "fill_groups", "fit_many",
           "predict_many", "sequential_layers", "stack_signature"]
