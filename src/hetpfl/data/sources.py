"""Dataset sources: read real datasets from local files (or download them), or generate small ones.

Every loader returns a :class:`DatasetSource` holding a train and a test :class:`ArrayDataset` of
float32 inputs (already normalized) and int64 labels.

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
and a hash of its first MiB, so replacing a file invalidates the cache.

Missing files are downloaded from the canonical hosts (with MD5 verification) only when
``download=True``; offline, a :class:`DatasetUnavailableError` says what to put where.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import random
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from hetpfl.rng import numpy_rng

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "ArrayDataset",
    "DatasetFormatError",
    "DatasetSource",
    "DatasetUnavailableError",
    "dataset_info",
    "load_dataset",
    "read_cifar10_python_tar",
    "read_idx",
    "read_image_folder_tar",
    "resolve_cache_dir",
    "resolve_data_dir",
]

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "mnist1d", "gaussian")

_CACHE_FORMAT = 1  # bump when the decoded layout changes
_DOWNLOAD_TIMEOUT_S = 10.0
_HASH_PREFIX_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# Containers and errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Inputs ``x`` (float32, shape ``(N, *input_shape)``, normalized) and labels ``y`` (int64, (N,))."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        y = np.asarray(self.y)
        if y.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {y.shape}")
        if y.dtype != np.int64:
            if y.size and not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"labels must be integers, got dtype {y.dtype}")
            y = y.astype(np.int64)
        if x.ndim < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0] if x.ndim else 0} rows but y has {y.shape[0]}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """The samples at positions ``idx`` (a copy), in the order given."""
        idx = np.asarray(idx, dtype=np.int64)
        return ArrayDataset(self.x[idx], self.y[idx])

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, x_shape={tuple(self.x.shape[1:])})"


@dataclass(frozen=True, eq=False)
class DatasetSource:
    """A whole dataset: train and test splits plus what they are and where they came from."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train: ArrayDataset
    test: ArrayDataset
    class_names: tuple[str, ...]
    origin: str

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


# --------------------------------------------------------------------------------------------
# Dataset specifications
# --------------------------------------------------------------------------------------------

_MNIST_CLASSES = tuple(str(i) for i in range(10))
_FASHION_CLASSES = (
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
        class_names=_MNIST_CLASSES,
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
        class_names=_FASHION_CLASSES,
    ),
}

_CIFAR_FOLDER = "cifar10"
_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_IMAGE_ARCHIVE = "cifar10-jpeg-q75.tar.gz"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "mnist1d": (40,),
}


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(
            f"dataset name must be a string, got {name!r}; allowed: {', '.join(DATASETS)}"
        )
    key = name.strip().lower().replace("-", "_")
    if key == "fashionmnist":
        key = "fashion_mnist"
    if key == "cifar_10":
        key = "cifar10"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; allowed names: {', '.join(DATASETS)}")
    return key


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
# Decoded-array cache
# --------------------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_HASH_PREFIX_BYTES))
    return f"{path.name}:{st.st_size}:{h.hexdigest()}"


def _cache_path(name: str, files: Sequence[Path], extra: str = "") -> Path:
    h = hashlib.sha256()
    h.update(f"{name}|v{_CACHE_FORMAT}|{extra}".encode())
    for f in files:
        h.update(b"|" + _file_fingerprint(f).encode())
    return resolve_cache_dir() / f"{name}-{h.hexdigest()[:16]}.npz"


_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in _ARRAY_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        # a corrupt or partial cache file: decode again
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None


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


def _cached_decode(
    name: str,
    files: Sequence[Path],
    decode: Callable[[], dict[str, np.ndarray]],
    *,
    use_cache: bool,
    extra: str = "",
) -> tuple[dict[str, np.ndarray], str]:
    """Decoded arrays from the cache when valid, else from ``decode()`` (then cached)."""
    if not use_cache:
        return decode(), ""
    path = _cache_path(name, files, extra)
    arrays = _load_cache(path)
    if arrays is not None:
        return arrays, f" (decoded cache {path})"
    arrays = decode()
    note = f" (cached to {path})" if _save_cache(path, arrays) else ""
    return arrays, note


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


