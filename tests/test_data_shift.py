"""Feature-shift client groups (hetpfl.data.shift): rotated / inverted images per group, the
partition untouched, the public set and global test set untransformed, errors that name the key."""

from __future__ import annotations

import numpy as np
import pytest

from hetpfl.configuration import ConfigError, FieldError
from hetpfl.data import (
    FEATURE_SHIFTS,
    ArrayDataset,
    DatasetSource,
    build_federated_data,
    check_feature_shift,
    load_dataset,
)
from hetpfl.experiment import load_config, prepare


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _build(source, shift="none", groups=None, scheme="iid", seed=3, **kw):
    params = {"alpha": 0.5} if scheme == "dirichlet" else {}
    return build_federated_data(source, num_clients=10, scheme=scheme, seed=seed, public_fraction=0.1,
                                partition_params=params, feature_shift=shift, feature_shift_groups=groups, **kw)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_rotation_turns_each_clients_train_and_test_images_by_its_group(digits, scheme):
    plain, rotated = _build(digits, scheme=scheme), _build(digits, "rotate", scheme=scheme)
    assert rotated.client_groups.tolist() == [i % 4 for i in range(10)]
    assert plain.client_groups is None and plain.shift is None
    for i in range(10):
        # the partition of the seed is the same with and without the shift: only pixels differ
        assert np.array_equal(plain.train_indices[i], rotated.train_indices[i])
        assert np.array_equal(plain.test_indices[i], rotated.test_indices[i])
        for a, b in ((plain.client_train[i], rotated.client_train[i]), (plain.client_test[i], rotated.client_test[i])):
            assert np.array_equal(b.x, np.rot90(a.x, i % 4, axes=(-2, -1)))
            assert np.array_equal(b.y, a.y)
            assert b.x.flags["C_CONTIGUOUS"] and b.x.dtype == np.float32
            if i % 4:  # a real change (digits are not rotation invariant)
                assert not np.array_equal(b.x, a.x)
    # counter-clockwise by 90 degrees per group: pixel (r, c) of a 90-degree image is pixel
    # (c, W-1-r) of the original
    a, b = plain.client_train[1].x[0, 0], rotated.client_train[1].x[0, 0]
    assert b[0, 0] == a[0, -1] and b[-1, 0] == a[0, 0]
    # the public set and the global test set are untransformed
    assert np.array_equal(rotated.public.inputs, plain.public.inputs)
    assert np.array_equal(rotated.global_test.x, digits.test.x)
    assert "feature shift 'rotate' over 4 client groups" in rotated.describe()


def test_fewer_rotation_groups_and_inversion(digits):
    two = _build(digits, "rotate", groups=2)
    assert two.client_groups.tolist() == [i % 2 for i in range(10)]
    base = _build(digits)
    assert np.array_equal(two.client_train[3].x, np.rot90(base.client_train[3].x, 1, axes=(-2, -1)))
    inverted = _build(digits, "invert")
    lo, hi = float(digits.train.x.min()), float(digits.train.x.max())
    assert (lo, hi) == (0.0, 1.0)
    for i in range(10):
        expected = base.client_test[i].x if i % 2 == 0 else (lo + hi) - base.client_test[i].x
        assert np.allclose(inverted.client_test[i].x, expected)
        assert np.array_equal(inverted.client_train[i].y, base.client_train[i].y)
    assert np.array_equal(inverted.public.inputs, base.public.inputs)


