"""Generators and discriminators: the generative modules that Mosaic and the data-free baselines
(DENSE, FedFTG, DFRD, FedGen) share. Build them through :func:`hetpfl.models.build_model` like any
architecture; ``input_shape`` is the dataset's per-sample input shape, i.e. what a generator
*produces* and what a discriminator *reads*.

Generators (``kind="generator"``):

* ``dcgan_generator``: DCGAN-style. ``z`` (with the label embedding, if conditional) goes through a
  linear projection to a ``(C0, h0, w0)`` map, then ``n`` stride-2 transposed convolutions (kernel 4,
  padding 1; BN + ReLU) that double the side and halve the channels down to ``ngf``, then a 3x3
  convolution to the dataset's channels. The start size is the image size halved while both
  sides stay even and at least 4: 32 -> 4 (3 doublings), 28 -> 7 (2 doublings), 8 -> 4 (1
  doubling). Images only; both sides must be even and at least 8 (one doubling at least).
* ``mlp_generator``: two hidden layers of ``4 * ngf`` (BN + ReLU), then a linear layer to
  ``prod(input_shape)``, reshaped. Vectors and images (a cheap generator for tiny images).

``forward(z, y=None)`` returns ``(B, *input_shape)``. **Conditioning:** ``conditional=True`` gives
the generator a learned label embedding ``nn.Embedding(num_classes, latent_dim)``; the embedding of
``y`` is concatenated to ``z`` (so the first layer reads ``2 * latent_dim`` values).

**Output range:** the last layer's pre-activation ``a`` is mapped to ``low + (high - low) *
(tanh(a) + 1) / 2``, which spans the open interval ``(low, high)`` (DCGAN's ``tanh`` exactly when
``(low, high) = (-1, 1)``, the default, which is CIFAR-10's range here). Pass the dataset's range:
``low=0.0, high=1.0`` for MNIST, Fashion-MNIST and digits (pixels / 255 or / 16); an inverted
feature-shift group has the same range. ``low=None, high=None`` gives a linear (unbounded) output,
for standardized vector features such as the gaussian dataset's.

Discriminators (``kind="discriminator"``) return one logit per sample, shape ``(B,)`` (use it with
:func:`hetpfl.learn.losses.gan_discriminator_loss`, BCE on logits):

* ``dcgan_discriminator``: DCGAN-style: a 4x4 stride-2 conv (with a bias, unlike DCGAN: inputs in
  [0, 1] are not centred on LeakyReLU's kink, and without one the first layer is linear on them) +
  LeakyReLU(0.2), then 4x4 stride-2 conv + BN + LeakyReLU blocks doubling the channels while the
  smaller side is at least 4 (at most 4 convs, as Mosaic's: 32 -> 16 -> 8 -> 4 -> 2 with ``8 * ndf``
  channels, 28 -> 14 -> 7 -> 3, 8 -> 4 -> 2), then a linear layer to one logit (Mosaic's last 2x2
  conv). Images only, sides at least 8.
* ``mlp_discriminator``: flatten, ``4 * ndf`` and ``2 * ndf`` LeakyReLU(0.2) layers, one logit.

Weights: DCGAN's initialization (conv, transposed conv and linear weights ~ N(0, 0.02), biases 0,
BN weights ~ N(1, 0.02)), drawn from the global torch RNG like every registry model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import parse_input_shape

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "Discriminator",
    "Generator",
    "MLPDiscriminator",
    "MLPGenerator",
]

_MIN_SIDE = 8  # a DCGAN generator or discriminator needs one halving/doubling to a side >= 4


def _positive_int(arch: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"architecture {arch!r}: {name}={value!r} must be an int >= 1")
    return value


def _output_range(arch: str, low: float | None, high: float | None) -> tuple[float, float] | None:
    if low is None and high is None:
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not ok or not low < high:
        raise ValueError(f"architecture {arch!r}: low={low!r}, high={high!r} must be finite numbers with "
                         f"low < high (the dataset's input range), or both None for a linear output")
    return float(low), float(high)


def _image_sides(arch: str, input_shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image shape a DCGAN module can take, else ``ValueError`` naming both."""
    geom = parse_input_shape(input_shape)
    if geom.kind != "image":
        raise ValueError(f"architecture {arch!r} cannot take input_shape {tuple(input_shape)}: it {what} images "
                         f"(C, H, W), not vectors (use the mlp_ variant)")
    h, w = geom.spatial
    if min(h, w) < _MIN_SIDE:
        raise ValueError(f"architecture {arch!r} cannot take input_shape {tuple(input_shape)}: height and width "
                         f"must be at least {_MIN_SIDE}, got {(h, w)}")
    return geom.in_channels, h, w


