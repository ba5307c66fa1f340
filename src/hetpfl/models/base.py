"""The base class of every architecture and the shape-generic building blocks they share.

Every architecture is a :class:`HetModel`: a feature extractor ``body`` that maps a batch of inputs
to ``(B, feature_dim)`` features, followed by one linear ``head`` (``feature_dim -> num_classes``).
Splitting the two is what heterogeneous personalized FL methods need (share or personalize the
head, distil or align on features), so the split is part of the contract.

Inputs come in three kinds:

* ``"image"``: ``input_shape == (C, H, W)``; convolutional nets use 2-D layers.
* ``"vector"``: ``input_shape == (D,)``; convolutional nets treat the vector as a 1-channel
  sequence of length ``D`` and use the 1-D versions of the same layers.
* ``"tokens"``: ``input_shape == (L,)`` of int64 token ids; only language models take them
  (named explicitly: a rank-1 shape is a vector unless the dataset says tokens).

The conv blocks below are written once, generic over the number of spatial dimensions, so each
architecture has ONE definition that serves both kinds of input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..data.sources.base import INPUT_KINDS  # the one list of input kinds (datasets declare theirs)

__all__ = [
    "INPUT_KINDS",
    "AddChannel",
    "HetModel",
    "InputGeometry",
    "SpatialPlan",
    "adaptive_avg_pool",
    "batch_norm",
    "conv",
    "input_adapter",
    "max_pool",
    "parse_input_shape",
    "scaled",
    "check_width",
]


class HetModel(nn.Module):
    """Base class of every hetpfl architecture: ``forward(x) == head(features(x))``.

    Attributes:
        input_shape: the per-sample input shape the model was built for (``(C, H, W)`` or ``(D,)``).
        num_classes: number of output logits.
        feature_dim: width of the representation returned by :meth:`features`.
        body: module mapping a batch ``(B, *input_shape)`` to ``(B, feature_dim)``.
        head: ``nn.Linear(feature_dim, num_classes)``.
        flat_inputs: ``{name of an nn.Linear: area}`` for each linear layer that reads flattened
            conv maps (channel-major, ``in_features == channels * area``), so that taking a
            width sub-model (:mod:`hetpfl.models.width`) selects whole channel blocks of it.
    """

    feature_dim: int
    head: nn.Linear
    flat_inputs: dict[str, int]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, body: nn.Module,
                 feature_dim: int) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.body = body
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        self.flat_inputs = {}

    def _check_input(self, x: Tensor) -> None:
        n = len(self.input_shape)
        if x.dim() != n + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{type(self).__name__} was built for inputs of shape (B, *{self.input_shape}), "
                f"got a tensor of shape {tuple(x.shape)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """The ``(B, feature_dim)`` representation of a batch ``x`` of shape ``(B, *input_shape)``."""
        self._check_input(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``; exactly ``head(features(x))``."""
        return self.head(self.features(x))


