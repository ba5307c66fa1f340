"""Invariants of the models layer: shapes, the features/head split, parameter and FLOP counts,
determinism, learning, input adaptation, errors, and genuine heterogeneity of the registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetpfl.models import (
    ARCHITECTURES,
    ArchSpec,
    HetModel,
    available_architectures,
    build_model,
    count_flops,
    count_parameters,
    model_summary,
)

ARCHS = available_architectures()
CONV_ARCHS = [a for a in ARCHS if ARCHITECTURES[a].family != "mlp"]
IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
VECTOR_SHAPES = [(40,), (16,)]
SHAPES = IMAGE_SHAPES + VECTOR_SHAPES
NUM_CLASSES = 10
EXPECTED = {"mlp", "mlp_wide", "cnn_small", "cnn_wide", "cnn_deep", "resnet_small",
            "mobilenet_small", "vgg_small"}


def _kind(shape):
    return "image" if len(shape) == 3 else "vector"


def _build(arch, shape, num_classes=NUM_CLASSES, seed=0):
    torch.manual_seed(seed)
    return build_model(arch, shape, num_classes)


ARCH_SHAPES = [(a, s) for a in ARCHS for s in SHAPES if _kind(s) in ARCHITECTURES[a].supports]


# --- registry -------------------------------------------------------------------------------

def test_registry_contents():
    assert set(ARCHS) == EXPECTED
    assert ARCHS == list(ARCHITECTURES)
    for name, spec in ARCHITECTURES.items():
        assert isinstance(spec, ArchSpec) and spec.name == name
        assert spec.description and spec.family
        assert set(spec.supports) <= {"image", "vector"} and spec.supports
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCHITECTURES["mlp"].name = "x"
    # genuinely different families
    assert {s.family for s in ARCHITECTURES.values()} == {"mlp", "cnn", "resnet", "mobilenet",
                                                          "vgg"}


# --- shapes and the features / head split ---------------------------------------------------

@pytest.mark.parametrize("arch,shape", ARCH_SHAPES)
def test_shapes_and_head_of_features(arch, shape):
    model = _build(arch, shape)
    assert isinstance(model, HetModel)
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.feature_dim
    assert model.head.out_features == NUM_CLASSES
    x = torch.randn(5, *shape)
    model.train()
    assert model(x).shape == (5, NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        out = model(x)
        feats = model.features(x)
        again = model.head(feats)
    assert out.shape == (5, NUM_CLASSES)
    assert feats.shape == (5, model.feature_dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, again, rtol=0, atol=0)


@pytest.mark.parametrize("arch,shape", ARCH_SHAPES)
def test_params_flops_and_summary(arch, shape):
    model = _build(arch, shape)
    n = count_parameters(model)
    assert n > 0 and n == sum(p.numel() for p in model.parameters())
    model.train()
    flops = count_flops(model, shape)
    assert isinstance(flops, int) and flops > 0
    assert model.training, "count_flops must restore the training flag"
    assert all(not m._forward_hooks for m in model.modules()), "hooks must be removed"
    summary = model_summary(arch, shape, NUM_CLASSES)
    assert summary == {"arch": arch, "family": ARCHITECTURES[arch].family, "params": n,
                       "flops": flops}


def test_count_parameters_includes_frozen():
    model = _build("mlp", (16,))
    n = count_parameters(model)
    for p in model.body.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == n


@pytest.mark.parametrize("shape", SHAPES)
def test_mlp_flops_exact(shape):
    d, c = math.prod(shape), NUM_CLASSES
    assert count_flops(_build("mlp", shape), shape) == 2 * (d * 256 + 256 * 128 + 128 * c)
    assert count_flops(_build("mlp_wide", shape), shape) == 2 * (d * 512 + 512 * c)
    # mlp params: weights + biases of 3 linear layers
    assert count_parameters(_build("mlp", shape)) == (d * 256 + 256) + (256 * 128 + 128) + (
        128 * c + c)


def test_conv_flops_exact():
    # cnn_small on 8x8 digits: conv 1->16 @8x8, pool, conv 16->32 @4x4, pool -> 2x2 grid,
    # FC 128 -> 128, head 128 -> 10.
    macs = 8 * 8 * 16 * 1 * 9 + 4 * 4 * 32 * 16 * 9 + (32 * 2 * 2) * 128 + 128 * 10
    assert count_flops(_build("cnn_small", (1, 8, 8)), (1, 8, 8)) == 2 * macs
    # grouped (depthwise) conv counts in_channels / groups per output element
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert count_flops(dw, (8, 5, 5)) == 2 * (8 * 5 * 5 * 1 * 9)
    # 1-D conv
    c1 = nn.Conv1d(1, 4, 3, padding=1)
    assert count_flops(c1, (1, 10)) == 2 * (4 * 10 * 3)


# --- determinism and learning ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights(arch):
    shape = (1, 28, 28)
    a, b, c = _build(arch, shape, seed=7), _build(arch, shape, seed=7), _build(arch, shape, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("arch,shape", [(a, s) for a in ARCHS for s in [(1, 8, 8), (40,)]])
def test_one_sgd_step_reduces_loss(arch, shape):
    model = _build(arch, shape)
    model.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, *shape, generator=gen)
    y = torch.arange(8) % NUM_CLASSES
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss():
        torch.manual_seed(123)  # same dropout mask both times
        return F.cross_entropy(model(x), y)

    before = loss()
    opt.zero_grad()
    before.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


# --- input adaptation -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", CONV_ARCHS)
def test_vector_inputs_use_1d_layers(arch):
    img = _build(arch, (1, 28, 28))
    vec = _build(arch, (40,))
    assert any(isinstance(m, nn.Conv2d) for m in img.modules())
    assert not any(isinstance(m, nn.Conv1d) for m in img.modules())
    assert any(isinstance(m, nn.Conv1d) for m in vec.modules())
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in vec.modules())


def test_downsampling_adapts_to_size():
    def pools(shape):
        return sum(isinstance(m, nn.MaxPool2d) for m in _build("vgg_small", shape).modules())

    assert pools((1, 8, 8)) == 2  # 8 -> 4 -> 2, third pool skipped
    assert pools((1, 28, 28)) == 3
    assert pools((3, 32, 32)) == 3
    # non-square images work too
    model = _build("resnet_small", (3, 12, 20))
    assert model(torch.randn(2, 3, 12, 20)).shape == (2, NUM_CLASSES)


def test_smallest_accepted_input():
    for arch in ARCHS:
        for shape in [(1, 4, 4), (4,)]:
            model = _build(arch, shape)
            model.eval()
            assert model(torch.randn(2, *shape)).shape == (2, NUM_CLASSES)


def test_wrong_input_tensor_shape_raises():
    model = _build("cnn_small", (1, 28, 28))
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError):
        model.features(torch.randn(1, 28, 28))


# --- heterogeneity --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_archs_are_genuinely_different(shape):
    summaries = [model_summary(a, shape, NUM_CLASSES) for a in ARCHS]
    params = [s["params"] for s in summaries]
    flops = [s["flops"] for s in summaries]
    assert len(set(params)) == len(ARCHS), dict(zip(ARCHS, params))
    assert len(set(flops)) == len(ARCHS), dict(zip(ARCHS, flops))
    if len(shape) == 3 and shape[-1] >= 28:
        # vgg_small is the big "server" model
        assert max(summaries, key=lambda s: s["flops"])["arch"] == "vgg_small"
    feature_dims = {a: _build(a, shape).feature_dim for a in ARCHS}
    assert len(set(feature_dims.values())) >= 3


def test_model_summary_keeps_caller_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model_summary("vgg_small", (1, 8, 8), NUM_CLASSES)
    assert torch.equal(torch.rand(3), expected)


# --- errors ---------------------------------------------------------------------------------

def test_unknown_name():
    with pytest.raises(ValueError) as err:
        build_model("resnet152", (1, 28, 28), 10)
    msg = str(err.value)
    assert "resnet152" in msg and all(a in msg for a in ARCHS)
    with pytest.raises(ValueError, match="resnet152"):
        model_summary("resnet152", (1, 28, 28), 10)


@pytest.mark.parametrize("arch", CONV_ARCHS)
@pytest.mark.parametrize("shape", [(1, 3, 3), (3, 32, 2), (3,)])
def test_too_small_input(arch, shape):
    with pytest.raises(ValueError) as err:
        build_model(arch, shape, 10)
    msg = str(err.value)
    assert arch in msg and str(shape) in msg and "at least 4" in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_rank_and_num_classes(arch):
    for shape in [(28, 28), (1, 1, 28, 28), ()]:
        with pytest.raises(ValueError) as err:
            build_model(arch, shape, 10)
        assert arch in str(err.value) and str(shape) in str(err.value)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(arch, (1, 28, 28), 1)
    with pytest.raises(ValueError):
        build_model(arch, (1, 0, 28), 10)