def _dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0)


class Generator(nn.Module):
    """Base of every generator: ``forward(z, y=None) -> (B, *output_shape)``.

    Attributes: ``output_shape`` (the dataset's input shape), ``num_classes``, ``latent_dim``,
    ``conditional``, ``output_range`` (``(low, high)`` or None for a linear output), ``net`` (maps the
    code ``(B, code_dim)`` to the pre-activation), ``embed`` (the label embedding, conditional only).
    """

    def __init__(self, output_shape: tuple[int, ...], num_classes: int, latent_dim: int, conditional: bool,
                 low: float | None, high: float | None, arch: str) -> None:
        super().__init__()
        if not isinstance(conditional, bool):
            raise ValueError(f"architecture {arch!r}: conditional={conditional!r} must be true or false")
        self.arch = arch
        self.output_shape = tuple(int(s) for s in output_shape)
        self.num_classes = int(num_classes)
        self.latent_dim = _positive_int(arch, "latent_dim", latent_dim)
        self.conditional = conditional
        self.output_range = _output_range(arch, low, high)
        self.embed = nn.Embedding(self.num_classes, self.latent_dim) if conditional else None

    @property
    def code_dim(self) -> int:
        """Width of the code the network reads: ``latent_dim``, doubled when conditional."""
        return self.latent_dim * (2 if self.conditional else 1)

    def _code(self, z: Tensor, y: Tensor | None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{self.arch}: z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        if not self.conditional:
            if y is not None:
                raise ValueError(f"{self.arch} is unconditional: it takes no labels y")
            return z
        if y is None:
            raise ValueError(f"{self.arch} is conditional: forward(z, y) needs labels y")
        if y.shape != (z.shape[0],):
            raise ValueError(f"{self.arch}: y must have shape ({z.shape[0]},), got {tuple(y.shape)}")
        return torch.cat([z, self.embed(y.long())], dim=1)

    def _squash(self, a: Tensor) -> Tensor:
        if self.output_range is None:
            return a
        low, high = self.output_range
        if (low, high) == (-1.0, 1.0):
            return torch.tanh(a)
        return low + (high - low) * (torch.tanh(a) + 1) * 0.5

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        out = self._squash(self.net(self._code(z, y)))
        return out.reshape(z.shape[0], *self.output_shape)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def draw_latent(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` latent codes z ~ N(0, I) drawn from ``generator`` (on its device), moved to the model's."""
        device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((n, self.latent_dim), generator=generator, device=device)
        return z.to(self.device)

    def sample(self, n: int, generator: torch.Generator | None, y: Tensor | None = None) -> Tensor:
        """``forward(z, y)`` for ``n`` codes z drawn from ``generator`` (in the module's current mode,
        with gradients; wrap in ``torch.no_grad()`` to only sample). A conditional generator needs
        ``y`` (``n`` labels)."""
        if y is not None:
            y = y.to(self.device)
        return self(self.draw_latent(n, generator), y)

    def example_inputs(self, batch: int = 1) -> tuple[Tensor, ...]:
        """Zero inputs for one forward pass (what :func:`~hetpfl.models.count_flops` runs)."""
        z = torch.zeros((batch, self.latent_dim), device=self.device)
        return (z, torch.zeros(batch, dtype=torch.long, device=self.device)) if self.conditional else (z,)


class DCGANGenerator(Generator):
    """DCGAN-style image generator (module docstring: layout, conditioning, output range)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, latent_dim: int = 100, ngf: int = 64,
                 conditional: bool = False, low: float | None = -1.0, high: float | None = 1.0,
                 arch: str = "dcgan_generator") -> None:
        channels, h, w = _image_sides(arch, input_shape, "generates")
        ngf = _positive_int(arch, "ngf", ngf)
        super().__init__(input_shape, num_classes, latent_dim, conditional, low, high, arch)
        doublings = 0
        while h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= 4:
            h, w, doublings = h // 2, w // 2, doublings + 1
        if doublings == 0:
            raise ValueError(f"architecture {arch!r} cannot take input_shape {tuple(input_shape)}: height and "
                             f"width must be even (at least one stride-2 doubling)")
        width = ngf * 2 ** doublings
        layers: list[nn.Module] = [nn.Linear(self.code_dim, width * h * w, bias=False),
                                   nn.Unflatten(1, (width, h, w)), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(doublings):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.start = (h, w)
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)


class MLPGenerator(Generator):
    """MLP generator for vectors (and small images): ``4 * ngf`` hidden units twice, BN + ReLU."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, latent_dim: int = 100, ngf: int = 64,
                 conditional: bool = False, low: float | None = -1.0, high: float | None = 1.0,
                 arch: str = "mlp_generator") -> None:
        parse_input_shape(input_shape)
        hidden = 4 * _positive_int(arch, "ngf", ngf)
        super().__init__(input_shape, num_classes, latent_dim, conditional, low, high, arch)
        self.net = nn.Sequential(
            nn.Linear(self.code_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, math.prod(self.output_shape)),
        )
        _dcgan_init(self)


class Discriminator(nn.Module):
    """Base of every discriminator: ``forward(x) -> (B,)`` real-vs-fake logits for inputs of
    ``input_shape`` (the dataset's)."""

    def __init__(self, input_shape: tuple[int, ...], arch: str) -> None:
        super().__init__()
        self.arch = arch
        self.input_shape = tuple(int(s) for s in input_shape)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.arch} was built for inputs of shape (B, *{self.input_shape}), "
                             f"got a tensor of shape {tuple(x.shape)}")
        return self.net(x).reshape(x.shape[0])


class DCGANDiscriminator(Discriminator):
    """DCGAN-style image discriminator (module docstring)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, ndf: int = 64,
                 arch: str = "dcgan_discriminator") -> None:
        channels, h, w = _image_sides(arch, input_shape, "reads")
        ndf = _positive_int(arch, "ndf", ndf)
        super().__init__(input_shape, arch)
        # a bias in the first conv (DCGAN has none): inputs in [0, 1] are not centred on LeakyReLU's kink
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        h, w, width = h // 2, w // 2, ndf
        for _ in range(3):
            if min(h, w) < 4:
                break
            layers += [nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                       nn.LeakyReLU(0.2, inplace=True)]
            h, w, width = h // 2, w // 2, 2 * width
        layers += [nn.Flatten(1), nn.Linear(width * h * w, 1)]
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)


class MLPDiscriminator(Discriminator):
    """MLP discriminator for vectors (and images, flattened): ``4 * ndf`` and ``2 * ndf`` LeakyReLU layers."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, ndf: int = 64,
                 arch: str = "mlp_discriminator") -> None:
        parse_input_shape(input_shape)
        ndf = _positive_int(arch, "ndf", ndf)
        super().__init__(input_shape, arch)
        self.net = nn.Sequential(
            nn.Flatten(1), nn.Linear(math.prod(self.input_shape), 4 * ndf), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(4 * ndf, 2 * ndf), nn.LeakyReLU(0.2, inplace=True), nn.Linear(2 * ndf, 1),
        )
        _dcgan_init(self)
