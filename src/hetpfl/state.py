"""Saveable state: nested trees of arrays, tensors, modules and plain values as records.

Everything a run holds between rounds (a server's attributes, the engine's totals, a client's
modules and algorithm state) is saved through this module, never with pickle:

* :func:`tree_to_record` turns a tree of dicts (str or int keys), lists, tuples, numbers, strings,
  None, NumPy arrays, torch tensors and registry-built ``nn.Module``\\ s into a
  :class:`~hetpfl.messages.Message`: every array is a named array, the structure is one JSON scalar.
  :func:`record_to_tree` inverts it; modules are rebuilt by a caller-supplied builder from the
  :class:`~hetpfl.models.ModuleSpec` each module recorded when the registry built it, then their
  state is loaded.
* :func:`save_record` / :func:`load_record` put a record on disk as one ``.npz`` (NumPy's zip of
  ``.npy`` files, read with ``allow_pickle=False``; scalars as a JSON entry): loading executes no
  code, and any NumPy can read it.

Writes are atomic (a temporary file renamed into place), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .messages import Message
from .models import BUILT_FROM, ModuleSpec

TREE = "__tree__"  # the scalar holding the JSON structure of a tree record
_SCALARS = "__scalars__"  # the .npz entry holding a record's scalars as JSON (uint8)

ModuleBuilder = Callable[[ModuleSpec], nn.Module]


class StateError(ValueError):
    """State that cannot be saved or restored (names the path inside the tree and why)."""


# ------------------------------------------------------------------------------------------
# Trees <-> records
# ------------------------------------------------------------------------------------------


def tree_to_record(tree: Any, where: str = "state") -> Message:
    """``tree`` as one record: arrays named ``a<i>``, the structure as JSON in the scalar ``__tree__``."""
    arrays: dict[str, np.ndarray] = {}

    def array_ref(array: np.ndarray, kind: str) -> dict[str, str]:
        key = f"a{len(arrays)}"
        arrays[key] = np.array(array, copy=True, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        return {kind: key}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, nn.Module):
            spec = getattr(value, BUILT_FROM, None)
            if not isinstance(spec, ModuleSpec):
                raise StateError(f"{path}: a {type(value).__name__} not built by the model registry cannot be "
                                 f"saved generically (build it with models.build_model, or override state_dict)")
            return {"$module": spec.arch, "options": encode(spec.kwargs, f"{path}.options"),
                    "state": encode(dict(value.state_dict()), f"{path}.state")}
        if isinstance(value, torch.Tensor):
            return array_ref(value.detach().cpu().numpy(), "$tensor")
        if isinstance(value, np.ndarray):
            return array_ref(value, "$array")
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dict):
            items = []
            for key, item in value.items():
                if isinstance(key, np.integer):
                    key = int(key)
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise StateError(f"{path}: dict key {key!r} is neither a str nor an int")
                items.append([key, encode(item, f"{path}[{key!r}]")])
            return {"$dict": items}
        if isinstance(value, (list, tuple)):
            items = [encode(item, f"{path}[{i}]") for i, item in enumerate(value)]
            return items if isinstance(value, list) else {"$tuple": items}
        raise StateError(f"{path}: a {type(value).__name__} cannot be saved (use arrays, tensors, registry "
                         f"modules, numbers, strings, None, and dicts/lists of them)")

    structure = encode(tree, where)
    return Message(arrays, {TREE: json.dumps(structure, allow_nan=True)})


def record_to_tree(record: Message, build: ModuleBuilder | None = None) -> Any:
    """The tree saved by :func:`tree_to_record`; ``build(spec)`` makes an empty module to load into."""
    if TREE not in record.scalars:
        raise StateError(f"not a state record (no '{TREE}' entry)")

    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$array" in node:
            return np.array(record.arrays[node["$array"]])
        if "$tensor" in node:
            return torch.from_numpy(np.array(record.arrays[node["$tensor"]]))
        if "$tuple" in node:
            return tuple(decode(item) for item in node["$tuple"])
        if "$dict" in node:
            return {key: decode(item) for key, item in node["$dict"]}
        if "$module" in node:
            if build is None:
                raise StateError(f"the state holds a '{node['$module']}' module but no module builder was given")
            module = build(ModuleSpec.of(node["$module"], **decode(node["options"])))
            module.load_state_dict(decode(node["state"]), strict=True)
            return module
        raise StateError(f"unknown node in a state record: {sorted(node)}")

    return decode(json.loads(record.scalars[TREE]))


# ------------------------------------------------------------------------------------------
# Records on disk
# ------------------------------------------------------------------------------------------


def private_folder(path: str | os.PathLike) -> Path:
    """Create ``path`` readable by this user only (0700), or check an existing one: a folder of
    another user is refused (someone else could plant or read files there), one of ours that is
    open to others is closed."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if hasattr(os, "getuid"):
        info = path.stat()
        if info.st_uid != os.getuid():
            raise StateError(f"{path} belongs to another user (uid {info.st_uid}): a client's private state "
                             "is never kept there; choose another folder")
        if info.st_mode & 0o077:
            path.chmod(0o700)
    return path


