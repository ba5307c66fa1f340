"""Registry of architectures, the one way to build them, and size/cost measures.

``build_model(name, input_shape, num_classes, **options)`` validates everything at build time and
raises ``ValueError`` for an unknown name or option, an unsupported input kind or rank, an input too
small for the architecture's pooling, or ``num_classes < 2``. Weights use PyTorch's default
initialization and draw from the global torch RNG, so a caller that seeds (``torch.manual_seed``)
before building gets identical weights every time.

Every built module records how it was built (:data:`BUILT_FROM`, a :class:`ModuleSpec`), so saved
state can be rebuilt from the registry without the caller restating the architecture.

FLOP convention (:func:`count_flops`): forward FLOPs for ONE sample, counted as ``2 * MACs`` of
every convolution (``nn.Conv1d``/``nn.Conv2d``, grouped/depthwise included), transposed convolution
and ``nn.Linear`` layer, measured with forward hooks on a batch of 1 in eval mode. Biases,
normalization, activations, pooling, embeddings, residual additions and other cheap elementwise ops
are not counted. For ``mlp`` with input size ``D`` and ``C`` classes that is exactly
``2 * (D*256 + 256*128 + 128*C)``.

Kinds (:attr:`ArchSpec.kind`): :data:`ARCHITECTURES` holds the classifiers (what ``models.clients``
picks from); :data:`AUXILIARY_ARCHITECTURES` the generators and discriminators of
:mod:`.generative` (``kind="generator"``/``"discriminator"``) and Mosaic's meta model;
:data:`VLM_ARCHITECTURES` the vision-language models of :mod:`.vlm` (``kind="vlm"``). One :func:`build_model` builds every
kind from the dataset's ``input_shape`` and ``num_classes``: a generator produces inputs of that
shape, a discriminator reads them. Generators and discriminators use DCGAN's initialization.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels import with_preferred_layout
from .archs import MLP, MobileNetSmall, PlainCNN, ResNetSmall, VGGSmall
from .base import HetModel, parse_input_shape
from .generative import DCGANDiscriminator, DCGANGenerator, Generator, MLPDiscriminator, MLPGenerator
from .teachers import MetaModel
from .vlm import VLM_FAMILIES, VLM_SIZES, VisionLanguageModel

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_KINDS",
    "BUILT_FROM",
    "AUXILIARY_ARCHITECTURES",
    "VLM_ARCHITECTURES",
    "ArchSpec",
    "ModuleSpec",
    "HetModel",
    "available_architectures",
    "build_model",
    "build_module",
    "generator_spec",
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
    ``"classifier"`` (a client's or server's model: ``features`` + ``head``), ``"generator"``
    (``forward(z, y=None)`` -> inputs) or ``"discriminator"`` (``forward(x)`` -> ``(B,)`` logits);
    every kind is built through the same registry.
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

#: The kinds of module the registry builds (:attr:`ArchSpec.kind`).
ARCHITECTURE_KINDS = ("classifier", "generator", "discriminator", "teacher", "vlm")

AUXILIARY_ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("dcgan_generator", "gan",
                 "DCGAN generator: linear projection, stride-2 transposed convs (BN + ReLU) doubling to the "
                 "image size, 3x3 conv, tanh scaled to (low, high); conditional: label embedding concatenated to z",
                 ("image",), kind="generator"),
        ArchSpec("mlp_generator", "gan",
                 "MLP generator: 2 hidden layers of 4*ngf (BN + ReLU), linear to the input size, tanh scaled to "
                 "(low, high) or linear; conditional: label embedding concatenated to z",
                 _BOTH, kind="generator"),
        ArchSpec("dcgan_discriminator", "gan",
                 "DCGAN discriminator: up to 4 4x4 stride-2 convs (BN + LeakyReLU 0.2) down to a side "
                 "of 2-3, linear to one real/fake logit", ("image",), kind="discriminator"),
        ArchSpec("mlp_discriminator", "gan",
                 "MLP discriminator: 4*ndf, 2*ndf LeakyReLU 0.2 layers, one real/fake logit", _BOTH,
                 kind="discriminator"),
        ArchSpec("moe_meta", "moe",
                 "Mosaic's meta model: one linear expansion (shared, or per expert) of each expert's logits to a token, "
                 "Transformer (1 encoder + 1 decoder layer), sum over tokens, linear to class logits",
                 ("image", "vector", "tokens"), kind="teacher"),
    )
}
_VLM_BLOCKS = {"llama": "Llama-style blocks (RMSNorm, SwiGLU, rotary positions)",
               "gpt": "GPT-2-style blocks (LayerNorm, GELU, learned positions)"}
#: Vision-language models (:mod:`.vlm`): ``input_shape`` is one image's, ``num_classes`` the vocabulary.
VLM_ARCHITECTURES: dict[str, ArchSpec] = {
    f"vlm_{family}_{size}": ArchSpec(
        f"vlm_{family}_{size}", f"vlm_{family}",
        f"vision-language model: conv image encoder -> projector -> {_VLM_BLOCKS[family]}, "
        f"width {dims.width}, {dims.depth} blocks, {dims.heads} heads", ("image",), kind="vlm")
    for family in VLM_FAMILIES for size, dims in VLM_SIZES.items()
}
assert not AUXILIARY_ARCHITECTURES.keys() & ARCHITECTURES.keys()
_ALL = {**ARCHITECTURES, **AUXILIARY_ARCHITECTURES, **VLM_ARCHITECTURES}
assert all(spec.kind in ARCHITECTURE_KINDS for spec in _ALL.values())

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
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
    "dcgan_generator": functools.partial(DCGANGenerator, arch="dcgan_generator"),
    "mlp_generator": functools.partial(MLPGenerator, arch="mlp_generator"),
    "dcgan_discriminator": functools.partial(DCGANDiscriminator, arch="dcgan_discriminator"),
    "mlp_discriminator": functools.partial(MLPDiscriminator, arch="mlp_discriminator"),
    "moe_meta": functools.partial(MetaModel, arch="moe_meta"),
    **{name: functools.partial(VisionLanguageModel, family=name.split("_")[1], size=name.split("_")[2], arch=name)
       for name in VLM_ARCHITECTURES},
}
assert _BUILDERS.keys() == _ALL.keys()


def available_architectures(kind: str | None = "classifier") -> list[str]:
    """Registered architecture names of ``kind`` (default the classifiers; None: every kind), in
    registry order."""
    if kind is not None and kind not in ARCHITECTURE_KINDS:
        raise ValueError(f"unknown architecture kind {kind!r} (kinds: {', '.join(ARCHITECTURE_KINDS)})")
    return [name for name, spec in _ALL.items() if kind is None or spec.kind == kind]


def _spec(name: str) -> ArchSpec:
    if name not in _ALL:
        raise ValueError(
            f"unknown architecture {name!r}; available: {', '.join(available_architectures(None))}"
        )
    return _ALL[name]


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, input_kind: str | None = None,
                **options: Any) -> nn.Module:
    """Build architecture ``name`` for per-sample inputs of ``input_shape`` and ``num_classes``
    (a classifier is a :class:`HetModel`; a generator produces such inputs, a discriminator reads them).

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
    if spec.kind == "classifier":
        model = with_preferred_layout(model, spec.family, shape)
    setattr(model, BUILT_FROM, ModuleSpec.of(name, **options))
    return model


