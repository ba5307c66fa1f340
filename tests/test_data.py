"""Tests of hetpfl.data: partitions, the federated split and the dataset sources (no real data)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import random
import struct
import sys
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import hetpfl.data.federated as federated_mod
import hetpfl.data.sources.download as download_mod
import hetpfl.data.sources.idx as idx_mod
from hetpfl.data.public import PublicLabelsWithheld
from hetpfl.data import (
    DATASETS,
    PARTITIONERS,
    ArrayDataset,
    DatasetFormatError,
    DatasetUnavailableError,
    FederatedData,
    Partition,
    PublicSet,
    build_federated_data,
    dataset_info,
    load_dataset,
    partition_labels,
    read_idx,
    resolve_cache_dir,
    resolve_data_dir,
)
from hetpfl.configuration import ConfigError
from hetpfl.rng import numpy_rng


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own cache dir and an empty data dir (never the user's real folders)."""
    monkeypatch.setenv("HETPFL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HETPFL_DATA_DIR", str(tmp_path / "no-data-here"))


def _labels(n: int = 3000, c: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, n).astype(np.int64)


def _balanced_labels(per_class: int = 300, c: int = 10, seed: int = 0) -> np.ndarray:
    return (
        np.random.default_rng(seed).permutation(np.repeat(np.arange(c), per_class)).astype(np.int64)
    )


def _names_all(exc: pytest.ExceptionInfo, *parts: str) -> None:
    """The error message names every one of ``parts`` (where, the bad key, the allowed ones)."""
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    for part in parts:
        assert part in msg, (part, msg)


def _check_exact_cover(part: Partition, n: int, num_clients: int) -> None:
    assert len(part.client_indices) == num_clients
    for ix in part.client_indices:
        assert ix.dtype == np.int64
        assert np.all(np.diff(ix) > 0), "indices must be sorted and unique"
    allix = np.concatenate(part.client_indices)
    assert allix.size == n, "every sample assigned exactly once"
    assert np.array_equal(np.sort(allix), np.arange(n))


def _same(a: Partition, b: Partition) -> bool:
    return len(a.client_indices) == len(b.client_indices) and all(
        np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices)
    )


SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3}),
    ("shards", {"classes_per_client": 2}),
    ("cosmos", {"num_groups": 5, "alpha": 5.0, "mix_fraction": 0.1}),
    ("quantity_skew", {"alpha": 0.5}),
]


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------


def test_registry_names():
    assert set(PARTITIONERS) == {"iid", "dirichlet", "shards", "cosmos", "quantity_skew"}


@pytest.mark.parametrize("scheme,params", SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 7, 25])
def test_partition_exact_cover(scheme, params, num_clients):
    y = _labels()
    if scheme == "cosmos" and num_clients < 5:
        params = dict(params, num_groups=1)
    part = partition_labels(scheme, y, num_clients, numpy_rng(1, "t"), **params)
    _check_exact_cover(part, y.size, num_clients)
    if scheme == "cosmos":
        assert part.groups is not None and part.groups.shape == (num_clients,)
    else:
        assert part.groups is None


@pytest.mark.parametrize("scheme,params", SCHEMES)
def test_partition_deterministic(scheme, params):
    y = _labels()
    a = partition_labels(scheme, y, 20, numpy_rng(5, "p"), **params)
    b = partition_labels(scheme, y, 20, numpy_rng(5, "p"), **params)
    c = partition_labels(scheme, y, 20, numpy_rng(6, "p"), **params)
    assert _same(a, b)
    assert not _same(a, c)
    if a.groups is not None:
        assert np.array_equal(a.groups, b.groups)


def test_iid_equal_sizes_and_mixed_labels():
    y = _balanced_labels()
    part = partition_labels("iid", y, 7, numpy_rng(0, "iid"))
    sizes = part.sizes()
    assert sizes.max() - sizes.min() <= 1
    for ix in part.client_indices:
        assert np.unique(y[ix]).size == 10


@pytest.mark.parametrize("alpha", [0.01, 0.001])
@pytest.mark.parametrize("num_clients,min_size", [(100, 10), (150, 13), (40, 50)])
def test_dirichlet_min_size_always_holds(alpha, num_clients, min_size):
    y = _labels(n=2000)
    t0 = time.perf_counter()
    part = partition_labels(
        "dirichlet", y, num_clients, numpy_rng(0, "d"), alpha=alpha, min_size=min_size
    )
    assert time.perf_counter() - t0 < 5.0
    _check_exact_cover(part, y.size, num_clients)
    assert part.sizes().min() >= min_size


