"""A results folder holds one run, says how that run ended, and is never mixed with another.

``status.json`` is written atomically (a temporary file renamed into place): ``running`` when the
run claims the folder (updated after every round with ``rounds_done``), then ``complete`` with the
SHA-256 of the files the results are read from, or ``failed`` with the error. A folder that already
holds a run is refused unless the caller overwrites it (its run's files are removed first) or
resumes it. ``hetpfl report`` reads only folders whose status is ``complete`` and whose files still
have the recorded hashes (older folders without a status are read as before, and said to be so).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .configuration import ConfigError

STATUS = "status.json"
RUN_FILES = ("config.yaml", "metrics.jsonl", "timings.jsonl", "summary.json", STATUS)
HASHED_FILES = ("config.yaml", "metrics.jsonl", "summary.json")  # what report and tables read
CHECKPOINTS = "checkpoints"  # subfolder of a results folder


class ResultsFolderError(ConfigError):
    """The results folder cannot take this run (it holds another, or cannot be written)."""


def read_status(out: Path) -> dict[str, Any] | None:
    """The folder's status (None when it has none, e.g. a folder of an older hetpfl)."""
    try:
        return json.loads((Path(out) / STATUS).read_text())
    except (OSError, ValueError):
        return None


def holds_run(out: Path) -> bool:
    out = Path(out)
    return any((out / name).exists() for name in RUN_FILES) or (out / CHECKPOINTS).exists()


def check(out: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse, with :class:`ResultsFolderError` and before any work or write, a path that is a file,
    a folder that cannot be written, a folder holding another run (unless ``overwrite`` or
    ``resume``) and a complete run to resume."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ResultsFolderError(f"results folder {out} is a file; choose another -o")
    status = read_status(out) if out.exists() else None
    if resume:
        if status is not None and status.get("status") == "complete":
            raise ResultsFolderError(f"cannot resume {out}: its run is complete")
    elif holds_run(out) and not overwrite:
        state = (status or {}).get("status", "written by an earlier hetpfl, with no status")
        raise ResultsFolderError(f"results folder {out} already holds a run ({state}); pass --overwrite to "
                                 "replace it, --resume to continue it, or choose another -o")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ResultsFolderError(f"results folder {out} cannot be written ({existing} is not a writable folder); "
                                 "choose another -o")


def start(out: Path, *, overwrite: bool = False, resume: bool = False) -> str:
    """After :func:`check`: remove the run ``overwrite`` replaces, create the folder, mark it
    ``running``; return the run id (a resumed run keeps its own)."""
    out = Path(out)
    previous = read_status(out) if resume else None
    if overwrite and not resume and holds_run(out):
        _remove_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        run_id = (previous or {}).get("run_id") or uuid.uuid4().hex[:16]
        write_status(out, {"status": "running", "run_id": run_id, "started": _now(), "pid": os.getpid(),
                           **({"resumed": int((previous or {}).get("resumed", 0)) + 1} if resume else {})})
    except OSError as exc:
        raise ResultsFolderError(f"results folder {out} cannot be written ({exc.strerror}); choose another -o") from None
    return run_id


def update(out: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the status (``status="complete"`` also records the files' hashes)."""
    status = {**(read_status(out) or {}), **fields, "updated": _now()}
    if fields.get("status") == "complete":
        status["sha256"] = {name: file_sha256(Path(out) / name) for name in HASHED_FILES if (Path(out) / name).exists()}
    write_status(out, status)
    return status


def write_status(out: Path, status: dict[str, Any]) -> None:
    tmp = Path(out) / f".{STATUS}.tmp"
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(Path(out) / STATUS)


def problem(out: Path) -> str | None:
    """Why ``out``'s results must not be read (None when they may): not complete, or files that no
    longer match what the run wrote."""
    status = read_status(out)
    if status is None:
        return None if (Path(out) / "summary.json").exists() else "no summary.json"
    if status.get("status") != "complete":
        error = f": {status['error']}" if status.get("error") else ""
        return f"{status.get('status', 'unknown')} after {status.get('rounds_done', 0)} rounds{error}"
    for name, digest in status.get("sha256", {}).items():
        path = Path(out) / name
        if not path.exists() or file_sha256(path) != digest:
            return f"{name} is not the file its run wrote (changed or replaced afterwards)"
    return None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _remove_run(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for plot in out.glob("*.png"):  # a run's plots; hetpfl writes no other PNGs at the top level
        plot.unlink()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
