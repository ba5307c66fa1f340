"""Dataset sources: read real datasets from local files (or download them), or generate small ones.

Every loader returns a :class:`DatasetSource` holding a train and a test :class:`ArrayDataset`
(float32 inputs, already normalized, or int64 token ids; int64 labels). Every dataset is one
:class:`DatasetSpec` in :data:`DATASETS` (module :mod:`.registry`).

Where data comes from
---------------------
* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 images), pixels / 16, split 80/20
  stratified by a fixed stream (the split never depends on the run seed).
* ``mnist`` / ``fashion_mnist``: the four IDX gzip files in ``<data_dir>/mnist/`` or
  ``<data_dir>/fashion-mnist/`` (``fashion_mnist/`` is accepted too), pixels / 255.
* ``cifar10``: ``<data_dir>/cifar10/cifar-10-python.tar.gz`` (the canonical pickled batches) or an
  image-folder archive such as ``<data_dir>/cifar10/cifar10-jpeg-q75.tar.gz``
  (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``). Pixels / 255, then normalized per channel
  with mean 0.5 and std 0.5, i.e. ``x = (p / 255 - 0.5) / 0.5`` lies in ``[-1, 1]``.
* ``mnist1d``: generated locally by the ``mnist1d`` package (``make_dataset``; never downloads).
* ``gaussian``: a synthetic Gaussian mixture for tests.

``data_dir`` is the argument, else the environment variable ``HETPFL_DATA_DIR``, else
``~/.cache/hetpfl/data``. Decoded arrays of the file-based datasets (and mnist1d) are cached as
``.npz`` files in ``HETPFL_CACHE_DIR`` (default ``~/.cache/hetpfl/decoded``), because the data
folder may be read-only. The cache key covers the dataset name and each source file's name, size
and a hash of its whole content, so any change to a file invalidates the cache; a cache whose
arrays are not what decoding makes (shapes, dtypes, label range) is ignored and decoded again.

Missing files are downloaded from the canonical hosts (with MD5 verification) only when
``download=True``; offline, a :class:`DatasetUnavailableError` says what to put where.

Modules: :mod:`.base` (containers, errors, folders), :mod:`.cache` (decoded-array cache),
:mod:`.download` (MD5-verified downloads), :mod:`.idx` (IDX, MNIST, Fashion-MNIST), :mod:`.cifar`
(CIFAR-10), :mod:`.generated` (digits, mnist1d, gaussian), :mod:`.registry` (the registry).
"""

from hetpfl.data.sources.base import (
    INPUT_KINDS,
    ArrayDataset,
    DatasetFormatError,
    DatasetSource,
    DatasetUnavailableError,
    resolve_cache_dir,
    resolve_data_dir,
)
from hetpfl.data.sources.cifar import CIFAR10_CLASSES, read_cifar10_python_tar, read_image_folder_tar
from hetpfl.data.sources.idx import read_idx
from hetpfl.data.sources.registry import DATASETS, DatasetSpec, dataset_info, dataset_spec, load_dataset

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "INPUT_KINDS",
    "ArrayDataset",
    "DatasetFormatError",
    "DatasetSource",
    "DatasetSpec",
    "DatasetUnavailableError",
    "dataset_info",
    "dataset_spec",
    "load_dataset",
    "read_cifar10_python_tar",
    "read_idx",
    "read_image_folder_tar",
    "resolve_cache_dir",
    "resolve_data_dir",
]
