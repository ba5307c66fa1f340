"""Containers, errors and folders shared by every dataset source.

:class:`ArrayDataset` (inputs, labels and optional task ids of one split) and
:class:`DatasetSource` (a whole dataset: train and test splits plus what they are) are the types
every loader returns; :func:`resolve_data_dir` and :func:`resolve_cache_dir` say where files are
read from and where decoded arrays are cached.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # numpy 2 moved its C core; 1.26 (the oldest we take) has it at numpy.core
    from numpy._core import multiarray as _numpy_multiarray
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _numpy_multiarray

__all__ = [
    "DIGIT_CLASSES",
    "INPUT_KINDS",
    "ArrayDataset",
    "DatasetFormatError",
    "DatasetSource",
    "DatasetUnavailableError",
    "infer_input_kind",
    "resolve_cache_dir",
    "resolve_data_dir",
]

INPUT_KINDS: tuple[str, ...] = ("image", "vector", "tokens")
"""What a sample's input is: ``image`` ``(C, H, W)`` floats, ``vector`` ``(D,)`` floats, or
``tokens`` ``(L,)`` int64 token ids."""

DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))


# --------------------------------------------------------------------------------------------
# Containers and errors
# --------------------------------------------------------------------------------------------


def _int64_ids(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as a 1-D int64 array (it must hold integers; an empty array may be any dtype)."""
    if values.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {values.shape}")
    if values.dtype != np.int64:
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
        values = values.astype(np.int64)
    return values


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """One split: inputs ``x`` (shape ``(N, *input_shape)``), labels ``y`` (int64, ``(N,)``) and
    optional task ids ``task`` (int64, ``(N,)``, or None when the data has no tasks).

    The dtype of ``x`` says what the inputs are: floating-point inputs (images, vectors, already
    normalized) are kept as float32 (other float dtypes are cast); INTEGER inputs are token ids
    and are kept as int64 (never cast to float). Boolean inputs count as floats (0.0 / 1.0).
    ``task[i]`` is the task (an index into ``FederatedData.tasks``) sample ``i`` belongs to.
    """

    x: np.ndarray
    y: np.ndarray
    task: np.ndarray | None = None

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        if np.issubdtype(x.dtype, np.integer):
            if x.dtype != np.int64:
                x = x.astype(np.int64)  # token ids
        elif x.dtype != np.float32:
            x = x.astype(np.float32)
        y = _int64_ids(np.asarray(self.y), "labels")
        if x.ndim < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0] if x.ndim else 0} rows but y has {y.shape[0]}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        if self.task is not None:
            task = _int64_ids(np.asarray(self.task), "task ids")
            if task.shape[0] != y.shape[0]:
                raise ValueError(f"task has {task.shape[0]} entries but y has {y.shape[0]}")
            if task.size and int(task.min()) < 0:
                raise ValueError(f"task ids must be >= 0, got {int(task.min())}")
            object.__setattr__(self, "task", task)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def is_tokens(self) -> bool:
        """Whether the inputs are integer token ids."""
        return self.x.dtype == np.int64

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """The samples at positions ``idx`` (a copy, task ids included), in the order given."""
        idx = np.asarray(idx, dtype=np.int64)
        task = None if self.task is None else self.task[idx]
        return ArrayDataset(self.x[idx], self.y[idx], task)

    def __repr__(self) -> str:
        extra = "" if self.task is None else f", tasks={np.unique(self.task).size}"
        kind = ", tokens" if self.is_tokens else ""
        return f"ArrayDataset(n={len(self)}, x_shape={tuple(self.x.shape[1:])}{kind}{extra})"


def infer_input_kind(x: np.ndarray, input_shape: tuple[int, ...]) -> str:
    """``tokens`` for integer inputs, else ``vector`` for 1-D samples, else ``image``."""
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        return "tokens"
    return "vector" if len(input_shape) == 1 else "image"


@dataclass(frozen=True, eq=False)
class DatasetSource:
    """A whole dataset: train and test splits plus what they are and where they came from.

    ``input_kind`` (one of :data:`INPUT_KINDS`) comes from the dataset's registry entry; left
    empty, it is inferred from the train inputs (:func:`infer_input_kind`). ``tokens`` and integer
    inputs go together.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train: ArrayDataset
    test: ArrayDataset
    class_names: tuple[str, ...]
    origin: str
    input_kind: str = ""
    value_range: tuple[float, float] | None = None  # bounds of the normalized inputs (None: unbounded)

    def __post_init__(self) -> None:
        kind = self.input_kind or infer_input_kind(self.train.x, tuple(self.input_shape))
        if kind not in INPUT_KINDS:
            raise ValueError(
                f"dataset {self.name!r}: unknown input_kind {kind!r}; allowed: {', '.join(INPUT_KINDS)}"
            )
        for split in (self.train, self.test):
            if (kind == "tokens") != split.is_tokens:
                raise ValueError(
                    f"dataset {self.name!r}: input_kind {kind!r} does not match inputs of dtype "
                    f"{split.x.dtype} (token inputs are integers, other kinds floats)"
                )
        object.__setattr__(self, "input_kind", kind)

    def __repr__(self) -> str:
        return (
            f"DatasetSource({self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={len(self.train)}, test={len(self.test)}, "
            f"origin={self.origin!r})"
        )


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are not on disk and could not (or were not allowed to) be downloaded."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt or not in the expected format."""


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """numpy's arrays made within: without its ``madvise(MADV_HUGEPAGE)`` hint (numpy gives it every
    large array by default). Under the kernel's ``defrag=madvise`` setting (this machine's) a hinted
    array's first touch waits on memory compaction: converting MNIST's 70,000 images to float32 took
    0.9 s with the hint and 0.3 s without (docs/performance.md). Arrays made here are only read
    afterwards, where huge pages would help little. A no-op where numpy lacks the switch."""
    switch = getattr(_numpy_multiarray, "_set_madvise_hugepage", None)
    if switch is None:
        yield
        return
    before = switch(False)
    try:
        yield
    finally:
        switch(before)


def to_float32(u8: np.ndarray, scale: np.float32, shift: float = 0.0) -> np.ndarray:
    """``u8 * scale - shift`` computed in float32 (pixel bytes to normalized inputs)."""
    out = np.multiply(u8, scale, dtype=np.float32)
    if shift:
        out -= np.float32(shift)
    return out


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$HETPFL_DATA_DIR``, else ``~/.cache/hetpfl/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("HETPFL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/hetpfl/data").expanduser()


def resolve_cache_dir() -> Path:
    """The decoded-array cache folder: ``$HETPFL_CACHE_DIR``, else ``~/.cache/hetpfl/decoded``."""
    env = os.environ.get("HETPFL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/hetpfl/decoded").expanduser()