def generator_spec(arch: str, value_range: tuple[float, float] | None, **options: Any) -> ModuleSpec:
    """The :class:`ModuleSpec` of generator ``arch`` whose outputs span a dataset's ``value_range``
    (``FederatedData.value_range``; None: an unbounded, linear output)."""
    low, high = value_range if value_range is not None else (None, None)
    return ModuleSpec.of(arch, low=low, high=high, **options)


def build_module(spec: ModuleSpec, input_shape: tuple[int, ...], num_classes: int,
                 input_kind: str | None = None) -> nn.Module:
    """:func:`build_model` from a :class:`ModuleSpec`."""
    return build_model(spec.arch, input_shape, num_classes, input_kind=input_kind, **spec.kwargs)


def supports_width(name: str) -> bool:
    """Whether architecture ``name`` takes a width multiplier (``name@w``, option ``width``)."""
    return "width" in _builder_options(_BUILDERS[_spec(name).name])


def width_architectures() -> list[str]:
    """Architectures with a width multiplier, in registry order."""
    return [name for name in ARCHITECTURES if supports_width(name)]


def _builder_options(builder: Callable[..., nn.Module]) -> set[str]:
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
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one sample of ``input_shape``: ``2 * MACs`` of conv and linear layers.

    Runs one forward pass on a zero batch of size 1 in eval mode under ``no_grad`` (the model's
    training flag is restored afterwards), with forward hooks on every ``nn.Conv*d``,
    ``nn.ConvTranspose*d`` and ``nn.Linear``. A conv contributes ``out.numel() * (in_channels / groups)
    * prod(kernel_size)`` MACs, a transposed conv ``in.numel() * (out_channels / groups) *
    prod(kernel_size)`` (every input element meets the whole kernel), a linear ``out.numel() *
    in_features``. Biases, BN, activations, pooling, embeddings and elementwise additions are ignored
    (they are cheap next to the convolutions and matmuls).

    A module that does not read inputs of ``input_shape`` offers ``example_inputs(batch)``, the
    arguments of one forward pass, and is run on those instead. A
    :class:`~hetpfl.models.generative.Generator` does (one latent code, and one label when
    conditional): it costs one generated sample, and ``input_shape`` must be the shape it generates
    (the dataset's input shape it was built for), else ``ValueError``.
    """
    macs = 0

    def conv_hook(module: nn.Module, _inp, out) -> None:
        nonlocal macs
        macs += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def conv_transpose_hook(module: nn.Module, inp, _out) -> None:
        nonlocal macs
        macs += inp[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)

    def linear_hook(module: nn.Module, _inp, out) -> None:
        nonlocal macs
        macs += out.numel() * module.in_features

    if isinstance(model, Generator) and tuple(input_shape) != model.output_shape:
        raise ValueError(f"count_flops: generator {model.arch!r} generates inputs of shape {model.output_shape}, "
                         f"not {tuple(input_shape)}")
    handles = []
    for m in model.modules():
        if isinstance(m, _CONV_TYPES):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, _CONV_TRANSPOSE_TYPES):
            handles.append(m.register_forward_hook(conv_transpose_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if callable(getattr(model, "example_inputs", None)):
                model(*model.example_inputs(1))
            else:
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
