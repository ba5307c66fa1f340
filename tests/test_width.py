"""Width-scalable architectures and width sub-models (models/width.py): width 1 is today's model,
counts follow ceil(w * c), bad widths fail clearly, and sub-models are taken out and put back at
exactly the indices the formula gives (leading channels for HeteroFL, a rolling window for FedRolex)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetpfl.models import (
    ModuleSpec,
    build_model,
    build_module,
    channel_indices,
    count_flops,
    count_parameters,
    extract_submodel,
    insert_submodel,
    model_arrays,
    submodel_index,
    submodel_shapes,
    supports_width,
    width_architectures,
)

WIDTH_ARCHS = ["cnn_small", "cnn_wide", "cnn_deep", "resnet_small", "mobilenet_small"]
SHAPES = [(1, 8, 8), (3, 32, 32), (40,)]


def _build(arch, shape, seed=0, **options):
    torch.manual_seed(seed)
    return build_model(arch, shape, 10, **options)


def _load(model, arrays):
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)


# --- width-scalable architectures -----------------------------------------------------------

def test_which_architectures_have_width():
    assert width_architectures() == WIDTH_ARCHS
    assert all(supports_width(a) for a in WIDTH_ARCHS)
    assert not any(supports_width(a) for a in ("mlp", "mlp_wide", "vgg_small"))


@pytest.mark.parametrize("arch", WIDTH_ARCHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_width_one_is_todays_model(arch, shape):
    plain, one = _build(arch, shape).state_dict(), _build(arch, shape, width=1.0).state_dict()
    assert list(plain) == list(one)
    for key in plain:
        assert plain[key].shape == one[key].shape and torch.equal(plain[key], one[key]), key


def _cnn_small_counts(w, cin, side, k=10):
    """cnn_small: conv3x3(cin→c1)+ReLU, pool, conv3x3(c1→c2)+ReLU, pool, adaptive pool to g×g
    (g = min(side // 4, 4)), FC(c2·g²→f)+ReLU, head(f→k); c = ceil(w · (16, 32, 128))."""
    c1, c2, f = math.ceil(w * 16), math.ceil(w * 32), math.ceil(w * 128)
    g = min(side // 4, 4)
    params = (cin * c1 * 9 + c1) + (c1 * c2 * 9 + c2) + (c2 * g * g * f + f) + (f * k + k)
    macs = side * side * c1 * cin * 9 + (side // 2) ** 2 * c2 * c1 * 9 + c2 * g * g * f + f * k
    return params, 2 * macs


@pytest.mark.parametrize("w", [1.0, 0.5, 0.25, 0.3])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_small_counts_follow_the_formula(w, shape):
    model = _build("cnn_small", shape, width=w)
    params, flops = _cnn_small_counts(w, shape[0], shape[1])
    assert count_parameters(model) == params
    assert count_flops(model, shape) == flops
    if w == 0.5 and shape == (1, 8, 8):  # written out: c = 8, 16, 64; 2x2 grid
        assert params == (1 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 4 * 64 + 64) + (64 * 10 + 10) == 6058


@pytest.mark.parametrize("arch", WIDTH_ARCHS)
def test_every_hidden_count_is_ceil_of_width_times_it(arch):
    model = _build(arch, (3, 32, 32))
    full, narrow = model.state_dict(), _build(arch, (3, 32, 32), width=0.3).state_dict()
    flat = {f"{name}.weight": area for name, area in model.flat_inputs.items()}
    assert list(full) == list(narrow)
    for key, value in full.items():
        for d, (c, k) in enumerate(zip(value.shape, narrow[key].shape)):
            if c in (1, 3, 10):  # depthwise fan-in, 3x3 kernels, input channels, classes: never scale
                assert k == c, (key, d)
            elif d == 1 and key in flat:  # flattened maps: whole blocks of `area` per channel
                assert k == math.ceil(0.3 * (c // flat[key])) * flat[key], (key, d)
            else:
                assert k == math.ceil(0.3 * c), (key, d)


def test_module_spec_width_builds_the_narrow_model():
    model = build_module(ModuleSpec.parse("cnn_small@0.5"), (1, 8, 8), 10)
    assert model.body[0].out_channels == 8 and model.feature_dim == 64 and model.head.out_features == 10


@pytest.mark.parametrize("arch", WIDTH_ARCHS)
@pytest.mark.parametrize("width", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_width_outside_unit_interval_fails(arch, width):
    with pytest.raises(ValueError, match=rf"architecture '{arch}': width={width!r} must be a number in \(0, 1\]"):
        build_model(arch, (1, 8, 8), 10, width=width)


@pytest.mark.parametrize("arch", ["mlp", "mlp_wide", "vgg_small"])
def test_architecture_without_width_says_so(arch):
    with pytest.raises(ValueError, match=f"architecture '{arch}' has no width support"):
        build_model(arch, (1, 8, 8), 10, width=0.5)


def test_flattened_linear_is_declared():
    model = _build("cnn_small", (1, 28, 28))
    (name, area), = model.flat_inputs.items()
    linear = dict(model.named_modules())[name]
    assert area == 16 and linear.in_features == 32 * area
    assert _build("resnet_small", (1, 8, 8)).flat_inputs == {}


# --- index sets ------------------------------------------------------------------------------

def test_leading_and_rolling_index_sets():
    assert channel_indices(16, 8).tolist() == list(range(8))
    assert channel_indices(16, 8, "leading", offset=5).tolist() == list(range(8))  # static
    assert channel_indices(16, 8, "rolling", 0).tolist() == list(range(8))
    assert channel_indices(16, 8, "rolling", 14).tolist() == [14, 15, 0, 1, 2, 3, 4, 5]
    assert channel_indices(16, 4, "rolling", -1).tolist() == [15, 0, 1, 2]
    assert channel_indices(16, 4, "rolling", 37).tolist() == [5, 6, 7, 8]
    for offset in (0, 3, -7):  # a full window is the dimension in its own order
        assert channel_indices(16, 16, "rolling", offset).tolist() == list(range(16))
    for full, sub in ((16, 8), (32, 16), (10, 3)):
        for offset in range(-40, 40):
            expected = [(offset + i) % full for i in range(sub)]
            assert channel_indices(full, sub, "rolling", offset).tolist() == expected
    with pytest.raises(ValueError, match="width mode"):
        channel_indices(16, 8, "random")
    with pytest.raises(ValueError, match="cannot be taken"):
        channel_indices(8, 16)


def test_rolling_with_minus_round_is_the_official_roll():
    """FedRolex's code: torch.roll(arange(C), t % C)[:k] in round t."""
    for full, sub in ((16, 8), (32, 8), (64, 16)):
        for t in range(70):
            official = torch.roll(torch.arange(full), t % full, -1)[:sub].tolist()
            assert channel_indices(full, sub, "rolling", -t).tolist() == official


# --- extraction and insertion ----------------------------------------------------------------

@pytest.mark.parametrize("arch", WIDTH_ARCHS)
@pytest.mark.parametrize("mode,offset", [("leading", 0), ("rolling", 0), ("rolling", -5), ("rolling", 11)])
def test_width_one_round_trip_changes_nothing(arch, mode, offset):
    model = _build(arch, (1, 8, 8))
    full = model_arrays(model)
    index = submodel_index(model, 1.0, mode, offset)
    sub = extract_submodel(full, index)
    assert list(sub) == list(full)
    for key in full:
        assert sub[key].dtype == full[key].dtype and np.array_equal(sub[key], full[key])
        assert all(np.array_equal(i, np.arange(n)) for i, n in zip(index[key], full[key].shape))
    back = insert_submodel(full, sub, index)
    assert all(np.array_equal(back[k], full[k]) for k in full)


def test_half_width_insert_touches_exactly_the_window():
    model = _build("cnn_small", (1, 8, 8))  # body: 0 conv(1→16), 3 conv(16→32), 8 fc(32·4→128); head
    full = model_arrays(model)
    offset = 5
    index = submodel_index(model, 0.5, "rolling", offset)
    sub = extract_submodel(full, index)
    back = insert_submodel(full, {k: v + 1000.0 for k, v in sub.items()}, index)
    rows16, rows32 = [(offset + i) % 16 for i in range(8)], [(offset + i) % 32 for i in range(16)]
    rows128 = [(offset + i) % 128 for i in range(64)]
    fc_cols = [c * 4 + a for c in rows32 for a in range(4)]  # whole 2x2 blocks of the selected channels
    k3 = [0, 1, 2]  # a 3x3 kernel is kept whole
    expected = {
        "body.0.weight": (rows16, [0], k3, k3), "body.0.bias": (rows16,),
        "body.3.weight": (rows32, rows16, k3, k3), "body.3.bias": (rows32,),
        "body.8.weight": (rows128, fc_cols), "body.8.bias": (rows128,),
        "head.weight": (list(range(10)), rows128), "head.bias": (list(range(10)),),
    }
    assert list(index) == list(expected)
    for key, dims in expected.items():
        assert [i.tolist() for i in index[key]] == [list(d) for d in dims], key
        mask = np.zeros(full[key].shape, dtype=bool)
        mask[np.ix_(*dims)] = True
        changed = back[key] != full[key]
        assert np.array_equal(changed, mask), key
        assert np.array_equal(back[key][mask], (full[key][np.ix_(*dims)] + 1000.0).reshape(-1))


def test_integer_buffers_travel_as_they_are():
    model = _build("resnet_small", (1, 8, 8))
    model.body[1].num_batches_tracked.fill_(7)
    full = model_arrays(model)
    index = submodel_index(model, 0.25, "rolling", 3)
    sub = extract_submodel(full, index)
    assert index["body.1.num_batches_tracked"] == ()
    assert sub["body.1.num_batches_tracked"].dtype == np.int64 and int(sub["body.1.num_batches_tracked"]) == 7
    back = insert_submodel(full, {**sub, "body.1.num_batches_tracked": np.array(9)}, index)
    assert int(back["body.1.num_batches_tracked"]) == 9


@pytest.mark.parametrize("mode,offset", [("leading", 0), ("rolling", -3), ("rolling", 13)])
def test_sub_state_loads_strictly_and_first_conv_gives_the_selected_channels(mode, offset):
    full_model = _build("cnn_small", (1, 8, 8))
    index = submodel_index(full_model, 0.5, mode, offset)
    sub_model = _build("cnn_small", (1, 8, 8), seed=1, width=0.5)
    _load(sub_model, extract_submodel(model_arrays(full_model), index))  # strict: names and shapes
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():  # conv1 computes each output channel alone: sub channel i = full channel idx[i]
        got, want = sub_model.body[0](x), full_model.body[0](x)[:, index["body.0.weight"][0]]
    assert torch.equal(got, want)
    expected_channels = [(offset + i) % 16 for i in range(8)] if mode == "rolling" else list(range(8))
    assert index["body.0.weight"][0].tolist() == expected_channels


@pytest.mark.parametrize("arch", WIDTH_ARCHS)
@pytest.mark.parametrize("mode,offset", [("leading", 0), ("rolling", -7)])
def test_full_model_with_only_the_window_computes_the_sub_model(arch, mode, offset):
    """The sub-model's entries inserted into an all-zero full state: every channel outside the
    window carries 0 (BatchNorm with zero scale, shift and statistics outputs 0), so the full
    model's logits are the sub-model's."""
    full_model, sub_model = _build(arch, (1, 8, 8)), _build(arch, (1, 8, 8), seed=2, width=0.5)
    with torch.no_grad():
        for p in sub_model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and BN shifts away from their initial values
    full = model_arrays(full_model)
    index = submodel_index(full_model, 0.5, mode, offset)
    zeros = {k: np.zeros_like(v) for k, v in full.items()}
    _load(full_model, insert_submodel(zeros, model_arrays(sub_model), index))
    full_model.eval()
    sub_model.eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(full_model(x), sub_model(x), rtol=1e-5, atol=1e-6)


def test_submodel_shapes_are_the_narrow_builds_and_leave_the_rng_alone():
    model = _build("mobilenet_small", (1, 8, 8))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    shapes = submodel_shapes(model, 0.25)
    assert torch.equal(torch.get_rng_state(), before)
    narrow = _build("mobilenet_small", (1, 8, 8), width=0.25)
    assert shapes == {k: tuple(v.shape) for k, v in narrow.state_dict().items()}


def test_insert_refuses_a_wrong_shape():
    model = _build("cnn_small", (1, 8, 8))
    full = model_arrays(model)
    index = submodel_index(model, 0.5)
    sub = extract_submodel(full, index)
    sub["body.0.bias"] = np.zeros(9, dtype=np.float32)
    with pytest.raises(ValueError, match="body.0.bias"):
        insert_submodel(full, sub, index)