def test_dirichlet_repair_path_without_retries():
    y = _labels(n=1000)
    part = partition_labels(
        "dirichlet", y, 50, numpy_rng(3, "d"), alpha=0.05, min_size=20, max_retries=0
    )
    _check_exact_cover(part, y.size, 50)
    assert np.all(part.sizes() == 20)  # 50 * 20 = 1000: the repair must hit the bound exactly


def test_dirichlet_default_min_size_and_skew():
    y = _labels(n=5000)
    part = partition_labels("dirichlet", y, 30, numpy_rng(0, "d"), alpha=0.05)
    assert part.sizes().min() >= 10  # default min(10, n // num_clients)
    low = np.mean([np.unique(y[ix]).size for ix in part.client_indices])
    part_hi = partition_labels("dirichlet", y, 30, numpy_rng(0, "d"), alpha=1000.0)
    high = np.mean([np.unique(y[ix]).size for ix in part_hi.client_indices])
    assert low < 5 and high == 10


def test_dirichlet_min_size_too_large():
    with pytest.raises(ValueError, match=r"min_size=50") as exc:
        partition_labels("dirichlet", _labels(n=1000), 30, numpy_rng(0), alpha=1.0, min_size=50)
    assert "1000" in str(exc.value)


def test_shards_classes_per_client():
    y = _balanced_labels(per_class=300)
    for k in (1, 2, 3):
        part = partition_labels("shards", y, 50, numpy_rng(0, "s"), classes_per_client=k)
        _check_exact_cover(part, y.size, 50)
        ncls = np.array([np.unique(y[ix]).size for ix in part.client_indices])
        assert ncls.max() <= k + 1 and ncls.mean() <= k + 0.3
        sizes = part.sizes()
        assert sizes.max() - sizes.min() <= k


def test_cosmos_groups_and_no_mixing_purity():
    y = _balanced_labels(per_class=200)
    part = partition_labels(
        "cosmos", y, 25, numpy_rng(0, "c"), num_groups=5, alpha=5.0, mix_fraction=0.0
    )
    _check_exact_cover(part, y.size, 25)
    assert np.array_equal(np.bincount(part.groups), [5] * 5)
    for i, ix in enumerate(part.client_indices):
        g = part.groups[i]
        assert set(np.unique(y[ix])) <= {2 * g, 2 * g + 1}, "before mixing only the group's classes"
        assert ix.size > 0


def test_cosmos_uneven_groups():
    y = _labels(n=3000, c=10)
    part = partition_labels("cosmos", y, 23, numpy_rng(0, "c"), num_groups=3, mix_fraction=0.0)
    counts = np.bincount(part.groups)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 23
    class_groups = [{0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9}]  # consecutive ids, as equal as possible
    for i, ix in enumerate(part.client_indices):
        assert set(np.unique(y[ix])) <= class_groups[part.groups[i]]


@pytest.mark.parametrize("mix", [0.1, 0.3])
def test_cosmos_mixing_fraction(mix):
    y = _balanced_labels(per_class=1000)
    G = 5
    part = partition_labels(
        "cosmos", y, 25, numpy_rng(0, "c"), num_groups=G, alpha=5.0, mix_fraction=mix
    )
    _check_exact_cover(part, y.size, 25)
    foreign = []
    for i, ix in enumerate(part.client_indices):
        g = part.groups[i]
        own = np.isin(y[ix], [2 * g, 2 * g + 1])
        foreign.append(int((~own).sum()))
        # a client keeps (1 - mix) of its own samples and gets ~mix * n / K pooled samples
        assert own.mean() > 1 - mix - 0.1
    expected = mix * (1 - 1 / G)  # pooled samples come from the other groups with prob (G-1)/G
    assert abs(sum(foreign) / y.size - expected) < 0.02
    # the pool is dealt evenly: each client receives about mix * n / K samples
    assert min(foreign) > 0


def test_quantity_skew_sizes_vary_labels_iid():
    y = _balanced_labels(per_class=500)
    part = partition_labels("quantity_skew", y, 10, numpy_rng(0, "q"), alpha=0.5, min_size=20)
    sizes = part.sizes()
    assert sizes.min() >= 20 and sizes.max() > 3 * sizes.min()
    big = part.client_indices[int(np.argmax(sizes))]
    share = np.bincount(y[big], minlength=10) / big.size
    assert np.abs(share - 0.1).max() < 0.05