def test_inversion_keeps_the_input_range():
    """Inputs in [-1, 1] (CIFAR-10's encoding) invert to [-1, 1]: v -> lo + hi - v."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (60, 3, 4, 4)).astype(np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -1.0, 1.0
    y = np.arange(60) % 3
    src = DatasetSource("toy", (3, 4, 4), 3, ArrayDataset(x, y), ArrayDataset(x[:30], y[:30]), ("a", "b", "c"), "test")
    fd = build_federated_data(src, num_clients=4, scheme="iid", seed=0, feature_shift="invert")
    assert np.allclose(fd.client_train[1].x, -src.train.x[fd.train_indices[1]])
    assert fd.client_train[1].x.min() >= -1 and fd.client_train[1].x.max() <= 1


def test_same_seed_same_shifted_data_and_drift_keeps_task_ids(digits):
    a = _build(digits, "rotate", drift={"scheme": "class_incremental", "tasks": 2, "rounds_per_task": 1})
    b = _build(digits, "rotate", drift={"scheme": "class_incremental", "tasks": 2, "rounds_per_task": 1})
    for i in range(10):
        assert np.array_equal(a.client_train[i].x, b.client_train[i].x)
        assert a.client_train[i].task is not None
        view = a.train_at(i, 0)  # the drift view of a shifted split stays shifted
        assert np.array_equal(view.x, a.client_train[i].x[a.client_train[i].task == 0])


def _names(exc: pytest.ExceptionInfo, *parts: str) -> None:
    for part in parts:
        assert part in str(exc.value), f"{part!r} not in {exc.value}"


def test_shift_that_cannot_work_fails_naming_the_key(digits):
    gauss = load_dataset("gaussian", num_classes=3, dim=8, n_train=300, n_test=60, seed=1)
    with pytest.raises(FieldError) as exc:
        _build(gauss, "rotate")
    _names(exc, "feature_shift='rotate'", "image inputs", "vector")
    with pytest.raises(FieldError) as exc:
        _build(gauss, "invert")
    _names(exc, "feature_shift='invert'", "image inputs")
    x = np.zeros((40, 1, 4, 6), np.float32)
    y = np.arange(40) % 2
    wide = DatasetSource("wide", (1, 4, 6), 2, ArrayDataset(x, y), ArrayDataset(x, y), ("a", "b"), "test")
    with pytest.raises(FieldError) as exc:
        build_federated_data(wide, num_clients=4, scheme="iid", seed=0, feature_shift="rotate")
    _names(exc, "feature_shift='rotate'", "square", "(1, 4, 6)")
    build_federated_data(wide, num_clients=4, scheme="iid", seed=0, feature_shift="invert")  # fine
    with pytest.raises(FieldError) as exc:
        _build(digits, "rotate", groups=5)
    _names(exc, "feature_shift_groups=5", "1 to 4")
    with pytest.raises(FieldError) as exc:
        _build(digits, "invert", groups=3)
    _names(exc, "feature_shift_groups=3", "1 to 2")
    with pytest.raises(FieldError) as exc:
        build_federated_data(digits, num_clients=10, scheme="cosmos", seed=0, feature_shift="rotate",
                             partition_params={"num_groups": 2})
    _names(exc, "feature_shift='rotate'", "partition 'cosmos'", "groups of its own")
    with pytest.raises(FieldError) as exc:
        check_feature_shift("blur")
    _names(exc, "feature_shift='blur'", ", ".join(FEATURE_SHIFTS))


def test_config_keys_are_checked_before_training():
    base = {"algorithm": "fedavg", "models": {"clients": ["cnn_small"]},
            "data": {"dataset": "digits", "num_clients": 8, "partition": "iid", "feature_shift": "rotate"}}
    config = load_config(base=base)
    assert (config.data.feature_shift, config.data.feature_shift_groups) == ("rotate", None)
    prepared = prepare(config)
    assert [c["group"] for c in prepared.clients] == [i % 4 for i in range(8)]
    assert prepared.run.data.client_groups.tolist() == [i % 4 for i in range(8)]
    with pytest.raises(ConfigError) as exc:
        load_config(base=base, overrides=["data.partition=cosmos"])
    _names(exc, "data.feature_shift='rotate'", "cosmos")
    with pytest.raises(ConfigError) as exc:
        load_config(base=base, overrides=["data.feature_shift_groups=6"])
    _names(exc, "data.feature_shift_groups=6")
    with pytest.raises(ConfigError) as exc:
        load_config(base=base, overrides=["data.feature_shift=mirror"])
    _names(exc, "data.feature_shift='mirror'", "none, rotate, invert")
    with pytest.raises(ConfigError) as exc:  # the inputs are only known with the data: prepare
        prepare(load_config(base=base, overrides=["data.dataset=gaussian", "models.clients=[mlp]"]))
    _names(exc, "data:", "feature_shift='rotate'", "image inputs")
