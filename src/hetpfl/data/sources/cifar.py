"""CIFAR-10: the canonical pickled batches, their extracted folder, or an image-folder archive.

Sources, in order of preference: ``<data_dir>/cifar10/cifar-10-python.tar.gz`` (or
``<data_dir>/cifar-10-python.tar.gz``), the extracted ``cifar-10-batches-py/`` folder, then
image-folder archives in ``<data_dir>/cifar10/`` such as ``cifar10-jpeg-q75.tar.gz``
(``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``). Pixels / 255, then normalized per channel
with mean 0.5 and std 0.5, i.e. ``x = (p / 255 - 0.5) / 0.5`` lies in ``[-1, 1]``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from .base import ArrayDataset, DatasetFormatError, DatasetSource, DatasetUnavailableError, resolve_cache_dir, to_float32
from .cache import DecodedLayout, cache_path, cached_decode
from .download import download as _download

__all__ = [
    "CIFAR10_CLASSES",
    "cifar10_info",
    "load_cifar10",
    "read_cifar10_python_tar",
    "read_image_folder_tar",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_CIFAR_FOLDER = "cifar10"
_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_IMAGE_ARCHIVE = "cifar10-jpeg-q75.tar.gz"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


# --------------------------------------------------------------------------------------------
# Pickled batches
# --------------------------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts but refuses any global other than NumPy array rebuilding."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def _unpickle_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DatasetFormatError(f"cannot unpickle CIFAR batch {where}: {exc}") from exc
    if not isinstance(d, dict):
        raise DatasetFormatError(f"CIFAR batch {where} is not a dict")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DatasetFormatError(
            f"CIFAR batch {where} lacks 'data' or 'labels' (keys: {sorted(d)})"
        )
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"CIFAR batch {where}: data shape {data.shape} / {labels.shape[0]} labels "
            "(expected (N, 3072) and N labels)"
        )
    return data.reshape(-1, 3, 32, 32), labels


_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_EXTRACTED = "cifar-10-batches-py"


def read_cifar10_python_tar(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the canonical ``cifar-10-python.tar.gz`` (data_batch_1..5, test_batch) as uint8 arrays.

    ``path`` may also be the extracted ``cifar-10-batches-py`` folder. Only NumPy array
    reconstruction is allowed while unpickling (no arbitrary code from a tampered file).
    """
    path = Path(path)
    wanted = list(_CIFAR_BATCHES)
    raw: dict[str, bytes] = {}
    if path.is_dir():
        for w in wanted:
            if (path / w).is_file():
                raw[w] = (path / w).read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base in wanted:
                        fh = tf.extractfile(m)
                        assert fh is not None
                        raw[base] = fh.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DatasetFormatError(f"corrupt CIFAR-10 archive {path}: {exc}") from exc
    missing = [w for w in wanted if w not in raw]
    if missing:
        raise DatasetFormatError(f"CIFAR-10 archive {path} lacks the batches {missing}")
    parts = [_unpickle_batch(raw[w], f"{path}:{w}") for w in wanted[:5]]
    xte, yte = _unpickle_batch(raw["test_batch"], f"{path}:test_batch")
    return {
        "x_train": np.concatenate([p[0] for p in parts]),
        "y_train": np.concatenate([p[1] for p in parts]),
        "x_test": xte,
        "y_test": yte,
    }


# --------------------------------------------------------------------------------------------
# Image-folder archives
# --------------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def _decode_image(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetFormatError(f"cannot decode image {where}: {exc}") from exc
    if arr.shape != (32, 32, 3):
        raise DatasetFormatError(f"image {where} has shape {arr.shape}, expected 32x32 RGB")
    return arr


