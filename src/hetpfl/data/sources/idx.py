"""The IDX file format and the two datasets stored in it: MNIST and Fashion-MNIST.

Files: the four IDX gzip files in ``<data_dir>/mnist/`` or ``<data_dir>/fashion-mnist/`` (the
other accepted folders are listed in :data:`_IDX_SPECS`; uncompressed twins are accepted too).
Pixels / 255 as float32, shape ``(N, 1, 28, 28)``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import DIGIT_CLASSES, ArrayDataset, DatasetFormatError, DatasetSource, DatasetUnavailableError
from .base import resolve_cache_dir, to_float32
from .cache import DecodedLayout, cache_path, cached_decode
from .download import download as _download

__all__ = ["idx_info", "load_idx_dataset", "read_idx"]

FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@dataclass(frozen=True)
class _IdxSpec:
    name: str
    folders: tuple[str, ...]  # candidate sub-folders of data_dir; the first is the download target
    base_url: str
    md5: dict[str, str]
    class_names: tuple[str, ...]


_IDX_SPECS: dict[str, _IdxSpec] = {
    "mnist": _IdxSpec(
        name="mnist",
        folders=("mnist", "MNIST/raw"),
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        class_names=DIGIT_CLASSES,
    ),
    "fashion_mnist": _IdxSpec(
        name="fashion_mnist",
        folders=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        class_names=FASHION_CLASSES,
    ),
}


# --------------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------------


_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetFormatError(f"corrupt gzip file {path}: {exc}") from exc
    return raw


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or plain) into an array; validates magic number and size.

    Raises :class:`DatasetFormatError` (a ``ValueError``) naming the file when it is corrupt,
    truncated, or does not have ``expected_ndim`` dimensions.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetFormatError(f"corrupt IDX file {path}: only {len(data)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetFormatError(
            f"corrupt IDX file {path}: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000 then a type code in 08/09/0B/0C/0D/0E then the number of dimensions)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DatasetFormatError(
            f"IDX file {path} has {ndim} dimensions, expected {expected_ndim} "
            f"(magic 0x{data[:4].hex()})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"corrupt IDX file {path}: truncated header")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetFormatError(
            f"corrupt IDX file {path}: header says shape {dims} ({expected} data bytes) "
            f"but the file holds {len(data) - header} data bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)



# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _find_file(folder: Path, fname: str) -> Path | None:
    """``fname`` in ``folder``, or its uncompressed twin (without ``.gz``)."""
    for cand in (folder / fname, folder / fname[: -len(".gz")]):
        if cand.is_file():
            return cand
    return None


def _idx_how_to(spec: _IdxSpec, data_dir: Path) -> str:
    files = ", ".join(_IDX_FILES)
    urls = ", ".join(spec.base_url + f for f in _IDX_FILES)
    return (
        f"How to provide {spec.name}: put the files {files} into the folder "
        f"{data_dir / spec.folders[0]} (accepted sub-folders of the data folder: "
        f"{', '.join(spec.folders)}), or point the data folder elsewhere with the environment "
        f"variable HETPFL_DATA_DIR or the --data-dir option (data_dir= argument) so that "
        f"<data_dir>/{spec.folders[0]}/ holds them. With internet access, "
        f"load_dataset({spec.name!r}, download=True) fetches them from: {urls}"
    )


def _locate_idx(spec: _IdxSpec, data_dir: Path) -> tuple[Path, list[Path]] | None:
    for sub in spec.folders:
        folder = data_dir / sub
        found = [_find_file(folder, f) for f in _IDX_FILES]
        if all(p is not None for p in found):
            return folder, [p for p in found if p is not None]
    return None


def _decode_idx_files(files: list[Path]) -> dict[str, np.ndarray]:
    xtr, ytr, xte, yte = (read_idx(p) for p in files)
    for p, arr, nd in zip(files, (xtr, ytr, xte, yte), (3, 1, 3, 1)):
        if arr.ndim != nd or arr.dtype != np.uint8:
            raise DatasetFormatError(
                f"{p}: expected a {nd}-D uint8 IDX array, got {arr.shape} {arr.dtype}"
            )
    for p_img, p_lab, xi, yi in (
        (files[0], files[1], xtr, ytr),
        (files[2], files[3], xte, yte),
    ):
        if xi.shape[0] != yi.shape[0]:
            raise DatasetFormatError(
                f"{p_img} has {xi.shape[0]} images but {p_lab} has {yi.shape[0]} labels"
            )
        if xi.shape[1:] != (28, 28):
            raise DatasetFormatError(f"{p_img}: expected 28x28 images, got {xi.shape[1:]}")
        if yi.size and int(yi.max()) >= 10:
            raise DatasetFormatError(f"{p_lab}: label {int(yi.max())} outside 0..9")
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


_IDX_LAYOUT = DecodedLayout((28, 28), np.dtype(np.uint8), np.dtype(np.uint8), 10)  # what _decode_idx_files gives


def load_idx_dataset(name: str, data_dir: Path, download: bool, use_cache: bool) -> DatasetSource:
    """Load ``mnist`` or ``fashion_mnist`` (a key of :data:`_IDX_SPECS`) from ``data_dir``."""
    spec = _IDX_SPECS[name]
    located = _locate_idx(spec, data_dir)
    how_to = _idx_how_to(spec, data_dir)
    if located is None:
        looked = "; ".join(str(data_dir / spec.folders[0] / f) for f in _IDX_FILES)
        others = ", ".join(str(data_dir / sub) for sub in spec.folders[1:])
        missing = f"{spec.name} files not found: looked for {looked} (also in {others})"
        if not download:
            raise DatasetUnavailableError(
                f"{missing}; download=False, so nothing was downloaded.\n{how_to}"
            )
        target = data_dir / spec.folders[0]
        for fname in _IDX_FILES:
            if _find_file(target, fname) is None:
                _download(
                    spec.base_url + fname,
                    target / fname,
                    spec.md5[fname],
                    how_to=f"{missing}.\n{how_to}",
                )
        located = _locate_idx(spec, data_dir)
        assert located is not None
    folder, files = located

    arrays, note = cached_decode(
        spec.name, files, lambda: _decode_idx_files(files), use_cache=use_cache, layout=_IDX_LAYOUT
    )
    scale = np.float32(1.0 / 255.0)
    return DatasetSource(
        name=spec.name,
        input_shape=(1, 28, 28),
        num_classes=10,
        train=ArrayDataset(to_float32(arrays["x_train"], scale)[:, None], arrays["y_train"]),
        test=ArrayDataset(to_float32(arrays["x_test"], scale)[:, None], arrays["y_test"]),
        class_names=spec.class_names,
        origin=f"{folder}{note}",
    )


def idx_info(name: str, data_dir: Path) -> dict[str, Any]:
    """The file-specific part of ``dataset_info`` for ``mnist`` / ``fashion_mnist``."""
    spec = _IDX_SPECS[name]
    located = _locate_idx(spec, data_dir)
    return {
        "files": [str(data_dir / spec.folders[0] / f) for f in _IDX_FILES],
        "found": located is not None,
        "origin": str(located[0]) if located else None,
        "cache_path": str(cache_path(name, located[1]) if located else resolve_cache_dir()),
        "download_urls": [spec.base_url + f for f in _IDX_FILES],
        "how_to_provide": _idx_how_to(spec, data_dir),
    }