BAD_PARAMS = [
    ("dirichlet", 5, {"alpha": 0}, "alpha", "0"),
    ("dirichlet", 5, {"alpha": -1.5}, "alpha", "-1.5"),
    ("dirichlet", 5, {"alpha": float("nan")}, "alpha", "nan"),
    ("quantity_skew", 5, {"alpha": 0.0}, "alpha", "0.0"),
    ("cosmos", 5, {"alpha": -2.0}, "alpha", "-2.0"),
    ("iid", 0, {}, "num_clients", "0"),
    ("dirichlet", -3, {"alpha": 1.0}, "num_clients", "-3"),
    ("iid", 101, {}, "num_clients", "101"),
    ("shards", 5, {"classes_per_client": 0}, "classes_per_client", "0"),
    ("shards", 5, {"classes_per_client": 30}, "classes_per_client", "30"),
    ("cosmos", 5, {"mix_fraction": 1.5}, "mix_fraction", "1.5"),
    ("cosmos", 5, {"mix_fraction": -0.1}, "mix_fraction", "-0.1"),
    ("cosmos", 5, {"num_groups": 0}, "num_groups", "0"),
    ("cosmos", 20, {"num_groups": 11}, "num_groups", "11"),
    ("cosmos", 3, {"num_groups": 5}, "num_clients", "3"),
    ("dirichlet", 5, {"min_size": 30}, "min_size", "30"),
    ("iid", 2.5, {}, "num_clients", "2.5"),
]


@pytest.mark.parametrize("scheme,num_clients,params,pname,pval", BAD_PARAMS)
def test_invalid_params_raise_valueerror(scheme, num_clients, params, pname, pval):
    y = _labels(n=100)
    with pytest.raises(ValueError) as exc:
        partition_labels(scheme, y, num_clients, numpy_rng(0), **params)
    msg = str(exc.value)
    assert pname in msg and pval in msg, msg
    assert "allowed" in msg or "required" in msg or "needed" in msg


def test_unknown_scheme_and_param():
    y = _labels(n=100)
    with pytest.raises(ValueError, match="nope") as exc:
        partition_labels("nope", y, 3, numpy_rng(0))
    assert "dirichlet" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        partition_labels("dirichlet", y, 3, numpy_rng(0), beta=1.0)
    _names_all(exc, "partitions.dirichlet", "beta", "unknown parameter", "alpha, max_retries, min_size")
    with pytest.raises(ConfigError) as exc:
        partition_labels("iid", y, 3, numpy_rng(0), alpha=1.0)
    _names_all(exc, "partitions.iid", "alpha", "unknown parameter", "none")


# --------------------------------------------------------------------------------------------
# Federated split
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gauss():
    return load_dataset("gaussian", num_classes=6, dim=8, n_train=3000, n_test=1200, seed=1)


def test_federated_public_disjoint_and_balanced(gauss):
    fd = build_federated_data(
        gauss,
        num_clients=12,
        scheme="dirichlet",
        seed=0,
        public_fraction=0.2,
        partition_params={"alpha": 0.3},
    )
    pub = fd.public_indices
    allc = np.concatenate(fd.train_indices)
    assert np.intersect1d(pub, allc).size == 0
    assert np.unique(allc).size == allc.size
    assert np.array_equal(np.sort(np.concatenate([pub, allc])), np.arange(len(gauss.train)))
    per_class = np.bincount(gauss.train.y, minlength=6)
    assert np.array_equal(
        np.bincount(gauss.train.y[pub], minlength=6), np.floor(per_class * 0.2 + 0.5)
    )
    assert np.array_equal(fd.public.inputs, gauss.train.x[pub])
    assert np.array_equal(fd.public.labels_for_evaluation(), gauss.train.y[pub])
    for i, ds in enumerate(fd.client_train):
        assert np.array_equal(ds.y, gauss.train.y[fd.train_indices[i]])
        assert np.array_equal(ds.x, gauss.train.x[fd.train_indices[i]])
    assert fd.label_counts().shape == (12, 6)
    assert fd.label_counts().sum() == allc.size
    assert fd.num_clients == 12


def test_federated_public_size_exact(gauss):
    fd = build_federated_data(gauss, num_clients=5, scheme="iid", seed=3, public_size=103)
    assert len(fd.public) == 103
    counts = np.bincount(fd.public.labels_for_evaluation(), minlength=6)
    assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="public_size"):
        build_federated_data(gauss, num_clients=5, scheme="iid", seed=3, public_size=10**6)
    with pytest.raises(ValueError, match="public_fraction"):
        build_federated_data(gauss, num_clients=5, scheme="iid", seed=3, public_fraction=1.0)


