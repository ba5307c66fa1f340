"""Packaged and generated datasets: ``digits`` (scikit-learn), ``mnist1d`` and ``gaussian``.

* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 images), pixels / 16, split 80/20
  stratified by a fixed stream (the split never depends on the run seed).
* ``mnist1d``: generated locally by the ``mnist1d`` package (``make_dataset``; never downloads),
  cached like decoded files.
* ``gaussian``: a synthetic Gaussian mixture for tests.

Every loader has the registry's signature ``(data_dir, download, use_cache, **options)``; the
first three are ignored where they do not apply.
"""

from __future__ import annotations

import gzip
import importlib.util
import random
from pathlib import Path
from typing import Any

import numpy as np

from hetpfl.data.sources.base import (
    DIGIT_CLASSES,
    ArrayDataset,
    DatasetSource,
    DatasetUnavailableError,
    resolve_cache_dir,
)
from hetpfl.data.sources.cache import cached_decode
from hetpfl.rng import numpy_rng

__all__ = [
    "GAUSSIAN_OPTIONS",
    "MNIST1D_OPTIONS",
    "digits_info",
    "gaussian_info",
    "load_digits",
    "load_gaussian",
    "load_mnist1d",
    "make_gaussian",
    "mnist1d_info",
]

# --------------------------------------------------------------------------------------------
# digits (scikit-learn)
# --------------------------------------------------------------------------------------------