def _open_checked(path: Path) -> BinaryIO:
    """``path`` opened for reading, decompressed when gzip, bzip2 or xz: these readers raise
    ``EOFError`` on a stream cut short and ``OSError`` on a bad checksum."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_image_folder_tar(
    path: str | os.PathLike, class_names: Sequence[str] = CIFAR10_CLASSES
) -> dict[str, np.ndarray]:
    """Read an image-folder archive (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).

    Class id = index of ``<class>`` in ``class_names``; within a split, samples are ordered by
    class id, then by file name. Returns uint8 arrays shaped (N, 3, H, W).
    """
    path = Path(path)
    index = {c: i for i, c in enumerate(class_names)}
    items: dict[str, list[tuple[int, str, bytes]]] = {"train": [], "test": []}
    try:
        with _open_checked(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if len(parts) < 3 or parts[-3] not in items:
                    continue
                split, cls, fname = parts[-3], parts[-2], parts[-1]
                if fname.startswith(".") or not fname.lower().endswith(_IMAGE_SUFFIXES):
                    continue  # e.g. macOS "._x.jpg" resource forks, README files
                if cls not in index:
                    raise DatasetFormatError(
                        f"{path}: unknown class folder {cls!r} in {m.name} (allowed: {list(class_names)})"
                    )
                fh = tf.extractfile(m)
                assert fh is not None
                items[split].append((index[cls], fname, fh.read()))
            # read the compressed stream to its end marker: a cut that falls between two members
            # would otherwise look like the end of the archive (and silently drop the rest)
            while raw.read(1 << 20):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetFormatError(f"corrupt image archive {path}: {exc}") from exc
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        entries = sorted(items[split], key=lambda e: (e[0], e[1]))
        if not entries:
            raise DatasetFormatError(f"image archive {path} has no {split}/<class>/<image> files")
        x = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
        for i, (cid, fname, data) in enumerate(entries):
            x[i] = _decode_image(data, f"{path}:{split}/{class_names[cid]}/{fname}")
        out[f"x_{split}"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        out[f"y_{split}"] = np.array([e[0] for e in entries], dtype=np.int64)
    return out


# --------------------------------------------------------------------------------------------
# Locating, loading and describing CIFAR-10
# --------------------------------------------------------------------------------------------


def _cifar_candidates(data_dir: Path) -> list[Path]:
    """Existing CIFAR-10 sources: canonical tarball first, then its extracted folder, then
    image-folder archives."""
    found: list[Path] = []
    for p in (data_dir / _CIFAR_FOLDER / _CIFAR_TARBALL, data_dir / _CIFAR_TARBALL):
        if p.is_file():
            found.append(p)
    for p in (data_dir / _CIFAR_FOLDER / _CIFAR_EXTRACTED, data_dir / _CIFAR_EXTRACTED):
        if p.is_dir() and all((p / b).is_file() for b in _CIFAR_BATCHES):
            found.append(p)
    folder = data_dir / _CIFAR_FOLDER
    if folder.is_dir():
        preferred = folder / _CIFAR_IMAGE_ARCHIVE
        if preferred.is_file():
            found.append(preferred)
        for p in sorted(folder.iterdir()):
            if (
                p.is_file()
                and p.name.endswith(_ARCHIVE_SUFFIXES)
                and p.name != _CIFAR_TARBALL
                and p != preferred
            ):
                found.append(p)
    return found


def _cifar_how_to(data_dir: Path) -> str:
    return (
        f"How to provide cifar10: put {_CIFAR_TARBALL} (the canonical pickled batches, or its "
        f"extracted {_CIFAR_EXTRACTED}/ folder) or an "
        f"image-folder archive such as {_CIFAR_IMAGE_ARCHIVE} (train/<class>/*.jpg, "
        f"test/<class>/*.jpg) into the folder {data_dir / _CIFAR_FOLDER}, or point the data "
        f"folder elsewhere with the environment variable HETPFL_DATA_DIR or the --data-dir option "
        f"(data_dir= argument) so that <data_dir>/{_CIFAR_FOLDER}/ holds it. With internet access, "
        f"load_dataset('cifar10', download=True) fetches {_CIFAR_URL}"
    )


def _cifar_fingerprint_files(src: Path) -> list[Path]:
    return [src / b for b in _CIFAR_BATCHES] if src.is_dir() else [src]


def _is_python_tarball(path: Path) -> bool:
    if path.name == _CIFAR_TARBALL or path.is_dir():
        return True
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.name.rsplit("/", 1)[-1] == "data_batch_1":
                    return True
                if m.isfile():
                    return False
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return False
    return False


def _decoder(src: Path) -> tuple[str, Any]:
    """What ``src`` holds (``pickled batches`` or ``image-folder archive``) and how to decode it."""
    if _is_python_tarball(src):
        return "pickled batches", lambda: read_cifar10_python_tar(src)
    return "image-folder archive", lambda: read_image_folder_tar(src, CIFAR10_CLASSES)


# what both readers give: uint8 pixels (N, 3, 32, 32), int64 labels
_CIFAR_LAYOUT = DecodedLayout((3, 32, 32), np.dtype(np.uint8), np.dtype(np.int64), 10)


def load_cifar10(data_dir: Path, download: bool, use_cache: bool) -> DatasetSource:
    """Load CIFAR-10 from the first source found in ``data_dir`` (downloading when allowed)."""
    how_to = _cifar_how_to(data_dir)
    candidates = _cifar_candidates(data_dir)
    if not candidates:
        looked = (
            f"{data_dir / _CIFAR_FOLDER / _CIFAR_TARBALL}, {data_dir / _CIFAR_TARBALL}, "
            f"{data_dir / _CIFAR_FOLDER / _CIFAR_EXTRACTED}/, "
            f"{data_dir / _CIFAR_FOLDER}/*.tar.gz (image-folder archive)"
        )
        missing = f"cifar10 files not found: looked for {looked}"
        if not download:
            raise DatasetUnavailableError(
                f"{missing}; download=False, so nothing was downloaded.\n{how_to}"
            )
        dest = data_dir / _CIFAR_FOLDER / _CIFAR_TARBALL
        _download(_CIFAR_URL, dest, _CIFAR_MD5, how_to=f"{missing}.\n{how_to}")
        candidates = [dest]
    src = candidates[0]
    kind, decode = _decoder(src)
    files = _cifar_fingerprint_files(src)
    arrays, note = cached_decode("cifar10", files, decode, use_cache=use_cache, extra=kind, layout=_CIFAR_LAYOUT)
    # pixels / 255, then per-channel (x - 0.5) / 0.5  ==  pixels * (2/255) - 1, in [-1, 1]
    scale = np.float32(2.0 / 255.0)
    return DatasetSource(
        name="cifar10",
        input_shape=(3, 32, 32),
        num_classes=10,
        train=ArrayDataset(to_float32(arrays["x_train"], scale, 1.0), arrays["y_train"]),
        test=ArrayDataset(to_float32(arrays["x_test"], scale, 1.0), arrays["y_test"]),
        class_names=CIFAR10_CLASSES,
        origin=f"{src} ({kind}){note}",
    )


def cifar10_info(data_dir: Path) -> dict[str, Any]:
    """The file-specific part of ``dataset_info`` for ``cifar10``."""
    cands = _cifar_candidates(data_dir)
    path: Path = resolve_cache_dir()
    if cands:
        kind, _ = _decoder(cands[0])
        path = cache_path("cifar10", _cifar_fingerprint_files(cands[0]), kind)
    return {
        "files": [
            str(data_dir / _CIFAR_FOLDER / _CIFAR_TARBALL),
            str(data_dir / _CIFAR_FOLDER / _CIFAR_IMAGE_ARCHIVE),
        ],
        "found": bool(cands),
        "origin": str(cands[0]) if cands else None,
        "cache_path": str(path),
        "download_urls": [_CIFAR_URL],
        "how_to_provide": _cifar_how_to(data_dir),
    }