def test_federated_test_split_follows_train(gauss):
    fd = build_federated_data(
        gauss,
        num_clients=10,
        scheme="shards",
        seed=0,
        public_fraction=0.1,
        partition_params={"classes_per_client": 2},
    )
    counts = fd.label_counts()
    alltest = np.concatenate(fd.test_indices)
    assert np.unique(alltest).size == alltest.size, "client test sets are disjoint"
    assert np.array_equal(np.sort(alltest), np.arange(len(gauss.test))), "they cover the test split"
    assert len(fd.global_test) == len(gauss.test)
    for i, ds in enumerate(fd.client_test):
        assert np.array_equal(ds.y, gauss.test.y[fd.test_indices[i]])
        tcounts = np.bincount(ds.y, minlength=6)
        assert np.all(tcounts[counts[i] == 0] == 0), "no test samples of classes a client lacks"
    # expected share of class-c test samples going to client i is counts[i,c] / counts[:,c].sum()
    tc = np.stack([np.bincount(ds.y, minlength=6) for ds in fd.client_test])
    expected = counts / counts.sum(axis=0, keepdims=True) * np.bincount(gauss.test.y, minlength=6)
    assert np.abs(tc - expected).max() < 6 * np.sqrt(expected.max()) + 1


def test_federated_test_distribution_matches_train_dirichlet(gauss):
    fd = build_federated_data(
        gauss, num_clients=6, scheme="dirichlet", seed=2, partition_params={"alpha": 0.5}
    )
    counts = fd.label_counts()
    for i, ds in enumerate(fd.client_test):
        if len(ds) < 80:
            continue
        p_train = counts[i] / counts[i].sum()
        p_test = np.bincount(ds.y, minlength=6) / len(ds)
        assert 0.5 * np.abs(p_train - p_test).sum() < 0.15


def test_federated_max_train_samples_stratified(gauss):
    fd = build_federated_data(
        gauss, num_clients=4, scheme="iid", seed=0, max_train_samples=600, public_fraction=0.25
    )
    used = np.concatenate(fd.train_indices + [fd.public_indices])
    assert used.size == 600
    assert np.array_equal(np.bincount(gauss.train.y[used], minlength=6), [100] * 6)
    assert len(fd.public) == 150


def test_federated_deterministic(gauss):
    kw = {
        "num_clients": 8,
        "scheme": "cosmos",
        "public_fraction": 0.2,
        "partition_params": {"num_groups": 3, "alpha": 1.0},
    }
    a = build_federated_data(gauss, seed=4, **kw)
    b = build_federated_data(gauss, seed=4, **kw)
    c = build_federated_data(gauss, seed=5, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a.train_indices, b.train_indices))
    assert all(np.array_equal(x, y) for x, y in zip(a.test_indices, b.test_indices))
    assert np.array_equal(a.public_indices, b.public_indices)
    assert not np.array_equal(a.public_indices, c.public_indices)
    assert not all(np.array_equal(x, y) for x, y in zip(a.train_indices, c.train_indices))
    assert np.array_equal(a.client_groups, [0, 1, 2, 0, 1, 2, 0, 1])
    text = a.describe()
    assert "gaussian" in text and "8 clients" in text and "cosmos" in text


def test_public_set_hides_labels(gauss):
    fd = build_federated_data(gauss, num_clients=3, scheme="iid", seed=0, public_fraction=0.1)
    ps = fd.public
    assert isinstance(ps, PublicSet)
    public_attrs = [a for a in dir(ps) if not a.startswith("_")]
    assert sorted(public_attrs) == ["has_labels", "inputs", "labels_for_evaluation", "without_labels"]
    assert not hasattr(ps, "__dict__")
    assert not hasattr(ps, "labels") and not hasattr(ps, "y")
    assert not ps.inputs.flags.writeable
    with pytest.raises(ValueError):
        ps.inputs[0, 0] = 1.0
    assert "label" not in repr(ps).lower()
    ps2 = pickle.loads(pickle.dumps(ps))
    assert np.array_equal(ps2.inputs, ps.inputs) and not ps2.inputs.flags.writeable
    assert np.array_equal(ps2.labels_for_evaluation(), ps.labels_for_evaluation())
    empty = build_federated_data(gauss, num_clients=3, scheme="iid", seed=0)
    assert len(empty.public) == 0 and empty.public.inputs.shape == (0, 8)
    # what a prepared run holds: the same inputs, no labels at all (not hidden: absent)
    bare = ps.without_labels()
    assert ps.has_labels and not bare.has_labels and bare.inputs is ps.inputs
    with pytest.raises(PublicLabelsWithheld, match="holds no labels"):
        bare.labels_for_evaluation()
    assert not pickle.loads(pickle.dumps(bare)).has_labels


