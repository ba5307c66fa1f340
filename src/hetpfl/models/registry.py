"""Registry of architectures, the one way to build them, and size/cost measures.

``build_model(name, input_shape, num_classes, **options)`` validates everything at build time and
raises ``ValueError`` for an unknown name or option, an unsupported input kind or rank, an input too
small for the architecture's pooling, or ``num_classes < 2``. Weights use PyTorch's default
initialization and draw from the global torch RNG, so a caller that seeds (``torch.manual_seed``)
before building gets identical weights every time.

Every built module records how it was built (:data:`BUILT_FROM`, a :class:`ModuleSpec`), so saved
state can be rebuilt from the registry without the caller restating the architecture.

FLOP convention (:func:`count_flops`): forward FLOPs for ONE sample, counted as ``2 * MACs`` of
every convolution (``nn.Conv1d``/``nn.Conv2d``, grouped/depthwise included) and every
``nn.Linear`` layer, measured with forward hooks on a batch of 1 in eval mode. Biases,
normalization, activations, pooling, residual additions and other cheap elementwise ops are not
counted. For ``mlp`` with input size ``D`` and ``C`` classes that is exactly
``2 * (D*256 + 256*128 + 128*C)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .archs import MLP, MobileNetSmall, PlainCNN, ResNetSmall, VGGSmall
from .base import HetModel, parse_input_shape

__all__ = [
    "ARCHITECTURES",
    "BUILT_FROM",
    "ArchSpec",
    "ModuleSpec",
    "HetModel",
    "available_architectures",
    "build_model",
    "build_module",
    "count_flops",
    "count_parameters",
    "model_summary",
    "supports_width",
    "width_architectures",
]


@dataclass(frozen=True)
class ArchSpec:
    """What the registry knows about an architecture.

    ``supports`` lists the input kinds it accepts: ``"image"`` (``(C, H, W)``), ``"vector"``
    (``(D,)``) and/or ``"tokens"`` (``(L,)`` int64 ids). ``kind`` says what the module is for:
    ``"classifier"`` (a client's or server's model: ``features`` + ``head``); later kinds
    (generators, adapters) are built through the same registry.
    """

    name: str
    family: str
    description: str
    supports: tuple[str, ...]
    kind: str = "classifier"


@dataclass(frozen=True)
class ModuleSpec:
    """How to build one module from the registry: an architecture name and its options.

    Hashable (options are kept as sorted pairs), so it can key a cache of live modules.
    """

    arch: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, arch: str, **options: Any) -> "ModuleSpec":
        return cls(arch, tuple(sorted(options.items())))

    @classmethod
    def parse(cls, text: str) -> "ModuleSpec":
        """``"cnn_small"`` or ``"cnn_small@0.5"`` (the architecture at width multiplier 0.5), the form
        a client's architecture takes in a config."""
        name, sep, width = str(text).partition("@")
        if not sep:
            return cls.of(name)
        try:
            return cls.of(name, width=float(width))
        except ValueError:
            raise ValueError(f"architecture {text!r}: the width after '@' must be a number, got {width!r}") from None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def describe(self) -> str:
        return self.arch + ("" if not self.options else "(" + ", ".join(f"{k}={v!r}" for k, v in self.options) + ")")


#: Attribute under which :func:`build_model` records the :class:`ModuleSpec` a module was built from.
BUILT_FROM = "built_from"


_BOTH = ("image", "vector")

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("mlp", "mlp", "MLP on the flattened input, hidden 256-128, ReLU", _BOTH),
        ArchSpec("mlp_wide", "mlp", "MLP on the flattened input, one hidden layer of 512, ReLU",
                 _BOTH),
        ArchSpec("cnn_small", "cnn", "2 conv 3x3 (16-32) + ReLU + max-pool, FC 128", _BOTH),
        ArchSpec("cnn_wide", "cnn",
                 "2 conv 3x3 (64-128) + ReLU + max-pool (first conv stride 2 on sides >= 16), "
                 "FC 256", _BOTH),
        ArchSpec("cnn_deep", "cnn", "4 conv 3x3 (32-32-64-64) + ReLU, 3 max-pools, FC 128",
                 _BOTH),
        ArchSpec("resnet_small", "resnet",
                 "ResNet: stem 16 (stride 2 on sides >= 16) + 3 BasicBlock stages (16, 32, 64), BN, "
                 "global avg pool", _BOTH),
        ArchSpec("mobilenet_small", "mobilenet",
                 "MobileNet: stem 16 (stride 2 on sides >= 16) + depthwise-separable 32, 64 (s2), 128 (s2), BN + ReLU6, "
                 "global avg pool", _BOTH),
        ArchSpec("vgg_small", "vgg",
                 "VGG: 2x32, pool, 2x64, pool, 2x128, pool; BN; FC 256 + dropout 0.3 "
                 "(the large 'server' model)", _BOTH),
    )
}

