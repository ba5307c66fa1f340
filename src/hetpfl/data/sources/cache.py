"""The decoded-array cache: ``.npz`` files of decoded train/test arrays in ``HETPFL_CACHE_DIR``.

The cache key covers the dataset name, a format version, a loader-specific ``extra`` string and
each source file's name, size and a SHA-256 of its whole content, so replacing or changing a file
anywhere invalidates the cache (SHA-256 runs at about 1.5 GB/s: some 15 ms for the 20 MB CIFAR-10
image archive; a file's mtime is not part of the key, so a copy that keeps the bytes keeps the cache).

A cache file is used only when it holds what decoding produces: the four arrays, 1-D integer
labels as many as the inputs, train and test samples of one shape, and, when the loader gives a
:class:`DecodedLayout`, its sample shape, dtypes and label range. A corrupt cache file, or one that
does not match (stale), is ignored with a warning and the files are decoded again; an unwritable
cache folder only warns.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetpfl.data.sources.base import DatasetFormatError, resolve_cache_dir

__all__ = ["DecodedLayout", "cache_path", "cached_decode"]

_CACHE_FORMAT = 1  # bump when the decoded layout changes
_HASH_CHUNK_BYTES = 1 << 20
_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class DecodedLayout:
    """What a loader's ``decode()`` returns: the shape of one sample of ``x_*``, the dtypes of
    ``x_*`` and ``y_*``, and the number of classes (labels lie in ``0..num_classes - 1``)."""

    sample_shape: tuple[int, ...]
    x_dtype: np.dtype
    y_dtype: np.dtype
    num_classes: int


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return f"{path.name}:{st.st_size}:{h.hexdigest()}"


def cache_path(name: str, files: Sequence[Path], extra: str = "") -> Path:
    """The cache file of dataset ``name`` decoded from ``files`` (``extra``: loader variant)."""
    h = hashlib.sha256()
    h.update(f"{name}|v{_CACHE_FORMAT}|{extra}".encode())
    for f in files:
        h.update(b"|" + _file_fingerprint(f).encode())
    return resolve_cache_dir() / f"{name}-{h.hexdigest()[:16]}.npz"


def _layout_problem(arrays: Mapping[str, np.ndarray], layout: DecodedLayout | None) -> str | None:
    """Why ``arrays`` are not what decoding produces (None: they are). Reads the labels, not the inputs."""
    missing = [k for k in _ARRAY_KEYS if k not in arrays]
    if missing:
        return f"no arrays {missing}"
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            return f"{split} inputs of shape {x.shape} and labels of shape {y.shape} (expected N inputs, N labels)"
        if not np.issubdtype(y.dtype, np.integer):
            return f"{split} labels of dtype {y.dtype} (expected integers)"
        if layout is not None:
            if x.shape[1:] != tuple(layout.sample_shape) or x.dtype != layout.x_dtype:
                return (f"{split} samples of shape {x.shape[1:]} {x.dtype} (decoding gives "
                        f"{tuple(layout.sample_shape)} {np.dtype(layout.x_dtype)})")
            if y.dtype != layout.y_dtype:
                return f"{split} labels of dtype {y.dtype} (decoding gives {np.dtype(layout.y_dtype)})"
            if y.size and (int(y.min()) < 0 or int(y.max()) >= layout.num_classes):
                bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
                return f"{split} label {bad} outside 0..{layout.num_classes - 1}"
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:] or arrays["x_train"].dtype != arrays["x_test"].dtype:
        return (f"train samples {arrays['x_train'].shape[1:]} {arrays['x_train'].dtype} but test samples "
                f"{arrays['x_test'].shape[1:]} {arrays['x_test'].dtype}")
    return None


def _load_cache(path: Path, layout: DecodedLayout | None = None) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAY_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        # a corrupt or partial cache file: decode again
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None
    problem = _layout_problem(arrays, layout)
    if problem is not None:
        # well-formed, but not what decoding gives (written by hand or by another version): decode again
        warnings.warn(f"ignoring stale cache file {path}: {problem}; decoding again", stacklevel=3)
        return None
    return arrays


def _save_cache(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{k: arrays[k] for k in _ARRAY_KEYS})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    except OSError as exc:
        warnings.warn(
            f"could not write the decoded-data cache {path} ({exc}); set HETPFL_CACHE_DIR to a "
            "writable folder to make later loads fast",
            stacklevel=3,
        )
        return False


def cached_decode(
    name: str,
    files: Sequence[Path],
    decode: Callable[[], dict[str, np.ndarray]],
    *,
    use_cache: bool,
    extra: str = "",
    layout: DecodedLayout | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """Decoded arrays from the cache when valid, else from ``decode()`` (then cached).

    Returns the arrays (keys ``x_train, y_train, x_test, y_test``) and a note for the origin
    text saying which cache file was read or written (empty without the cache). ``layout`` is what
    ``decode()`` gives; a cache file that does not match it is stale, and arrays that ``decode()``
    returns but do not match it raise :class:`DatasetFormatError` naming ``files`` (nothing is cached).
    """
    if use_cache:
        path = cache_path(name, files, extra)
        arrays = _load_cache(path, layout)
        if arrays is not None:
            return arrays, f" (decoded cache {path})"
    arrays = decode()
    problem = _layout_problem(arrays, layout)
    if problem is not None:
        where = ", ".join(str(f) for f in files) or "its generator"
        raise DatasetFormatError(f"{name}: decoding {where} gave {problem}")
    if not use_cache:
        return arrays, ""
    note = f" (cached to {path})" if _save_cache(path, arrays) else ""
    return arrays, note
