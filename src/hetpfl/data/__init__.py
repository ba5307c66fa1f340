"""Data layer: dataset sources, label partitions and the federated split.

* :mod:`hetpfl.data.sources`: the dataset registry :data:`DATASETS` (one :class:`DatasetSpec`
  each), :func:`load_dataset` and friends (real datasets from local files or canonical downloads,
  plus packaged/generated ones), as :class:`DatasetSource`.
* :mod:`hetpfl.data.partition`: :func:`partition_labels` with the schemes in :data:`PARTITIONERS`.
* :mod:`hetpfl.data.schedule`: drift schedules (:data:`DRIFT_SCHEMES`): task ids and per-round
  client views.
* :mod:`hetpfl.data.shift`: feature-shift client groups (:data:`FEATURE_SHIFTS`: rotated or
  inverted images per group).
* :mod:`hetpfl.data.federated`: :func:`build_federated_data` -> :class:`FederatedData`.

NumPy only: no torch here.
"""

from hetpfl.data.federated import FederatedData, PublicSet, build_federated_data
from hetpfl.data.partition import PARTITIONERS, Partition, partition_labels
from hetpfl.data.schedule import DRIFT_SCHEMES, ClassIncremental, DriftSchedule, make_drift_schedule
from hetpfl.data.shift import FEATURE_SHIFTS, FeatureShift, check_feature_shift
from hetpfl.data.sources import (
    CIFAR10_CLASSES,
    DATASETS,
    INPUT_KINDS,
    ArrayDataset,
    DatasetFormatError,
    DatasetSource,
    DatasetSpec,
    DatasetUnavailableError,
    dataset_info,
    dataset_spec,
    load_dataset,
    read_cifar10_python_tar,
    read_idx,
    read_image_folder_tar,
    resolve_cache_dir,
    resolve_data_dir,
)

#: What ``data.dataset`` may name: a registered dataset, or ``hetvqa`` (hetpfl's multi-modal benchmark,
#: :mod:`hetpfl.data.hetvqa`, whose federated view comes from a scenario file, not a partition).
HETVQA = "hetvqa"
DATASET_NAMES: tuple[str, ...] = (*DATASETS, HETVQA)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "HETVQA",
    "DATASETS",
    "DRIFT_SCHEMES",
    "FEATURE_SHIFTS",
    "INPUT_KINDS",
    "PARTITIONERS",
    "ArrayDataset",
    "ClassIncremental",
    "DatasetFormatError",
    "DatasetSource",
    "DatasetSpec",
    "DatasetUnavailableError",
    "DriftSchedule",
    "FeatureShift",
    "FederatedData",
    "Partition",
    "PublicSet",
    "build_federated_data",
    "check_feature_shift",
    "dataset_info",
    "dataset_spec",
    "load_dataset",
    "make_drift_schedule",
    "partition_labels",
    "read_cifar10_python_tar",
    "read_idx",
    "read_image_folder_tar",
    "resolve_cache_dir",
    "resolve_data_dir",
]