def load_digits(data_dir: Path, download: bool, use_cache: bool) -> DatasetSource:
    """scikit-learn's digits, pixels / 16, with a fixed stratified 80/20 split."""
    images, target = _sklearn_digits()
    x = (np.asarray(images, dtype=np.float32) / np.float32(16.0))[:, None]
    y = np.asarray(target, dtype=np.int64)
    rng = numpy_rng(0, "data", "digits", "split")  # fixed: never depends on the run seed
    test_parts = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        n_test = round(0.2 * idx.size)
        test_parts.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts))
    mask = np.ones(y.size, dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask)
    return DatasetSource(
        name="digits",
        input_shape=(1, 8, 8),
        num_classes=10,
        train=ArrayDataset(x[train_idx], y[train_idx]),
        test=ArrayDataset(x[test_idx], y[test_idx]),
        class_names=DIGIT_CLASSES,
        origin="scikit-learn digits (sklearn.datasets.load_digits), fixed stratified 80/20 split",
    )


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The images (n, 8, 8) and labels of ``sklearn.datasets.load_digits``, read from the file it reads
    (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the label a row) without importing
    scikit-learn, whose import pulls in scipy.stats (~1 s, most of a digits run's set-up). The same
    arrays (tests/test_data_registry.py); through scikit-learn where the file is not found."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((p for p in (Path(f, "datasets", "data", "digits.csv.gz") for f in folders) if p.is_file()), None)
    if path is None:
        from sklearn.datasets import load_digits as sklearn_digits  # noqa: PLC0415

        d = sklearn_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def digits_info(data_dir: Path) -> dict[str, Any]:
    return {
        "origin": "scikit-learn digits (sklearn.datasets.load_digits)",
        "how_to_provide": "Ships with scikit-learn; nothing to provide.",
    }


# --------------------------------------------------------------------------------------------
# mnist1d
# --------------------------------------------------------------------------------------------

MNIST1D_OPTIONS: tuple[str, ...] = (
    "num_samples",
    "train_split",
    "template_len",
    "padding",
    "scale_coeff",
    "max_translation",
    "corr_noise_scale",
    "iid_noise_scale",
    "shear_scale",
    "shuffle_seq",
    "final_seq_length",
    "seed",
)


def load_mnist1d(data_dir: Path, download: bool, use_cache: bool, **options: Any) -> DatasetSource:
    """Generate mnist1d with ``mnist1d.data.get_dataset_args`` updated by ``options``."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DatasetUnavailableError(
            "mnist1d needs the 'mnist1d' package, which is not installed: run `pip install mnist1d` "
            "(or `pip install hetpfl[mnist1d]`). It generates the data locally; nothing is downloaded."
        ) from exc
    args = get_dataset_args(as_dict=True)
    args.update(options)
    key = repr(sorted((k, v) for k, v in args.items() if k != "url"))

    def generate() -> dict[str, np.ndarray]:
        from mnist1d.utils import ObjectView

        # make_dataset seeds NumPy's and Python's global RNGs; restore them afterwards.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset(ObjectView(dict(args)))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {
            "x_train": np.asarray(d["x"], dtype=np.float32),
            "y_train": np.asarray(d["y"], dtype=np.int64),
            "x_test": np.asarray(d["x_test"], dtype=np.float32),
            "y_test": np.asarray(d["y_test"], dtype=np.int64),
        }

    arrays, note = cached_decode("mnist1d", [], generate, use_cache=use_cache, extra=key)
    length = int(arrays["x_train"].shape[1])
    return DatasetSource(
        name="mnist1d",
        input_shape=(length,),
        num_classes=10,
        train=ArrayDataset(arrays["x_train"], arrays["y_train"]),
        test=ArrayDataset(arrays["x_test"], arrays["y_test"]),
        class_names=DIGIT_CLASSES,
        origin=f"generated by mnist1d.make_dataset (seed={args['seed']}, "
        f"num_samples={args['num_samples']}){note}",
    )


def mnist1d_info(data_dir: Path) -> dict[str, Any]:
    try:
        import mnist1d  # noqa: F401

        found = True
    except ImportError:
        found = False
    return {
        "found": found,
        "origin": "generated by mnist1d.make_dataset" if found else None,
        "cache_path": str(resolve_cache_dir()),
        "how_to_provide": "Generated locally by the mnist1d package: `pip install mnist1d`.",
    }


# --------------------------------------------------------------------------------------------
# gaussian
# --------------------------------------------------------------------------------------------

GAUSSIAN_CLASSES = 4  # default number of classes
GAUSSIAN_DIM = 16  # default input size
GAUSSIAN_OPTIONS: tuple[str, ...] = ("num_classes", "dim", "n_train", "n_test", "separation", "seed")


def make_gaussian(
    num_classes: int = GAUSSIAN_CLASSES,
    dim: int = GAUSSIAN_DIM,
    n_train: int = 800,
    n_test: int = 400,
    separation: float = 3.0,
    seed: int = 0,
) -> DatasetSource:
    """Gaussian mixture: class means are random directions of norm ``separation``; unit noise."""
    for pname, val, lo in (
        ("num_classes", num_classes, 2),
        ("dim", dim, 1),
        ("n_train", n_train, 1),
        ("n_test", n_test, 1),
    ):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(
                f"gaussian option {pname}={val!r} is invalid: an integer >= {lo} is allowed"
            )
    if not np.isfinite(separation) or separation < 0:
        raise ValueError(
            f"gaussian option separation={separation!r} is invalid: a number >= 0 is allowed"
        )
    rng = numpy_rng(seed, "data", "gaussian", "means")
    means = rng.standard_normal((num_classes, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)

    def draw(n: int, split: str) -> ArrayDataset:
        r = numpy_rng(seed, "data", "gaussian", split)
        y = r.permutation(np.arange(n) % num_classes).astype(np.int64)
        x = means[y] + r.standard_normal((n, dim))
        return ArrayDataset(x.astype(np.float32), y)

    return DatasetSource(
        name="gaussian",
        input_shape=(int(dim),),
        num_classes=int(num_classes),
        train=draw(n_train, "train"),
        test=draw(n_test, "test"),
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        origin=f"generated (gaussian mixture, num_classes={num_classes}, dim={dim}, "
        f"separation={separation}, seed={seed})",
    )


def load_gaussian(data_dir: Path, download: bool, use_cache: bool, **options: Any) -> DatasetSource:
    """:func:`make_gaussian` with ``options`` (no files, no cache)."""
    return make_gaussian(**options)


def gaussian_info(data_dir: Path) -> dict[str, Any]:
    return {
        "origin": "generated",
        "how_to_provide": "Generated on the fly; nothing to provide (options: "
        + ", ".join(GAUSSIAN_OPTIONS)
        + ").",
    }