def test_federated_audit_catches_overlap(gauss, monkeypatch):
    def bad_partition(scheme, labels, num_clients, rng, **params):
        n = len(labels)
        return Partition([np.arange(n, dtype=np.int64), np.array([0], dtype=np.int64)])

    monkeypatch.setattr(federated_mod, "partition_labels", bad_partition)
    with pytest.raises(AssertionError, match="audit"):
        build_federated_data(gauss, num_clients=2, scheme="iid", seed=0, public_fraction=0.1)


def test_federated_bad_arguments(gauss):
    with pytest.raises(ValueError, match="num_clients=0"):
        build_federated_data(gauss, num_clients=0, scheme="iid", seed=0)
    with pytest.raises(ValueError, match="bogus"):
        build_federated_data(gauss, num_clients=2, scheme="bogus", seed=0)
    with pytest.raises(ValueError, match="alpha"):
        build_federated_data(
            gauss, num_clients=2, scheme="dirichlet", seed=0, partition_params={"alpha": -1}
        )


def test_federated_digits_cosmos():
    src = load_dataset("digits")
    fd = build_federated_data(
        src,
        num_clients=10,
        scheme="cosmos",
        seed=0,
        public_fraction=0.2,
        partition_params={"num_groups": 5},
    )
    assert isinstance(fd, FederatedData)
    assert fd.input_shape == (1, 8, 8)
    assert np.array_equal(np.bincount(fd.client_groups), [2] * 5)
    assert sum(len(d) for d in fd.client_train) + len(fd.public) == len(src.train)


# --------------------------------------------------------------------------------------------
# Sources: packaged and generated
# --------------------------------------------------------------------------------------------


def test_digits_shapes_ranges_split():
    src = load_dataset("digits")
    assert src.name == "digits" and src.input_shape == (1, 8, 8) and src.num_classes == 10
    assert src.train.x.shape[1:] == (1, 8, 8) and src.train.x.dtype == np.float32
    assert src.train.y.dtype == np.int64
    assert len(src.train) + len(src.test) == 1797
    assert abs(len(src.test) / 1797 - 0.2) < 0.01
    assert 0.0 <= src.train.x.min() and src.train.x.max() <= 1.0 and src.train.x.max() == 1.0
    ratio = np.bincount(src.test.y) / np.bincount(src.train.y)
    assert np.abs(ratio - 0.25).max() < 0.02, "stratified"
    again = load_dataset("digits")
    assert np.array_equal(again.test.y, src.test.y) and np.array_equal(again.train.x, src.train.x)
    assert "scikit-learn" in src.origin
    assert len(src.class_names) == 10


