"""The public labels are not reachable by any code of a run (reliability probe 5.1–5.3, ranked 7).

The probe reached them from a client stage through the stack (``sys._getframe``), through ``gc``,
and from the server through the ``ServerSetup.build_model`` closure. A prepared run now drops them
before any algorithm code runs, so these walks, done here from inside a client stage and a server
round of real runs, find neither a labelled public set nor any array holding the labels.
"""

from __future__ import annotations

import gc
import hashlib
import sys
import types
import warnings

import numpy as np
import pytest

from conftest import small_config
from hetpfl.algorithms import get_algorithm
from hetpfl.algorithms.base import Client
from hetpfl.data import FederatedData, PublicSet
from hetpfl.data.public import PublicLabelsWithheld
from hetpfl.engine import RunSpec
from hetpfl.experiment import run_experiment


def _fingerprint(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


def _heap() -> list[object]:
    """Every object the collector tracks, and what they refer to (arrays are not tracked themselves)."""
    tracked = gc.get_objects()
    return tracked + [r for o in tracked for r in gc.get_referents(o) if isinstance(r, np.ndarray)]


def _holding_the_labels(objects: list[object], fingerprint: str, size: int, indices: np.ndarray) -> list[str]:
    """What in ``objects`` holds the labels: a labelled PublicSet, the label vector itself, or an
    array from which the public indices pick it out (e.g. the whole train split's labels)."""
    found = []
    for obj in objects:
        if isinstance(obj, PublicSet) and obj.has_labels:
            found.append("a PublicSet with labels")
        elif isinstance(obj, np.ndarray) and obj.ndim == 1 and np.issubdtype(obj.dtype, np.integer):
            if obj.size == size and _fingerprint(obj) == fingerprint:
                found.append("the public label vector")
            elif obj.size > int(indices.max()) and _fingerprint(obj[indices]) == fingerprint:
                found.append(f"an array of {obj.size} labels the public indices index into")
    return found


def _reachable(root: object, skip: set[int]) -> list[object]:
    """Objects reachable from ``root`` without passing through a module or a module's namespace."""
    seen, todo, out = set(skip), [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type)):
            continue
        seen.add(id(obj))
        out.append(obj)
        todo.extend(gc.get_referents(obj))
    return out


@pytest.mark.parametrize("algorithm", ["fedmd", "cosmos"])
def test_no_walk_from_a_client_stage_or_the_server_finds_the_public_labels(tmp_path, monkeypatch, algorithm):
    dropped = {}
    keep_dropping = PublicSet.without_labels

    def remember(self):  # the fingerprint of the labels the run drops (the test keeps no copy of them)
        dropped.update(fingerprint=_fingerprint(self.labels_for_evaluation()), size=len(self))
        return keep_dropping(self)

    monkeypatch.setattr(PublicSet, "without_labels", remember)
    namespaces = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    walks: dict[str, list[str]] = {}

    def walk(where: str, root: object) -> None:
        if where in walks:
            return
        frames, frame = [], sys._getframe(1)
        while frame is not None:  # the probe's frame walk: every caller's locals
            frames.append(dict(frame.f_locals))
            frame = frame.f_back
        with warnings.catch_warnings():  # isinstance() on torch's deprecated lazy attributes warns
            warnings.simplefilter("ignore")
            fresh = [o for o in _heap() if id(o) not in earlier]  # this run's objects, not earlier tests'
            found = _holding_the_labels(fresh, dropped["fingerprint"], dropped["size"], indices)
            found += _holding_the_labels(frames, dropped["fingerprint"], dropped["size"], indices)
            near = _reachable(root, namespaces)
        found += [f"a {type(o).__name__} reachable from {where}" for o in near if isinstance(o, (RunSpec, FederatedData))]
        walks[where] = found

    handle, server_round = Client.handle, get_algorithm(algorithm).server_cls.round

    def client_handle(self, stage, message, ctx):
        walk("a client stage", ctx)
        return handle(self, stage, message, ctx)

    def round_(self, rnd, clients, comm):
        walk("the server", self)
        return server_round(self, rnd, clients, comm)

    monkeypatch.setattr(Client, "handle", client_handle)
    monkeypatch.setattr(get_algorithm(algorithm).server_cls, "round", round_)
    config = small_config(algorithm, rounds=1)
    indices = np.arange(1)  # replaced below once the run has chosen its public indices

    def on_prepared(prepared):
        nonlocal indices
        indices = prepared.run.data.public_indices
        with pytest.raises(PublicLabelsWithheld, match="holds no labels"):
            prepared.run.data.public.labels_for_evaluation()

    gc.collect()  # objects alive now belong to earlier tests of this process (kept alive: no id is reused)
    before = _heap()
    earlier = {id(o) for o in before} | {id(before)}
    run_experiment(config, tmp_path / "out", on_prepared=on_prepared)
    assert dropped["size"] == len(indices) > 0
    assert set(walks) == {"a client stage", "the server"}
    assert walks == {"a client stage": [], "the server": []}