def _download(url: str, dest: Path, md5: str, *, how_to: str = "") -> Path:
    """Download ``url`` to ``dest`` through a temp file, verify its MD5, then rename into place."""
    created = not dest.parent.exists()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    except OSError as exc:
        raise DatasetUnavailableError(
            f"cannot download {url}: the folder {dest.parent} is not writable ({exc}).\n{how_to}"
        ) from exc
    digest = hashlib.md5(usedforsecurity=False)
    try:
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp,
            ):
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            raise DatasetUnavailableError(
                f"download of {url} failed ({type(exc).__name__}: {exc}); "
                f"this machine may be offline.\n{how_to}"
            ) from exc
        got = digest.hexdigest()
        if got != md5:
            raise DatasetUnavailableError(
                f"download of {url} has MD5 {got}, expected {md5}; the file was deleted.\n{how_to}"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if created and not dest.exists():
            try:
                dest.parent.rmdir()  # leave no empty folder behind after a failed download
            except OSError:
                pass
    return dest


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


def _load_idx_dataset(
    spec: _IdxSpec, data_dir: Path, download: bool, use_cache: bool
) -> DatasetSource:
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

    def decode() -> dict[str, np.ndarray]:
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

    arrays, note = _cached_decode(spec.name, files, decode, use_cache=use_cache)
    scale = np.float32(1.0 / 255.0)
    return DatasetSource(
        name=spec.name,
        input_shape=(1, 28, 28),
        num_classes=10,
        train=ArrayDataset(_to_float(arrays["x_train"], scale)[:, None], arrays["y_train"]),
        test=ArrayDataset(_to_float(arrays["x_test"], scale)[:, None], arrays["y_test"]),
        class_names=spec.class_names,
        origin=f"{folder}{note}",
    )


def _to_float(u8: np.ndarray, scale: np.float32, shift: float = 0.0) -> np.ndarray:
    out = np.multiply(u8, scale, dtype=np.float32)
    if shift:
        out -= np.float32(shift)
    return out


# --------------------------------------------------------------------------------------------
# CIFAR-10
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
        with tarfile.open(path, "r|*") as tf:
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
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
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


def _load_cifar10(data_dir: Path, download: bool, use_cache: bool) -> DatasetSource:
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
    if _is_python_tarball(src):

        def decode() -> dict[str, np.ndarray]:
            return read_cifar10_python_tar(src)

        kind = "pickled batches"
    else:

        def decode() -> dict[str, np.ndarray]:
            return read_image_folder_tar(src, CIFAR10_CLASSES)

        kind = "image-folder archive"
    files = _cifar_fingerprint_files(src)
    arrays, note = _cached_decode("cifar10", files, decode, use_cache=use_cache, extra=kind)
    # pixels / 255, then per-channel (x - 0.5) / 0.5  ==  pixels * (2/255) - 1, in [-1, 1]
    scale = np.float32(2.0 / 255.0)
    return DatasetSource(
        name="cifar10",
        input_shape=(3, 32, 32),
        num_classes=10,
        train=ArrayDataset(_to_float(arrays["x_train"], scale, 1.0), arrays["y_train"]),
        test=ArrayDataset(_to_float(arrays["x_test"], scale, 1.0), arrays["y_test"]),
        class_names=CIFAR10_CLASSES,
        origin=f"{src} ({kind}){note}",
    )


# --------------------------------------------------------------------------------------------
# Packaged / generated datasets
# --------------------------------------------------------------------------------------------


def _load_digits() -> DatasetSource:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, dtype=np.float32) / np.float32(16.0))[:, None]
    y = np.asarray(d.target, dtype=np.int64)
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
        class_names=_MNIST_CLASSES,
        origin="scikit-learn digits (sklearn.datasets.load_digits), fixed stratified 80/20 split",
    )