def test_gaussian_dataset():
    src = load_dataset("gaussian")
    assert src.input_shape == (16,) and src.num_classes == 4
    assert len(src.train) == 800 and len(src.test) == 400
    assert np.array_equal(np.bincount(src.train.y), [200] * 4)
    src2 = load_dataset(
        "gaussian", num_classes=3, dim=5, n_train=90, n_test=30, separation=8.0, seed=2
    )
    assert src2.train.x.shape == (90, 5) and src2.num_classes == 3
    means = np.stack([src2.train.x[src2.train.y == c].mean(0) for c in range(3)])
    pred = np.argmin(((src2.test.x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == src2.test.y).mean() > 0.95
    assert np.array_equal(load_dataset("gaussian").train.x, src.train.x)
    assert not np.array_equal(load_dataset("gaussian", seed=1).train.x, src.train.x)
    with pytest.raises(ConfigError) as exc:
        load_dataset("gaussian", colour=1)
    _names_all(
        exc, "datasets.gaussian", "colour", "unknown option",
        "dim, n_test, n_train, num_classes, seed, separation",
    )
    with pytest.raises(ConfigError) as exc:
        load_dataset("gaussian", cache=False)  # nothing is cached for generated mixtures
    _names_all(exc, "datasets.gaussian", "cache", "unknown option")


def test_unknown_dataset_name():
    with pytest.raises(ValueError) as exc:
        load_dataset("imagenet")
    msg = str(exc.value)
    assert "imagenet" in msg and all(name in msg for name in DATASETS)
    with pytest.raises(ValueError, match="imagenet"):
        dataset_info("imagenet")


def test_dataset_name_aliases():
    assert load_dataset("Gaussian").name == "gaussian"
    assert dataset_info("fashion-mnist")["name"] == "fashion_mnist"


def test_resolve_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("HETPFL_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("HETPFL_DATA_DIR")
    assert resolve_data_dir() == Path.home() / ".cache" / "hetpfl" / "data"
    monkeypatch.setenv("HETPFL_CACHE_DIR", str(tmp_path / "c"))
    assert resolve_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HETPFL_CACHE_DIR")
    assert resolve_cache_dir() == Path.home() / ".cache" / "hetpfl" / "decoded"


def test_array_dataset_subset():
    ds = ArrayDataset(np.arange(12, dtype=np.float64).reshape(6, 2), np.array([0, 1, 2, 0, 1, 2]))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and len(ds) == 6
    sub = ds.subset(np.array([4, 1]))
    assert np.array_equal(sub.y, [1, 1]) and np.array_equal(sub.x, [[8, 9], [2, 3]])
    with pytest.raises(ValueError):
        ArrayDataset(np.zeros((3, 2)), np.zeros(4, dtype=np.int64))


def test_mnist1d_generated_and_cached():
    pytest.importorskip("mnist1d")
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    src = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], np_state), "global NumPy RNG untouched"
    assert random.getstate() == py_state
    assert src.input_shape == (40,) and src.num_classes == 10
    assert src.train.x.shape == (4000, 40) and src.test.x.shape == (1000, 40)
    assert set(np.unique(src.train.y)) == set(range(10))
    assert "cached to" in src.origin
    again = load_dataset("mnist1d")
    assert "decoded cache" in again.origin
    assert np.array_equal(again.train.x, src.train.x)
    small = load_dataset("mnist1d", num_samples=500)
    assert len(small.train) == 400


def test_mnist1d_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(DatasetUnavailableError, match="pip install mnist1d"):
        load_dataset("mnist1d", cache=False)


# --------------------------------------------------------------------------------------------
# Sources: file formats (tiny fake files)
# --------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return gzip.compress(header + arr.tobytes())


def _fake_idx_files(n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte.gz": _idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx_bytes(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte.gz": _idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx_bytes(np.arange(n_test) % 10),
    }


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_idx_roundtrip_and_corrupt_files(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.gz"
    good.write_bytes(_idx_bytes(arr))
    assert np.array_equal(read_idx(good), arr)
    raw = gzip.decompress(good.read_bytes())
    plain = tmp_path / "plain-idx"
    plain.write_bytes(raw)
    assert np.array_equal(read_idx(plain), arr)

    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(raw[:-5]))
    bad_magic = tmp_path / "magic.gz"
    bad_magic.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
    bad_gzip = tmp_path / "badgzip.gz"
    bad_gzip.write_bytes(good.read_bytes()[:20])
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    for path in (truncated, bad_magic, bad_gzip, tiny):
        with pytest.raises(DatasetFormatError) as exc:
            read_idx(path)
        assert isinstance(exc.value, ValueError)
        assert str(path) in str(exc.value)
    with pytest.raises(DatasetFormatError, match="dimensions"):
        read_idx(good, expected_ndim=1)


def test_mnist_from_folder_and_cache(tmp_path):
    files = _fake_idx_files()
    _write_files(tmp_path / "data" / "mnist", files)
    src = load_dataset("mnist", tmp_path / "data", download=False)
    assert src.train.x.shape == (30, 1, 28, 28) and src.test.x.shape == (10, 1, 28, 28)
    raw = read_idx(tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz")
    assert np.allclose(src.train.x[:, 0], raw / 255.0)
    assert np.array_equal(src.train.y, np.arange(30) % 10)
    assert "cached to" in src.origin
    cached = load_dataset("mnist", tmp_path / "data", download=False)
    assert "decoded cache" in cached.origin
    assert np.array_equal(cached.train.x, src.train.x)
    info = dataset_info("mnist", tmp_path / "data")
    assert info["found"] and Path(info["cache_path"]).is_file()
    # replacing a file invalidates the cache
    _write_files(tmp_path / "data" / "mnist", _fake_idx_files(seed=1))
    fresh = load_dataset("mnist", tmp_path / "data", download=False)
    assert "cached to" in fresh.origin and not np.array_equal(fresh.train.x, src.train.x)
    # a corrupt file gives a clear error
    (tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="t10k-labels"):
        load_dataset("mnist", tmp_path / "data", download=False)


def test_fashion_mnist_alternative_folder(tmp_path):
    _write_files(tmp_path / "fashion_mnist", _fake_idx_files())
    src = load_dataset("fashion_mnist", tmp_path, download=False, cache=False)
    assert src.name == "fashion_mnist" and len(src.train) == 30
    assert src.class_names[0] == "t-shirt/top"


@pytest.mark.parametrize(
    "name,folder", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist"), ("cifar10", "cifar10")]
)
def test_missing_dataset_without_download(name, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HETPFL_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DatasetUnavailableError) as exc:
        load_dataset(name, download=False)
    msg = str(exc.value)
    assert "HETPFL_DATA_DIR" in msg and "--data-dir" in msg
    assert str(tmp_path / "empty" / folder) in msg
    assert "download=False" in msg
    info = dataset_info(name)
    assert info["found"] is False and "HETPFL_DATA_DIR" in info["how_to_provide"]
    assert info["download_urls"] and info["files"]
    for key in (
        "name",
        "input_shape",
        "num_classes",
        "files",
        "found",
        "origin",
        "cache_path",
        "download_urls",
        "how_to_provide",
    ):
        assert key in info


def test_download_failure_is_unavailable_error(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(download_mod.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetUnavailableError) as exc:
        load_dataset("mnist", tmp_path, download=True)
    msg = str(exc.value)
    assert "failed" in msg and "offline" in msg and "HETPFL_DATA_DIR" in msg
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg  # where it looked
    assert calls[0][0] == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    assert calls[0][1] == 10.0
    assert not (tmp_path / "mnist").exists(), "no empty folder or .part file left behind"
    with pytest.raises(DatasetUnavailableError, match="cifar-10-python"):
        load_dataset("cifar10", tmp_path, download=True)
    assert calls[-1][0] == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    served = []

    def fake_urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[-1]
        served.append(url)
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "not found", {}, None)
        return io.BytesIO(files[name])

    monkeypatch.setattr(download_mod.urllib.request, "urlopen", fake_urlopen)
    return served


def test_download_verifies_md5(tmp_path, monkeypatch):
    files = _fake_idx_files()
    spec = idx_mod._IDX_SPECS["fashion_mnist"]
    for name, data in files.items():
        monkeypatch.setitem(spec.md5, name, hashlib.md5(data).hexdigest())
    served = _serve(monkeypatch, files)
    src = load_dataset("fashion_mnist", tmp_path, download=True)
    assert len(src.train) == 30 and len(served) == 4
    assert all(
        u.startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/") for u in served
    )
    assert sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir()) == sorted(files)
    # second load: files present, nothing downloaded
    load_dataset("fashion_mnist", tmp_path, download=True)
    assert len(served) == 4

    # checksum mismatch: temp file removed, nothing renamed into place, error raised
    monkeypatch.setitem(spec.md5, "t10k-labels-idx1-ubyte.gz", "0" * 32)
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetUnavailableError, match="MD5"):
        load_dataset("fashion_mnist", tmp_path, download=True)
    left = sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir())
    assert "t10k-labels-idx1-ubyte.gz" not in left and not any(n.endswith(".part") for n in left)