_BUILDERS: dict[str, Callable[[tuple[int, ...], int], HetModel]] = {
    "mlp": functools.partial(MLP, hidden=(256, 128), arch="mlp"),
    "mlp_wide": functools.partial(MLP, hidden=(512,), arch="mlp_wide"),
    "cnn_small": functools.partial(PlainCNN, channels=(16, 32), pool_after=(True, True), fc=128,
                                   arch="cnn_small"),
    "cnn_wide": functools.partial(PlainCNN, channels=(64, 128), pool_after=(True, True), fc=256,
                                  strided_stem=True, arch="cnn_wide"),
    "cnn_deep": functools.partial(PlainCNN, channels=(32, 32, 64, 64),
                                  pool_after=(True, True, True, False), fc=128, arch="cnn_deep"),
    "resnet_small": functools.partial(ResNetSmall, arch="resnet_small"),
    "mobilenet_small": functools.partial(MobileNetSmall, arch="mobilenet_small"),
    "vgg_small": functools.partial(VGGSmall, arch="vgg_small"),
}
assert _BUILDERS.keys() == ARCHITECTURES.keys()


def available_architectures() -> list[str]:
    """Registered architecture names, in registry order."""
    return list(ARCHITECTURES)


def _spec(name: str) -> ArchSpec:
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; available: {', '.join(available_architectures())}"
        )
    return ARCHITECTURES[name]


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, input_kind: str | None = None,
                **options: Any) -> HetModel:
    """Build architecture ``name`` for per-sample inputs of ``input_shape`` and ``num_classes``.

    ``input_kind`` is ``"image"``, ``"vector"`` or ``"tokens"``; None infers image or vector from
    the rank. ``options`` are the architecture's own keyword options. The model draws its initial
    weights from the global torch RNG (seed before calling for reproducible weights) and records
    its :class:`ModuleSpec` under :data:`BUILT_FROM`. Raises ``ValueError`` for an unknown name or
    option, or an input/num_classes the architecture cannot take.
    """
    spec = _spec(name)
    shape = tuple(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"architecture {name!r} with input_shape {shape}: num_classes must be an int >= 2, "
            f"got {num_classes!r}"
        )
    try:
        geom = parse_input_shape(shape, input_kind)
    except ValueError as err:
        raise ValueError(f"architecture {name!r} cannot take input_shape {shape}: {err}") from None
    if geom.kind not in spec.supports:
        raise ValueError(
            f"architecture {name!r} cannot take input_shape {shape}: it supports "
            f"{' and '.join(spec.supports)} inputs, not {geom.kind}"
        )
    builder = _BUILDERS[name]
    accepted = _builder_options(builder)
    unknown = sorted(set(options) - accepted)
    if "width" in unknown:
        raise ValueError(f"architecture {name!r} has no width support (it takes no option 'width'; "
                         f"architectures with a width multiplier: {', '.join(width_architectures())})")
    if unknown:
        raise ValueError(f"architecture {name!r} takes no option {unknown[0]!r} "
                         f"(options: {', '.join(sorted(accepted)) or 'none'})")
    model = builder(shape, num_classes, **options)
    setattr(model, BUILT_FROM, ModuleSpec.of(name, **options))
    return model


def build_module(spec: ModuleSpec, input_shape: tuple[int, ...], num_classes: int,
                 input_kind: str | None = None) -> HetModel:
    """:func:`build_model` from a :class:`ModuleSpec`."""
    return build_model(spec.arch, input_shape, num_classes, input_kind=input_kind, **spec.kwargs)


def supports_width(name: str) -> bool:
    """Whether architecture ``name`` takes a width multiplier (``name@w``, option ``width``)."""
    return "width" in _builder_options(_BUILDERS[_spec(name).name])


def width_architectures() -> list[str]:
    """Architectures with a width multiplier, in registry order."""
    return [name for name in ARCHITECTURES if supports_width(name)]


def _builder_options(builder: Callable[..., HetModel]) -> set[str]:
    """Keyword options an architecture takes beyond (input_shape, num_classes) and those the
    registry fixes (``functools.partial`` keywords such as ``arch``)."""
    fixed = set(builder.keywords) if isinstance(builder, functools.partial) else set()
    target = builder.func if isinstance(builder, functools.partial) else builder
    params = list(inspect.signature(target).parameters.values())[2:]
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - fixed


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, trainable and frozen alike (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one sample of ``input_shape``: ``2 * MACs`` of conv and linear layers.

    Runs one forward pass on a zero batch of size 1 in eval mode under ``no_grad`` (the model's
    training flag is restored afterwards), with forward hooks on every ``nn.Conv*d`` and
    ``nn.Linear``. A conv contributes ``out.numel() * (in_channels / groups) * prod(kernel_size)``
    MACs, a linear ``out.numel() * in_features``. Biases, BN, activations, pooling and elementwise
    additions are ignored (they are cheap next to the convolutions and matmuls).
    """
    macs = 0

    def conv_hook(module: nn.Module, _inp, out) -> None:
        nonlocal macs
        k = 1
        for s in module.kernel_size:
            k *= s
        macs += out.numel() * (module.in_channels // module.groups) * k

    def linear_hook(module: nn.Module, _inp, out) -> None:
        nonlocal macs
        macs += out.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, _CONV_TYPES):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *tuple(input_shape)), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(2 * macs)


def model_summary(name: str, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """``{"arch", "family", "params", "flops"}`` for ``name`` built on ``input_shape``.

    Builds a throwaway model inside ``torch.random.fork_rng`` so the caller's RNG stream is not
    consumed.
    """
    spec = _spec(name)
    with torch.random.fork_rng(devices=[]):
        model = build_model(name, input_shape, num_classes)
    return {
        "arch": name,
        "family": spec.family,
        "params": count_parameters(model),
        "flops": count_flops(model, input_shape),
    }
