"""Data layer: dataset sources, label partitions and the federated split.

* :mod:`hetpfl.data.sources`: :func:`load_dataset` and friends (real datasets from local files
  or canonical downloads, plus packaged/generated ones), as :class:`DatasetSource`.
* :mod:`hetpfl.data.partition`: :func:`partition_labels` with the schemes in :data:`PARTITIONERS`.
* :mod:`hetpfl.data.federated`: :func:`build_federated_data` -> :class:`FederatedData`.

NumPy only: no torch here.
"""

from hetpfl.data.federated import FederatedData, PublicSet, build_federated_data
from hetpfl.data.partition import PARTITIONERS, Partition, partition_labels
from hetpfl.data.sources import (
    CIFAR10_CLASSES,
    DATASETS,
    ArrayDataset,
    DatasetFormatError,
    DatasetSource,
    DatasetUnavailableError,
    dataset_info,
    load_dataset,
    read_cifar10_python_tar,
    read_idx,
    read_image_folder_tar,
    resolve_cache_dir,
    resolve_data_dir,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "PARTITIONERS",
    "ArrayDataset",
    "DatasetFormatError",
    "DatasetSource",
    "DatasetUnavailableError",
    "FederatedData",
    "Partition",
    "PublicSet",
    "build_federated_data",
    "dataset_info",
    "load_dataset",
    "partition_labels",
    "read_cifar10_python_tar",
    "read_idx",
    "read_image_folder_tar",
    "resolve_cache_dir",
    "resolve_data_dir",
]