def _cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    d = {
        b"batch_label": b"fake",
        b"labels": labels,
        b"data": data,
        b"filenames": [b"x"] * len(labels),
    }
    return pickle.dumps(d, protocol=2)


def _py2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way Python 2 + NumPy 1.x wrote the canonical CIFAR-10 files
    (str keys and data, ``numpy.core.multiarray`` paths), opcode by opcode."""
    n, m = data.shape
    raw = data.astype(np.uint8).tobytes()
    arr = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", m) + b"\x86"
        b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"I00\nT" + struct.pack("<I", len(raw)) + raw + b"tb"
    )
    labs = b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    return b"\x80\x02}(U\x04data" + arr + b"U\x06labels" + labs + b"U\x0bbatch_labelU\x04fakeu."


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_cifar_pickled_batches(tmp_path):
    rng = np.random.default_rng(0)
    batches = {
        f"data_batch_{i}": rng.integers(0, 256, (4, 3072), dtype=np.uint8) for i in range(1, 6)
    }
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    test[0] = 0
    test[1] = 255
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tf:
        _add(tf, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": []}))
        for i, (name, data) in enumerate(batches.items()):
            make = _py2_cifar_batch if i % 2 == 0 else _cifar_batch  # both pickle dialects
            _add(tf, f"cifar-10-batches-py/{name}", make(data, [i, i + 1, i + 2, i + 3]))
        _add(tf, "cifar-10-batches-py/test_batch", _py2_cifar_batch(test, [9, 8, 7]))
    src = load_dataset("cifar10", tmp_path, download=False)
    assert src.train.x.shape == (20, 3, 32, 32) and src.test.x.shape == (3, 3, 32, 32)
    assert np.array_equal(src.train.y, [0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6, 4, 5, 6, 7])
    assert np.array_equal(src.test.y, [9, 8, 7])
    expected = batches["data_batch_1"].reshape(-1, 3, 32, 32) / 255.0 * 2 - 1
    assert np.allclose(src.train.x[:4], expected, atol=1e-6)
    assert np.all(src.test.x[0] == -1.0) and np.all(src.test.x[1] == 1.0)
    assert "pickled batches" in src.origin and src.class_names[0] == "airplane"

    # the extracted folder (as torchvision leaves it) is accepted too, and gives the same arrays
    other = tmp_path / "other"
    extracted = other / "cifar10" / "cifar-10-batches-py"
    extracted.mkdir(parents=True)
    with tarfile.open(folder / "cifar-10-python.tar.gz") as tf:
        for m in tf.getmembers():
            (extracted / m.name.rsplit("/", 1)[-1]).write_bytes(tf.extractfile(m).read())
    src2 = load_dataset("cifar10", other, download=False)
    assert np.array_equal(src2.train.x, src.train.x) and np.array_equal(src2.test.y, src.test.y)
    assert dataset_info("cifar10", other)["found"]


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tf:
        for i in range(1, 6):
            _add(tf, f"cifar-10-batches-py/data_batch_{i}", pickle.dumps(Evil()))
        _add(tf, "cifar-10-batches-py/test_batch", pickle.dumps(Evil()))
    with pytest.raises(DatasetFormatError, match="refusing"):
        load_dataset("cifar10", tmp_path, download=False, cache=False)


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_cifar_image_folder_archive(tmp_path):
    colors = {"airplane": (255, 0, 0), "cat": (0, 255, 0), "truck": (0, 0, 255)}
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "cifar10-jpeg-q75.tar.gz", "w:gz") as tf:
        # deliberately out of order: the reader sorts by class id, then file name
        for split, names in (
            ("train", ["0002.jpg", "0000.jpg", "0001.jpg"]),
            ("test", ["0000.jpg"]),
        ):
            for cls in ("truck", "cat", "airplane"):
                for n in names:
                    _add(tf, f"{split}/{cls}/{n}", _jpeg(colors[cls]))
                    _add(tf, f"{split}/{cls}/._{n}", b"macOS resource fork, not an image")
        _add(tf, "README.txt", b"ignored")
    src = load_dataset("cifar10", tmp_path, download=False)
    assert src.train.x.shape == (9, 3, 32, 32) and src.test.x.shape == (3, 3, 32, 32)
    assert np.array_equal(src.train.y, [0, 0, 0, 3, 3, 3, 9, 9, 9])
    assert np.array_equal(src.test.y, [0, 3, 9])
    red = src.train.x[0].mean(axis=(1, 2))
    assert red[0] > 0.95 and red[1] < -0.95 and red[2] < -0.95
    blue = src.test.x[2].mean(axis=(1, 2))
    assert blue[2] > 0.95 and blue[0] < -0.95
    assert "image-folder archive" in src.origin and "cached to" in src.origin
    again = load_dataset("cifar10", tmp_path, download=False)
    assert "decoded cache" in again.origin and np.array_equal(again.train.x, src.train.x)
    info = dataset_info("cifar10", tmp_path)
    assert info["found"] and info["origin"].endswith("cifar10-jpeg-q75.tar.gz")


def test_cifar_image_archive_unknown_class(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "imgs.tar.gz", "w:gz") as tf:
        _add(tf, "train/unicorn/0000.jpg", _jpeg((1, 2, 3)))
    with pytest.raises(DatasetFormatError, match="unicorn"):
        load_dataset("cifar10", tmp_path, download=False, cache=False)


def test_unwritable_cache_only_warns(tmp_path, monkeypatch):
    _write_files(tmp_path / "mnist", _fake_idx_files())
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so no folder can be made below it")
    monkeypatch.setenv("HETPFL_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="HETPFL_CACHE_DIR"):
        src = load_dataset("mnist", tmp_path, download=False)
    assert len(src.train) == 30


def test_real_dataset_options_rejected(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_dataset("mnist", tmp_path, download=False, resize=32)
    _names_all(exc, "datasets.mnist", "resize", "unknown option", "cache")
    with pytest.raises(ConfigError) as exc:
        load_dataset("digits", cache=False)
    _names_all(exc, "datasets.digits", "cache", "unknown option", "none")


def test_download_into_unwritable_folder(tmp_path, monkeypatch):
    def must_not_be_called(url, timeout=None):
        raise AssertionError("no download should start")

    monkeypatch.setattr(download_mod.urllib.request, "urlopen", must_not_be_called)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DatasetUnavailableError, match="not writable") as exc:
        load_dataset("mnist", blocker, download=True)
    assert "HETPFL_DATA_DIR" in str(exc.value)
