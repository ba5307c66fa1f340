"""The architectures: small, CPU-fast at native resolution, deliberately different in family,
width and depth.

Each class takes ``(input_shape, num_classes, arch=...)``; build them through
:func:`hetpfl.models.build_model`, which validates the name and shape first. Conv nets adapt to the
input: they downsample only where :class:`~hetpfl.models.base.SpatialPlan` allows (at most 2
halvings on 8x8 digits, 3 on 28x28 / 32x32), end with adaptive average pooling, and read a vector
``(D,)`` as a 1-channel sequence through the 1-D versions of the same layers.

The conv families (PlainCNN, ResNetSmall, MobileNetSmall) take ``width`` in (0, 1]: every hidden
channel or feature count ``c`` becomes ``ceil(width * c)`` (HeteroFL's rule); input channels and
the number of classes never scale, and width 1 builds exactly the unscaled model (same layers,
same order of initialization, hence the same weights for one torch seed).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .base import (
    HetModel,
    InputGeometry,
    SpatialPlan,
    adaptive_avg_pool,
    batch_norm,
    check_width,
    conv,
    input_adapter,
    max_pool,
    parse_input_shape,
    scaled,
)

__all__ = [
    "MIN_CONV_SIDE",
    "MLP",
    "BasicBlock",
    "DepthwiseSeparable",
    "MobileNetSmall",
    "PlainCNN",
    "ResNetSmall",
    "VGGSmall",
]

#: Smallest spatial side (or vector length) a conv architecture accepts: every conv net needs at
#: least one halving to be possible (``SpatialPlan.MIN_SIDE_TO_HALVE``).
MIN_CONV_SIDE = SpatialPlan.MIN_SIDE_TO_HALVE


def _conv_geometry(arch: str, input_shape: tuple[int, ...]) -> InputGeometry:
    """Parse ``input_shape`` for a conv net and check it is large enough for its pooling."""
    geom = parse_input_shape(input_shape)
    if min(geom.spatial) < MIN_CONV_SIDE:
        what = "length" if geom.kind == "vector" else "height and width"
        raise ValueError(
            f"architecture {arch!r} cannot take input_shape {tuple(input_shape)}: its pooling needs "
            f"a spatial {what} of at least {MIN_CONV_SIDE}, got {geom.spatial}"
        )
    return geom


class MLP(HetModel):
    """Fully connected net on the flattened input: ``hidden`` ReLU layers, features = last hidden."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] = (256, 128), arch: str = "mlp") -> None:
        parse_input_shape(input_shape)
        layers: list[nn.Module] = [nn.Flatten(1)]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        super().__init__(input_shape, num_classes, nn.Sequential(*layers), width)
        self.arch = arch


