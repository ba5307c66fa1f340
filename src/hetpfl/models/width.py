"""Width sub-models: a narrower copy of a model taken out of the full one, and put back.

A sub-model of width ``w`` is the same architecture built with ``width=w`` (every hidden count
``c`` becomes ``ceil(w * c)``). Its tensors are slices of the full model's: along every dimension
of every state entry, the full size ``C`` and the sub size ``k`` give the index set

* ``"leading"`` (HeteroFL): ``arange(k)``, the first ``k`` channels;
* ``"rolling"`` (FedRolex): ``(offset + arange(k)) mod C``, a window that wraps around.

The set depends only on ``(C, k, mode, offset)``, so every tensor that shares a channel group (a
conv's outputs, the BatchNorm after it, the next conv's inputs, a residual shortcut) gets the same
channels. A dimension that does not scale (input channels, classes, a depthwise kernel's 1) has
``k == C``; a full window is ``arange(C)`` in both modes (the same set as any rotation, in the
model's own order), so a width-1 sub-model is the full model, entry for entry.

A linear layer that reads flattened conv maps (channel-major, ``in_features == channels * area``)
is declared by its architecture in ``HetModel.flat_inputs`` ``{module name: area}``; its input
dimension is selected by whole channel blocks: ``channel * area + arange(area)`` for each
selected channel. Integer buffers (BatchNorm's ``num_batches_tracked``, a 0-d counter) travel as
they are.

Everything here works on ``{state name: numpy array}`` dicts (``model.state_dict()`` names).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .registry import BUILT_FROM, ModuleSpec, build_module

__all__ = [
    "WIDTH_MODES",
    "SubIndex",
    "channel_indices",
    "extract_submodel",
    "insert_submodel",
    "model_arrays",
    "submodel_index",
    "submodel_shapes",
]

WIDTH_MODES = ("leading", "rolling")

#: For every state entry, one index array per dimension (``()`` for a 0-d entry).
SubIndex = dict[str, tuple[np.ndarray, ...]]


def channel_indices(full: int, sub: int, mode: str = "leading", offset: int = 0) -> np.ndarray:
    """The ``sub`` indices (int64) a sub-model keeps of a dimension of size ``full``."""
    if mode not in WIDTH_MODES:
        raise ValueError(f"width mode {mode!r}: expected one of {', '.join(WIDTH_MODES)}")
    if not 0 < sub <= full:
        raise ValueError(f"a sub-model dimension of {sub} cannot be taken from one of {full}")
    if mode == "leading" or sub == full:
        return np.arange(sub, dtype=np.int64)
    return (int(offset) + np.arange(sub, dtype=np.int64)) % full


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """A model's state as ``{name: numpy array}`` (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=64)
def _shapes(spec: ModuleSpec, input_shape: tuple[int, ...], num_classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.random.fork_rng(devices=[]):  # a throwaway build: the caller's stream is untouched
        model = build_module(spec, input_shape, num_classes)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _built_from(model: nn.Module) -> ModuleSpec:
    spec = getattr(model, BUILT_FROM, None)
    if not isinstance(spec, ModuleSpec):
        raise ValueError(f"{type(model).__name__} was not built by the registry: no architecture to narrow")
    return spec


def submodel_shapes(model: nn.Module, width: float) -> dict[str, tuple[int, ...]]:
    """State shapes of ``model``'s architecture (same options) at width ``width``."""
    spec = _built_from(model)
    narrow = ModuleSpec.of(spec.arch, **{**spec.kwargs, "width": float(width)})
    return dict(_shapes(narrow, tuple(model.input_shape), int(model.num_classes)))


def submodel_index(model: nn.Module, width: float, mode: str = "leading", offset: int = 0) -> SubIndex:
    """Where the width-``width`` sub-model's entries sit in ``model``'s state (see the module doc)."""
    full = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sub = submodel_shapes(model, width)
    if sub.keys() != full.keys():
        raise ValueError(f"{_built_from(model).describe()} at width {width} has other state entries than the model")
    flat = {f"{name}.weight": area for name, area in getattr(model, "flat_inputs", {}).items()}
    index: SubIndex = {}
    for key, shape in full.items():
        dims = []
        for d, (c, k) in enumerate(zip(shape, sub[key], strict=True)):
            area = flat.get(key) if d == 1 else None
            if area:
                channels = channel_indices(c // area, k // area, mode, offset)
                dims.append((channels[:, None] * area + np.arange(area)).reshape(-1))
            else:
                dims.append(channel_indices(c, k, mode, offset))
        index[key] = tuple(dims)
    return index


def _region(idx: tuple[np.ndarray, ...]) -> tuple:
    return np.ix_(*idx) if idx else ()


def extract_submodel(full: Mapping[str, np.ndarray], index: SubIndex) -> dict[str, np.ndarray]:
    """The sub-model's entries taken out of a full state (new arrays, ``index``'s key order)."""
    return {key: np.array(full[key][_region(idx)], copy=True) for key, idx in index.items()}


def insert_submodel(full: Mapping[str, np.ndarray], sub: Mapping[str, np.ndarray],
                    index: SubIndex) -> dict[str, np.ndarray]:
    """A copy of ``full`` with the sub-model's entries put back in their places."""
    out = {key: np.array(value, copy=True) for key, value in full.items()}
    for key, idx in index.items():
        want = tuple(len(i) for i in idx)
        if tuple(np.shape(sub[key])) != want:
            raise ValueError(f"sub-model entry {key!r} has shape {tuple(np.shape(sub[key]))}, expected {want}")
        out[key][_region(idx)] = sub[key]
    return out
