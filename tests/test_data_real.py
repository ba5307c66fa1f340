"""Tests on the real datasets (MNIST, Fashion-MNIST, CIFAR-10) read from local files.

The data folder is ``$HETPFL_DATA_DIR`` (CI sets it to the shared offline copies), else
``<repo>/../shared/data``. A dataset missing there is a test FAILURE, not a skip. Nothing is
downloaded (``download=False``). The decoded cache lives in one temporary folder per test session,
so CIFAR-10 is decoded once per session.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from hetpfl.data import build_federated_data, dataset_info, load_dataset

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("HETPFL_DATA_DIR")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    assert d.is_dir(), (
        f"real data folder {d} does not exist: set HETPFL_DATA_DIR to the folder holding "
        "mnist/, fashion-mnist/ and cifar10/"
    )
    return d


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """One decoded-array cache for the whole session (restores the caller's setting afterwards)."""
    old = os.environ.get("HETPFL_CACHE_DIR")
    path = tmp_path_factory.mktemp("hetpfl-decoded-cache")
    os.environ["HETPFL_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HETPFL_CACHE_DIR", None)
    else:
        os.environ["HETPFL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def cifar10(data_dir):
    t0 = time.perf_counter()
    src = load_dataset("cifar10", data_dir, download=False)
    return src, time.perf_counter() - t0


def _check_image_dataset(src, shape, n_train, n_test, lo, hi):
    assert src.input_shape == shape and src.num_classes == 10
    assert src.train.x.shape == (n_train, *shape) and src.test.x.shape == (n_test, *shape)
    assert src.train.x.dtype == np.float32 and src.train.y.dtype == np.int64
    for split in (src.train, src.test):
        assert split.y.min() == 0 and split.y.max() == 9
        assert np.all(np.bincount(split.y, minlength=10) > 0)
    assert src.train.x.min() == pytest.approx(lo) and src.train.x.max() == pytest.approx(hi)


def test_mnist(data_dir):
    info = dataset_info("mnist", data_dir)
    assert info["found"], info["how_to_provide"]
    src = load_dataset("mnist", data_dir, download=False)
    _check_image_dataset(src, (1, 28, 28), 60000, 10000, 0.0, 1.0)
    # canonical counts of MNIST
    assert np.array_equal(
        np.bincount(src.test.y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    assert np.array_equal(
        np.bincount(src.train.y), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )
    assert abs(float(src.train.x.mean()) - 0.1307) < 1e-3
    assert str(data_dir / "mnist") in src.origin


def test_fashion_mnist(data_dir):
    src = load_dataset("fashion_mnist", data_dir, download=False)
    # the shared copy holds all 70,000 images split 60,000 / 10,000 (7,000 per class in all)
    _check_image_dataset(src, (1, 28, 28), 60000, 10000, 0.0, 1.0)
    assert np.array_equal(np.bincount(src.train.y), [6000] * 10)
    assert np.array_equal(np.bincount(src.test.y), [1000] * 10)
    assert abs(float(src.train.x.mean()) - 0.286) < 5e-3


def test_cifar10_first_load(cifar10, data_dir):
    src, seconds = cifar10
    _check_image_dataset(src, (3, 32, 32), 50000, 10000, -1.0, 1.0)
    assert np.array_equal(np.bincount(src.train.y), [5000] * 10)
    assert np.array_equal(np.bincount(src.test.y), [1000] * 10)
    # canonical per-channel means (0.4914, 0.4822, 0.4465) after (p - 0.5) / 0.5
    means = src.train.x.mean(axis=(0, 2, 3))
    assert np.allclose(means, np.array([0.4914, 0.4822, 0.4465]) * 2 - 1, atol=0.01)
    assert src.class_names[0] == "airplane" and src.class_names[9] == "truck"
    print(f"\nCIFAR-10 first load (decode): {seconds:.1f}s")


def test_cifar10_cached_load_is_fast_and_identical(cifar10, data_dir):
    first, _ = cifar10
    t0 = time.perf_counter()
    again = load_dataset("cifar10", data_dir, download=False)
    seconds = time.perf_counter() - t0
    print(f"\nCIFAR-10 cached load: {seconds:.2f}s")
    assert "decoded cache" in again.origin
    assert np.array_equal(again.train.y, first.train.y)
    assert np.array_equal(again.test.x, first.test.x)
    assert seconds < 10.0  # about 0.5 s on a laptop-class CPU; generous bound for busy CI


def test_cifar10_cosmos_federated(cifar10):
    src, _ = cifar10
    fd = build_federated_data(
        src,
        num_clients=25,
        scheme="cosmos",
        seed=0,
        public_fraction=0.2,
        partition_params={"num_groups": 5, "alpha": 5.0, "mix_fraction": 0.1},
    )
    assert len(fd.public) == 10000
    assert np.array_equal(np.bincount(fd.public.labels_for_evaluation()), [1000] * 10)
    assert sum(len(d) for d in fd.client_train) == 40000
    assert sum(len(d) for d in fd.client_test) == 10000
    assert np.array_equal(np.bincount(fd.client_groups), [5] * 5)
    counts = fd.label_counts()
    for i, g in enumerate(fd.client_groups):
        own = counts[i, 2 * g] + counts[i, 2 * g + 1]
        assert own / counts[i].sum() > 0.8
