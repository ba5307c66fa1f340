"""The dataset registry: one :class:`DatasetSpec` per dataset, and the entry points over it.

Adding a dataset means writing its loader (and its ``info`` function) in a module of this package
and adding one :class:`DatasetSpec` to :data:`DATASETS`; :func:`load_dataset`,
:func:`dataset_info`, the CLI's list and the config check all read the registry.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetpfl.configuration import check_keys
from hetpfl.data.sources.base import INPUT_KINDS, DatasetSource, resolve_data_dir, small_pages
from hetpfl.data.sources.cifar import cifar10_info, load_cifar10
from hetpfl.data.sources.generated import (
    GAUSSIAN_CLASSES,
    GAUSSIAN_DIM,
    GAUSSIAN_OPTIONS,
    MNIST1D_OPTIONS,
    digits_info,
    gaussian_info,
    load_digits,
    load_gaussian,
    load_mnist1d,
    mnist1d_info,
)
from hetpfl.data.sources.idx import idx_info, load_idx_dataset

__all__ = ["DATASETS", "DatasetSpec", "dataset_info", "dataset_spec", "load_dataset"]

CACHE_OPTION = "cache"  # the option that turns the decoded-array cache off (cache=False)


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about a dataset.

    ``input_kind``: one of :data:`~hetpfl.data.sources.base.INPUT_KINDS`. ``input_shape`` and
    ``num_classes``: with the default options (an option such as gaussian's ``dim`` may change
    them; the loaded :class:`DatasetSource` has the actual values). ``options``: the option names
    :func:`load_dataset` accepts (``cache`` among them where the decoded-array cache applies).
    ``load(data_dir, download, use_cache, **options)`` returns the :class:`DatasetSource`;
    ``info(data_dir)`` returns the dataset-specific keys of :func:`dataset_info`. ``value_range``:
    the bounds of the normalized inputs (what a generator must be able to produce). ``aliases``:
    other accepted names (after lower-casing and ``-`` -> ``_``).
    """

    name: str
    input_kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    options: tuple[str, ...]
    load: Callable[..., DatasetSource]
    info: Callable[[Path], dict[str, Any]]
    aliases: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None  # the normalized inputs' bounds (None: unbounded)

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(
                f"dataset spec {self.name!r}: unknown input_kind {self.input_kind!r}; "
                f"allowed: {', '.join(INPUT_KINDS)}"
            )

    @property
    def uses_cache(self) -> bool:
        """Whether decoded arrays are cached (and ``cache=False`` is accepted)."""
        return CACHE_OPTION in self.options


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("digits", "image", (1, 8, 8), 10,
                    "scikit-learn's 8x8 digits (1,797 images), fixed stratified 80/20 split",
                    options=(), load=load_digits, info=digits_info, value_range=(0.0, 1.0)),
        DatasetSpec("mnist", "image", (1, 28, 28), 10,
                    "MNIST handwritten digits from the four IDX files (60,000 / 10,000)",
                    options=(CACHE_OPTION,), load=functools.partial(load_idx_dataset, "mnist"),
                    info=functools.partial(idx_info, "mnist"), value_range=(0.0, 1.0)),
        DatasetSpec("fashion_mnist", "image", (1, 28, 28), 10,
                    "Fashion-MNIST clothing images from the four IDX files (60,000 / 10,000)",
                    options=(CACHE_OPTION,), load=functools.partial(load_idx_dataset, "fashion_mnist"),
                    info=functools.partial(idx_info, "fashion_mnist"), aliases=("fashionmnist",),
                    value_range=(0.0, 1.0)),
        DatasetSpec("cifar10", "image", (3, 32, 32), 10,
                    "CIFAR-10 from the pickled batches or an image-folder archive, in [-1, 1]",
                    options=(CACHE_OPTION,), load=load_cifar10, info=cifar10_info, aliases=("cifar_10",),
                    value_range=(-1.0, 1.0)),
        DatasetSpec("mnist1d", "vector", (40,), 10,
                    "MNIST-1D sequences generated locally by the mnist1d package",
                    options=(*MNIST1D_OPTIONS, CACHE_OPTION), load=load_mnist1d, info=mnist1d_info),
        DatasetSpec("gaussian", "vector", (GAUSSIAN_DIM,), GAUSSIAN_CLASSES,
                    "synthetic Gaussian mixture (for tests)",
                    options=GAUSSIAN_OPTIONS, load=load_gaussian, info=gaussian_info),
    )
}

_ALIASES: dict[str, str] = {alias: spec.name for spec in DATASETS.values() for alias in spec.aliases}


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name`` (case-insensitive, ``-`` and ``_`` alike, aliases accepted).

    Raises ``ValueError`` naming the unknown name and the registered ones.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"dataset name must be a string, got {name!r}; allowed: {', '.join(DATASETS)}"
        )
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; allowed names: {', '.join(DATASETS)}")
    return DATASETS[key]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    **options: Any,
) -> DatasetSource:
    """Load dataset ``name`` (a key of :data:`DATASETS`, or an alias) as a :class:`DatasetSource`.

    ``data_dir``: folder of the real datasets (see :func:`resolve_data_dir`). ``download``: fetch
    missing files from the canonical hosts (MD5-verified). ``options``: those of the dataset's
    :attr:`DatasetSpec.options`: ``cache=False`` skips the decoded-array cache (mnist,
    fashion_mnist, cifar10, mnist1d); the gaussian dataset takes ``num_classes, dim, n_train,
    n_test, separation, seed``; mnist1d takes the keys of ``mnist1d.data.get_dataset_args``
    (e.g. ``num_samples``, ``seed``).

    Raises ``ValueError`` for an unknown name or option (a
    :class:`~hetpfl.configuration.ConfigError` naming the dataset, the option and the allowed
    ones), :class:`DatasetUnavailableError` when the files are missing and cannot be downloaded,
    :class:`DatasetFormatError` for corrupt files.
    """
    spec = dataset_spec(name)
    check_keys(f"datasets.{spec.name}", options, spec.options, what="option")
    use_cache = bool(options.pop(CACHE_OPTION, True))
    with small_pages():  # a fresh dataset array's first touch: 3x faster without huge pages here
        source = spec.load(resolve_data_dir(data_dir), download, use_cache, **options)
    if source.input_kind != spec.input_kind or source.value_range != spec.value_range:
        source = dataclasses.replace(source, input_kind=spec.input_kind, value_range=spec.value_range)
    return source


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """What dataset ``name`` needs and whether it is present, without loading it.

    Keys: ``name, input_kind, input_shape, num_classes`` (with the default options), ``data_dir``,
    ``files`` (expected paths), ``found`` (bool), ``origin`` (where it would be read from, or
    None), ``cache_path`` (the decoded-cache file, or the cache folder when not computable),
    ``download_urls``, ``how_to_provide`` (text).
    """
    spec = dataset_spec(name)
    root = resolve_data_dir(data_dir)
    info: dict[str, Any] = {
        "name": spec.name,
        "input_kind": spec.input_kind,
        "input_shape": spec.input_shape,
        "num_classes": spec.num_classes,
        "data_dir": str(root),
        "files": [],
        "found": True,
        "origin": None,
        "cache_path": None,
        "download_urls": [],
        "how_to_provide": "",
    }
    info.update(spec.info(root))
    return info
