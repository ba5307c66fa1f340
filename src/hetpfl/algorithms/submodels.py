"""Shared pieces of the width sub-model methods (HeteroFL, FedRolex).

* :func:`client_width`, :func:`check_width_clients`: a client's width from its architecture string
  (``cnn_small@0.5``), and the run check that every client narrows one width-capable architecture;
* :func:`submodel_arrays`: a client's sub-model of the full model as the
  ``w.``/``b.`` arrays that travel (``models.width`` does the indexing);
* :func:`average_submodels`: every entry of the full model averaged over the clients that hold it,
  weighted by their sample counts; entries nobody held keep their value. When every client holds
  every entry this is exactly :func:`~hetpfl.algorithms.weights.weighted_average` (FedAvg's rule):
  float64 accumulation in client order, one float64 division, cast to float32; integer buffers
  take the maximum;
* :func:`scaled_hidden_outputs`: HeteroFL's "scaler", the output of every hidden conv/linear layer
  of a sub-model divided by its width.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from torch import nn

from ..configuration import FieldError
from ..models import (
    ModuleSpec,
    SubIndex,
    extract_submodel,
    submodel_index,
    supports_width,
    width_architectures,
)
from .robust import AggregationOptions, combine_with_gaps


def client_width(arch: str) -> float:
    """The width multiplier of an architecture string (``"cnn_small@0.5"`` → 0.5; none → 1)."""
    return float(ModuleSpec.parse(arch).kwargs.get("width", 1.0))


def check_width_clients(method: str, client_archs: Sequence[str]) -> str:
    """The one base architecture every client narrows; ``FieldError`` on ``models.clients`` if the
    clients mix architectures, if it has no width support, or a width is outside (0, 1]."""
    names = sorted(set(client_archs))
    bases = sorted({ModuleSpec.parse(a).arch for a in names})
    if len(bases) != 1:
        raise FieldError("models.clients", names, f"{method} takes every client's model out of one full-width model: "
                         f"all clients must share one architecture at any widths (e.g. [cnn_small, cnn_small@0.5]), "
                         f"got {', '.join(bases)}")
    if not supports_width(bases[0]):
        raise FieldError("models.clients", names, f"architecture {bases[0]!r} has no width support "
                         f"(architectures with a width multiplier: {', '.join(width_architectures())})")
    for arch in names:
        w = client_width(arch)
        if not 0 < w <= 1:
            raise FieldError("models.clients", names, f"{arch!r}: the width after '@' must be in (0, 1]")
    return bases[0]


def prefixed(index: SubIndex, full: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, ...]]:
    """``index`` (state names) keyed like the message arrays ``full`` (``w.``/``b.`` + state name)."""
    return {key: index[key[2:]] for key in full}


def submodel_arrays(model: nn.Module, full: Mapping[str, np.ndarray], width: float, mode: str,
                    offset: int = 0) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, ...]]]:
    """The width-``width`` sub-model of ``model`` (whose message arrays are ``full``): its arrays and
    their index in ``full``."""
    index = prefixed(submodel_index(model, width, mode, offset), full)
    return extract_submodel(full, index), index


def average_submodels(full: Mapping[str, np.ndarray], subs: Sequence[Mapping[str, np.ndarray]],
                      indices: Sequence[Mapping[str, tuple[np.ndarray, ...]]],
                      weights: Sequence[float], options: AggregationOptions | None = None) -> dict[str, np.ndarray]:
    """Per entry: Σ n_k w_k / Σ n_k over the clients k whose sub-model holds it (float ``w.``
    arrays), the maximum over them (integer ``b.`` buffers); entries no client held stay.
    ``options`` (the experiment's ``aggregation``): ``median`` / ``trimmed_mean`` replace the
    weighted mean, per entry over the clients holding it (sample counts unused: a client's claim)."""
    robust = options is not None and options.rule != "mean"
    out = {}
    for key, current in full.items():
        new = np.array(current, copy=True)
        if key.startswith("w.") and robust:
            stack = np.full((len(subs), *current.shape), np.nan)
            for row, (sub, index) in enumerate(zip(subs, indices, strict=True)):
                stack[row][_region(index[key])] = sub[key]
            combined = combine_with_gaps(stack, options)
            held = ~np.isnan(combined)
            new[held] = combined[held].astype(np.float32)
        elif key.startswith("w."):
            acc = np.zeros(current.shape, dtype=np.float64)
            total = np.zeros(current.shape, dtype=np.float64)
            for sub, index, w in zip(subs, indices, weights, strict=True):
                region = _region(index[key])
                acc[region] += w * sub[key].astype(np.float64)
                total[region] += w
            held = total > 0
            new[held] = (acc[held] / total[held]).astype(np.float32)
        else:
            held = np.zeros(current.shape, dtype=bool)
            for sub, index in zip(subs, indices, strict=True):
                region = _region(index[key])
                new[region] = np.where(held[region], np.maximum(new[region], sub[key]), sub[key])
                held[region] = True
        out[key] = new
    return out


def _region(idx: tuple[np.ndarray, ...]) -> tuple:
    return np.ix_(*idx) if idx else ()


_SCALED = (nn.Conv1d, nn.Conv2d, nn.Linear)


@contextmanager
def scaled_hidden_outputs(model: nn.Module, width: float) -> Iterator[None]:
    """Divide the output of every conv and linear layer but the head by ``width`` (HeteroFL's
    scaler: a sub-model's hidden activations keep the full model's scale), in training and eval
    mode alike; nothing at width 1. The hooks are removed on exit (the host reuses live modules)."""
    if width == 1:
        yield
        return
    head = getattr(model, "head", None)

    def scale(_module: nn.Module, _inputs, output):
        return output / width

    handles = [m.register_forward_hook(scale) for m in model.modules() if isinstance(m, _SCALED) and m is not head]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