class PlainCNN(HetModel):
    """Plain conv net (no normalization): 3x3 conv + ReLU layers, max-pool after the layers named
    in ``pool_after`` where the size allows, adaptive avg pool to at most ``grid`` per side,
    flatten, then one FC + ReLU layer of width ``fc`` (the features).

    With ``strided_stem`` the first conv has stride 2 on inputs large enough to still take every
    pool afterwards (side >= 16); it keeps wide nets cheap at native resolution. ``width`` scales
    every conv's channels and the FC width; the FC reads the flattened pooled maps, which it
    declares in ``flat_inputs``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 channels: tuple[int, ...] = (16, 32), pool_after: tuple[bool, ...] = (True, True),
                 fc: int = 128, grid: int = 4, strided_stem: bool = False,
                 arch: str = "cnn_small", width: float = 1.0) -> None:
        width = check_width(arch, width)
        channels, fc = tuple(scaled(c, width) for c in channels), scaled(fc, width)
        geom = _conv_geometry(arch, input_shape)
        nd, plan = geom.ndim, SpatialPlan(geom.spatial)
        layers: list[nn.Module] = input_adapter(geom)
        cin = geom.in_channels
        for i, (cout, pool) in enumerate(zip(channels, pool_after, strict=True)):
            stride = 1
            if i == 0 and strided_stem and plan.can_halve(reserve=sum(pool_after)):
                stride = 2
                plan.strided_conv()
            layers += [conv(nd, cin, cout, stride=stride), nn.ReLU(inplace=True)]
            if pool and plan.can_halve():
                layers.append(max_pool(nd))
                plan.pool()
            cin = cout
        out = plan.grid(grid)
        layers += [adaptive_avg_pool(nd, out), nn.Flatten(1)]
        flat = f"body.{len(layers)}"
        layers += [nn.Linear(cin * math.prod(out), fc), nn.ReLU(inplace=True)]
        super().__init__(input_shape, num_classes, nn.Sequential(*layers), fc)
        self.arch = arch
        self.flat_inputs = {flat: math.prod(out)}


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus an identity or 1x1-conv-BN shortcut, ReLU.

    ``projection`` forces the shortcut's kind (default: a 1x1 conv where the stride or the channel
    count changes); a width-scaled net passes what its full-width version has."""

    def __init__(self, nd: int, cin: int, cout: int, stride: int, projection: bool | None = None) -> None:
        super().__init__()
        self.conv1 = conv(nd, cin, cout, stride=stride, bias=False)
        self.bn1 = batch_norm(nd, cout)
        self.conv2 = conv(nd, cout, cout, bias=False)
        self.bn2 = batch_norm(nd, cout)
        self.relu = nn.ReLU(inplace=True)
        if projection is None:
            projection = stride != 1 or cin != cout
        if projection:
            self.shortcut: nn.Module = nn.Sequential(
                conv(nd, cin, cout, kernel=1, stride=stride, bias=False), batch_norm(nd, cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(HetModel):
    """ResNet-style: 3x3 conv-BN-ReLU stem (16 ch) + 3 stages of one BasicBlock each (16, 32,
    64 ch; stages 2 and 3 stride 2 where the size allows), global average pool; features = 64.

    As in ResNet, the stem has stride 2, but only on inputs that still leave room for both stage
    downsamplings (side >= 16); 8x8 digits keep full resolution in the stem. ``width`` scales every
    stage (the shortcuts stay those of the full-width net).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 widths: tuple[int, ...] = (16, 32, 64), arch: str = "resnet_small",
                 width: float = 1.0) -> None:
        width = check_width(arch, width)
        full, widths = tuple(widths), tuple(scaled(c, width) for c in widths)
        geom = _conv_geometry(arch, input_shape)
        nd, plan = geom.ndim, SpatialPlan(geom.spatial)
        stem = widths[0]
        stem_stride = 1
        if plan.can_halve(reserve=len(widths) - 1):
            stem_stride = 2
            plan.strided_conv()
        layers: list[nn.Module] = input_adapter(geom) + [
            conv(nd, geom.in_channels, stem, stride=stem_stride, bias=False),
            batch_norm(nd, stem), nn.ReLU(inplace=True)]
        cin = stem
        for i, cout in enumerate(widths):
            stride = 1
            if i > 0 and plan.can_halve():
                stride = 2
                plan.strided_conv()
            projection = stride != 1 or full[max(i - 1, 0)] != full[i]
            layers.append(BasicBlock(nd, cin, cout, stride, projection))
            cin = cout
        layers += [adaptive_avg_pool(nd, (1,) * nd), nn.Flatten(1)]
        super().__init__(input_shape, num_classes, nn.Sequential(*layers), cin)
        self.arch = arch


class DepthwiseSeparable(nn.Module):
    """MobileNet block: 3x3 depthwise conv-BN-ReLU6, then 1x1 pointwise conv-BN-ReLU6."""

    def __init__(self, nd: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            conv(nd, cin, cin, stride=stride, groups=cin, bias=False), batch_norm(nd, cin),
            nn.ReLU6(inplace=True),
            conv(nd, cin, cout, kernel=1, bias=False), batch_norm(nd, cout), nn.ReLU6(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)

    def as_sequential(self) -> nn.Sequential:
        """Its forward is this sequence of layers (what the batched executor stacks)."""
        return self.block


class MobileNetSmall(HetModel):
    """MobileNet-style: 3x3 conv-BN-ReLU6 stem (16 ch) then depthwise-separable blocks 16->32
    (stride 1), 32->64 (stride 2), 64->128 (stride 2) where the size allows; global average
    pool; features = 128.

    As in MobileNet, the stem has stride 2, but only on inputs that still leave room for both
    block downsamplings (side >= 16). ``width`` scales the stem and every block.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 stem: int = 16, blocks: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (128, 2)),
                 arch: str = "mobilenet_small", width: float = 1.0) -> None:
        width = check_width(arch, width)
        stem, blocks = scaled(stem, width), tuple((scaled(c, width), s) for c, s in blocks)
        geom = _conv_geometry(arch, input_shape)
        nd, plan = geom.ndim, SpatialPlan(geom.spatial)
        stem_stride = 1
        if plan.can_halve(reserve=sum(1 for _, s in blocks if s == 2)):
            stem_stride = 2
            plan.strided_conv()
        layers: list[nn.Module] = input_adapter(geom) + [
            conv(nd, geom.in_channels, stem, stride=stem_stride, bias=False),
            batch_norm(nd, stem), nn.ReLU6(inplace=True)]
        cin = stem
        for cout, stride in blocks:
            if stride == 2 and plan.can_halve():
                plan.strided_conv()
            else:
                stride = 1
            layers.append(DepthwiseSeparable(nd, cin, cout, stride))
            cin = cout
        layers += [adaptive_avg_pool(nd, (1,) * nd), nn.Flatten(1)]
        super().__init__(input_shape, num_classes, nn.Sequential(*layers), cin)
        self.arch = arch


class VGGSmall(HetModel):
    """VGG-style: stacks of 3x3 conv-BN-ReLU (2x32, pool, 2x64, pool, 2x128, pool), each pool only
    where the size allows; adaptive avg pool to at most 2x2, flatten, FC 256 + ReLU + dropout 0.3
    (the features). The largest net here, intended as a "server model"."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 stages: tuple[tuple[int, int], ...] = ((32, 2), (64, 2), (128, 2)),
                 fc: int = 256, dropout: float = 0.3, grid: int = 2, arch: str = "vgg_small") -> None:
        geom = _conv_geometry(arch, input_shape)
        nd, plan = geom.ndim, SpatialPlan(geom.spatial)
        layers: list[nn.Module] = input_adapter(geom)
        cin = geom.in_channels
        for cout, reps in stages:
            for _ in range(reps):
                layers += [conv(nd, cin, cout, bias=False), batch_norm(nd, cout),
                           nn.ReLU(inplace=True)]
                cin = cout
            if plan.can_halve():
                layers.append(max_pool(nd))
                plan.pool()
        out = plan.grid(grid)
        layers += [adaptive_avg_pool(nd, out), nn.Flatten(1)]
        flat = f"body.{len(layers)}"
        layers += [nn.Linear(cin * math.prod(out), fc), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        super().__init__(input_shape, num_classes, nn.Sequential(*layers), fc)
        self.arch = arch
        self.flat_inputs = {flat: math.prod(out)}