_MNIST1D_OPTIONS = (
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


def _load_mnist1d(options: dict[str, Any], use_cache: bool) -> DatasetSource:
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

    arrays, note = _cached_decode("mnist1d", [], generate, use_cache=use_cache, extra=key)
    length = int(arrays["x_train"].shape[1])
    return DatasetSource(
        name="mnist1d",
        input_shape=(length,),
        num_classes=10,
        train=ArrayDataset(arrays["x_train"], arrays["y_train"]),
        test=ArrayDataset(arrays["x_test"], arrays["y_test"]),
        class_names=_MNIST_CLASSES,
        origin=f"generated by mnist1d.make_dataset (seed={args['seed']}, "
        f"num_samples={args['num_samples']}){note}",
    )


def _make_gaussian(
    num_classes: int = 4,
    dim: int = 16,
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


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

_GAUSSIAN_OPTIONS = ("num_classes", "dim", "n_train", "n_test", "separation", "seed")


def _check_options(name: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(
            f"dataset {name!r} does not take the option(s) {bad}; allowed options: "
            f"{list(allowed) if allowed else 'none'}"
        )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    **options: Any,
) -> DatasetSource:
    """Load dataset ``name`` (one of :data:`DATASETS`) as a :class:`DatasetSource`.

    ``data_dir``: folder of the real datasets (see :func:`resolve_data_dir`). ``download``: fetch
    missing files from the canonical hosts (MD5-verified). ``options``: ``cache=False`` skips the
    decoded-array cache (mnist, fashion_mnist, cifar10, mnist1d); the gaussian dataset takes
    ``num_classes, dim, n_train, n_test, separation, seed``; mnist1d takes the keys of
    ``mnist1d.data.get_dataset_args`` (e.g. ``num_samples``, ``seed``).

    Raises ``ValueError`` for an unknown name or option, :class:`DatasetUnavailableError` when the
    files are missing and cannot be downloaded, :class:`DatasetFormatError` for corrupt files.
    """
    key = _canonical_name(name)
    if key == "gaussian":
        _check_options(key, options, _GAUSSIAN_OPTIONS)
        return _make_gaussian(**options)
    if key == "digits":
        _check_options(key, options, ())
        return _load_digits()
    use_cache = bool(options.pop("cache", True))
    if key == "mnist1d":
        _check_options(key, options, _MNIST1D_OPTIONS + ("cache",))
        return _load_mnist1d(options, use_cache)
    _check_options(key, options, ("cache",))
    root = resolve_data_dir(data_dir)
    if key in _IDX_SPECS:
        return _load_idx_dataset(_IDX_SPECS[key], root, download, use_cache)
    return _load_cifar10(root, download, use_cache)


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """What dataset ``name`` needs and whether it is present, without loading it.

    Keys: ``name, input_shape, num_classes, data_dir, files`` (expected paths), ``found`` (bool),
    ``origin`` (where it would be read from, or None), ``cache_path`` (the decoded-cache file,
    or the cache folder when not computable), ``download_urls``, ``how_to_provide`` (text).
    """
    key = _canonical_name(name)
    root = resolve_data_dir(data_dir)
    cache_dir = resolve_cache_dir()
    info: dict[str, Any] = {
        "name": key,
        "input_shape": _SHAPES.get(key),
        "num_classes": 10,
        "data_dir": str(root),
        "files": [],
        "found": True,
        "origin": None,
        "cache_path": None,
        "download_urls": [],
        "how_to_provide": "",
    }
    if key == "digits":
        info.update(
            origin="scikit-learn digits (sklearn.datasets.load_digits)",
            how_to_provide="Ships with scikit-learn; nothing to provide.",
        )
    elif key == "gaussian":
        info.update(
            input_shape=(16,),
            num_classes=4,
            origin="generated",
            how_to_provide="Generated on the fly; nothing to provide (options: "
            + ", ".join(_GAUSSIAN_OPTIONS)
            + ").",
        )
    elif key == "mnist1d":
        try:
            import mnist1d  # noqa: F401

            found = True
        except ImportError:
            found = False
        info.update(
            found=found,
            origin="generated by mnist1d.make_dataset" if found else None,
            cache_path=str(cache_dir),
            how_to_provide="Generated locally by the mnist1d package: `pip install mnist1d`.",
        )
    elif key in _IDX_SPECS:
        spec = _IDX_SPECS[key]
        located = _locate_idx(spec, root)
        info.update(
            files=[str(root / spec.folders[0] / f) for f in _IDX_FILES],
            found=located is not None,
            origin=str(located[0]) if located else None,
            cache_path=str(_cache_path(key, located[1]) if located else cache_dir),
            download_urls=[spec.base_url + f for f in _IDX_FILES],
            how_to_provide=_idx_how_to(spec, root),
        )
    else:  # cifar10
        cands = _cifar_candidates(root)
        cache_path: Path = cache_dir
        if cands:
            kind = "pickled batches" if _is_python_tarball(cands[0]) else "image-folder archive"
            cache_path = _cache_path("cifar10", _cifar_fingerprint_files(cands[0]), kind)
        info.update(
            input_shape=(3, 32, 32),
            files=[
                str(root / _CIFAR_FOLDER / _CIFAR_TARBALL),
                str(root / _CIFAR_FOLDER / _CIFAR_IMAGE_ARCHIVE),
            ],
            found=bool(cands),
            origin=str(cands[0]) if cands else None,
            cache_path=str(cache_path),
            download_urls=[_CIFAR_URL],
            how_to_provide=_cifar_how_to(root),
        )
    return info
