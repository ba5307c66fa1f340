"""MD5-verified downloads of canonical dataset files (only when ``download=True``)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from hetpfl.data.sources.base import DatasetUnavailableError

__all__ = ["download"]

_DOWNLOAD_TIMEOUT_S = 10.0


def download(url: str, dest: Path, md5: str, *, how_to: str = "") -> Path:
    """Download ``url`` to ``dest`` through a temp file, verify its MD5, then rename into place.

    Raises :class:`DatasetUnavailableError` (with ``how_to`` appended) when the folder is not
    writable, the download fails, or the checksum differs; no partial file or empty folder is
    left behind.
    """
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
