"""The decoded-array cache: ``.npz`` files of decoded train/test arrays in ``HETPFL_CACHE_DIR``.

The cache key covers the dataset name, a format version, a loader-specific ``extra`` string and
each source file's name, size and a hash of its first MiB, so replacing a file invalidates the
cache. A corrupt cache file is ignored (decoded again); an unwritable cache folder only warns.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hetpfl.data.sources.base import resolve_cache_dir

__all__ = ["cache_path", "cached_decode"]

_CACHE_FORMAT = 1  # bump when the decoded layout changes
_HASH_PREFIX_BYTES = 1 << 20
_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_HASH_PREFIX_BYTES))
    return f"{path.name}:{st.st_size}:{h.hexdigest()}"


def cache_path(name: str, files: Sequence[Path], extra: str = "") -> Path:
    """The cache file of dataset ``name`` decoded from ``files`` (``extra``: loader variant)."""
    h = hashlib.sha256()
    h.update(f"{name}|v{_CACHE_FORMAT}|{extra}".encode())
    for f in files:
        h.update(b"|" + _file_fingerprint(f).encode())
    return resolve_cache_dir() / f"{name}-{h.hexdigest()[:16]}.npz"


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


def cached_decode(
    name: str,
    files: Sequence[Path],
    decode: Callable[[], dict[str, np.ndarray]],
    *,
    use_cache: bool,
    extra: str = "",
) -> tuple[dict[str, np.ndarray], str]:
    """Decoded arrays from the cache when valid, else from ``decode()`` (then cached).

    Returns the arrays (keys ``x_train, y_train, x_test, y_test``) and a note for the origin
    text saying which cache file was read or written (empty without the cache).
    """
    if not use_cache:
        return decode(), ""
    path = cache_path(name, files, extra)
    arrays = _load_cache(path)
    if arrays is not None:
        return arrays, f" (decoded cache {path})"
    arrays = decode()
    note = f" (cached to {path})" if _save_cache(path, arrays) else ""
    return arrays, note