@dataclass(frozen=True)
class InputGeometry:
    """How a conv net sees an input shape: channels, spatial sizes, and 1-D or 2-D layers."""

    kind: str  # "image", "vector" or "tokens"
    in_channels: int
    spatial: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (1 for vectors, 2 for images)."""
        return len(self.spatial)




def parse_input_shape(input_shape: tuple[int, ...], kind: str | None = None) -> InputGeometry:
    """``(C, H, W)`` -> image geometry; ``(D,)`` -> vector geometry (1 channel, length D);
    ``(L,)`` with ``kind="tokens"`` -> a token sequence of length L.

    ``kind=None`` infers image or vector from the rank. Raises ``ValueError`` for an unknown kind,
    a rank that does not fit it, or non-positive sizes.
    """
    shape = tuple(input_shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    if kind is not None and kind not in INPUT_KINDS:
        raise ValueError(f"input kind {kind!r} is not one of {', '.join(INPUT_KINDS)}")
    if kind == "tokens":
        if len(shape) != 1:
            raise ValueError(f"token inputs have shape (L,), got {input_shape!r}")
        return InputGeometry("tokens", 1, shape)
    expected_rank = {"image": 3, "vector": 1}.get(kind or "")
    if expected_rank is not None and len(shape) != expected_rank:
        raise ValueError(f"{kind} inputs have rank {expected_rank}, got input_shape {input_shape!r}")
    if len(shape) == 3:
        return InputGeometry("image", shape[0], shape[1:])
    if len(shape) == 1:
        return InputGeometry("vector", 1, shape)
    raise ValueError(
        f"input_shape {input_shape!r} has rank {len(shape)}; expected an image (C, H, W) "
        f"or a vector (D,)"
    )


class SpatialPlan:
    """Tracks the spatial size through a conv stack and decides where halving is allowed.

    A requested downsampling (max-pool 2 or stride-2 conv) is applied only while the smallest
    spatial side is at least :attr:`MIN_SIDE_TO_HALVE`, so that every map stays at least 2 wide.
    An 8x8 digit therefore allows at most 2 halvings (8 -> 4 -> 2), a 28x28 image 3
    (28 -> 14 -> 7 -> 3), a 32x32 image 4.
    """

    MIN_SIDE_TO_HALVE = 4

    def __init__(self, spatial: tuple[int, ...]) -> None:
        self.sizes = tuple(spatial)

    def halvings_left(self) -> int:
        """How many more halvings the current size allows (8 -> 2, 28 -> 3, 32 -> 4)."""
        side, n = min(self.sizes), 0
        while side >= self.MIN_SIDE_TO_HALVE:
            side, n = side // 2, n + 1
        return n

    def can_halve(self, reserve: int = 0) -> bool:
        """Whether one halving is allowed now while still leaving ``reserve`` for later layers.

        ``reserve > 0`` marks an optional early downsampling (a strided stem) that an
        architecture takes only on large inputs, so small inputs keep their later poolings.
        """
        return self.halvings_left() > reserve

    def pool(self) -> None:
        """Record a kernel-2 stride-2 max-pool (floor)."""
        self.sizes = tuple(s // 2 for s in self.sizes)

    def strided_conv(self) -> None:
        """Record a 3x3, padding 1, stride 2 convolution (ceil)."""
        self.sizes = tuple((s - 1) // 2 + 1 for s in self.sizes)

    def grid(self, target: int) -> tuple[int, ...]:
        """Output size for an adaptive pool to at most ``target`` per side (never upsamples)."""
        return tuple(min(s, target) for s in self.sizes)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def conv(nd: int, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
         bias: bool = True) -> nn.Module:
    """A ``nd``-D convolution with "same" padding (``kernel // 2``)."""
    return _CONV[nd](cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups,
                     bias=bias)


def batch_norm(nd: int, channels: int) -> nn.Module:
    return _BN[nd](channels)


def max_pool(nd: int) -> nn.Module:
    return _MAXPOOL[nd](2)


def adaptive_avg_pool(nd: int, size: tuple[int, ...]) -> nn.Module:
    return _ADAPTIVE_AVG[nd](size if nd > 1 else size[0])


class AddChannel(nn.Module):
    """``(B, D) -> (B, 1, D)``: lets 1-D conv layers read a vector input as a 1-channel sequence."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def check_width(arch: str, width: object) -> float:
    """``width`` as a float if it is a number in (0, 1], else ``ValueError`` naming ``arch``."""
    ok = isinstance(width, (int, float)) and not isinstance(width, bool) and math.isfinite(width)
    if not ok or not 0 < width <= 1:
        raise ValueError(f"architecture {arch!r}: width={width!r} must be a number in (0, 1] "
                         f"(the multiplier of every hidden channel and feature count)")
    return float(width)


def scaled(count: int, width: float) -> int:
    """A hidden channel/feature count at width multiplier ``width``: ``ceil(width * count)``
    (HeteroFL's rule, computed in float exactly as written)."""
    return int(math.ceil(width * count))


def input_adapter(geom: InputGeometry) -> list[nn.Module]:
    """Modules to prepend to a conv body so it accepts ``(B, *input_shape)``."""
    return [AddChannel()] if geom.kind == "vector" else []