def save_record(path: str | os.PathLike, record: Message) -> None:
    """Write ``record`` to ``path`` (``.npz``, readable by this user only) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _SCALARS in record.arrays:
        raise StateError(f"array name '{_SCALARS}' is reserved")
    scalars = np.frombuffer(json.dumps(record.scalars, allow_nan=True).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        np.savez(fh, **record.arrays, **{_SCALARS: scalars})
    tmp.replace(path)


def load_record(path: str | os.PathLike) -> Message:
    """Read a record written by :func:`save_record` (no code runs: ``allow_pickle=False``)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"{path}: not a readable state record ({type(exc).__name__}: {exc})") from None
    raw = arrays.pop(_SCALARS, None)
    scalars = json.loads(raw.tobytes().decode()) if raw is not None else {}
    return Message(arrays, scalars)


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    save_record(path, tree_to_record(tree))


def load_tree(path: str | os.PathLike, build: ModuleBuilder | None = None) -> Any:
    return record_to_tree(load_record(path), build)




# ------------------------------------------------------------------------------------------
# A client's algorithm state
# ------------------------------------------------------------------------------------------


class ClientState(MutableMapping):
    """A client's algorithm state between rounds: named arrays and scalars, typed like a message.

    ``ctx.state["pretrained"] = True`` or ``ctx.state["prototypes"] = array`` work as on a dict,
    but only NumPy arrays and bool/int/float/str values are accepted (anything else fails at
    assignment, naming the key), so the state can be saved without pickle, counted and checked.
    """

    def __init__(self, arrays: dict[str, np.ndarray] | None = None, scalars: dict[str, Any] | None = None) -> None:
        self._arrays: dict[str, np.ndarray] = dict(arrays or {})
        self._scalars: dict[str, Any] = dict(scalars or {})

    def __getitem__(self, key: str) -> Any:
        if key in self._arrays:
            return self._arrays[key]
        return self._scalars[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str) or not key:
            raise StateError(f"client state keys are non-empty strings, got {key!r}")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, np.ndarray):
            self._scalars.pop(key, None)
            self._arrays[key] = value
        elif isinstance(value, (bool, int, float, str)):
            self._arrays.pop(key, None)
            self._scalars[key] = value
        else:
            raise StateError(f"client state '{key}': a {type(value).__name__} cannot be kept between rounds "
                             f"(use a NumPy array or a bool/int/float/str)")

    def __delitem__(self, key: str) -> None:
        if key in self._arrays:
            del self._arrays[key]
        else:
            del self._scalars[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._arrays
        yield from self._scalars

    def __len__(self) -> int:
        return len(self._arrays) + len(self._scalars)

    def __repr__(self) -> str:
        return f"ClientState(arrays={sorted(self._arrays)}, scalars={self._scalars})"

    def to_message(self) -> Message:
        return Message(dict(self._arrays), dict(self._scalars))

    @classmethod
    def from_message(cls, message: Message) -> "ClientState":
        return cls(message.arrays, message.scalars)


__all__ = [
    "ClientState",
    "StateError",
    "load_record",
    "load_tree",
    "record_to_tree",
    "save_record",
    "save_tree",
    "tree_to_record",
]
