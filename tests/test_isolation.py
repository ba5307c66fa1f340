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
    with warnings.catch_warnings():  # the walk touches torch's deprecated aliases (torch.distributed.reduce_op)
        warnings.simplefilter("ignore", FutureWarning)
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


def _arrays(objects: list[object]) -> list[np.ndarray]:
    """Every array among ``objects`` (tensors as arrays), with the arrays they are views of."""
    import torch

    out, seen = [], set()
    for obj in objects:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
            obj = obj.detach().numpy(force=True) if obj.dtype != torch.bfloat16 else None
        while isinstance(obj, np.ndarray) and id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
            obj = obj.base
    return out


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _holding(arrays: list[np.ndarray], marks: dict[str, tuple[str, str, np.ndarray | None]]) -> list[str]:
    """Which marked splits ``arrays`` hold: the split's inputs or labels themselves, or a larger
    array its source indices pick them out of (the whole dataset's). ``marks``: name -> (digest of
    the inputs, digest of the labels, the split's indices into its source, or None: only itself counts)."""
    found = set()
    for array in arrays:
        for name, (x_digest, y_digest, indices) in marks.items():
            if name in found or array.ndim == 0:
                continue
            labels = array.ndim == 1 and np.issubdtype(array.dtype, np.integer)
            digest = y_digest if labels else x_digest
            if _digest(array) == digest:
                found.add(name)
            elif indices is not None and array.shape[0] > int(indices.max()) and _digest(array[indices]) == digest:
                found.add(name)
    return sorted(found)


def test_isolated_clients_reach_no_other_clients_data_and_the_server_none(tmp_path, monkeypatch):
    """``runtime.executor: isolated``: from inside every client's stage (in its own process) the
    probe's walks — every caller's frame, the whole ``gc`` heap, the arrays those views keep alive —
    find no other client's train or test split and no global test split, and from the server's round
    no client's split at all (its models are scored on the clients' test splits in the clients'
    processes); the records are the sequential run's, byte for byte."""
    from hetpfl.experiment import prepare

    config = small_config("cosmos", **{"data.num_clients": 4})
    data = prepare(config).run.data  # the same seed draws the same partition: fingerprints, then let go
    marks = {}
    for c in range(data.num_clients):
        marks[f"client {c} train"] = (_digest(data.client_train[c].x), _digest(data.client_train[c].y), data.train_indices[c])
        marks[f"client {c} test"] = (_digest(data.client_test[c].x), _digest(data.client_test[c].y), data.test_indices[c])
    marks["global test"] = (_digest(data.global_test.x), _digest(data.global_test.y), np.arange(len(data.global_test)))
    del data
    gc.collect()
    walked = tmp_path / "walks"
    walked.mkdir()

    # The server keeps the global test split (the experimenter's), of which the clients' test splits
    # are parts: from the server, a test split counts as held only as itself (or its indices' pick).
    server_marks = {name: (x, y, None if name.endswith("test") else indices) for name, (x, y, indices) in marks.items()}

    def walk(marks=marks) -> list[str]:
        frames, frame = [], sys._getframe(2)
        while frame is not None:
            frames.extend(frame.f_locals.values())
            frame = frame.f_back
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _holding(_arrays(_heap() + frames), marks)

    handle, server_round = Client.handle, get_algorithm("cosmos").server_cls.round

    def client_handle(self, stage, message, ctx):  # runs in the client's own process
        (walked / f"client-{ctx.client_id}-{stage}-{ctx.round}.txt").write_text("\n".join(walk()))
        return handle(self, stage, message, ctx)

    def round_(self, rnd, clients, comm):
        (walked / f"server-{rnd}.txt").write_text("\n".join(walk(server_marks)))
        return server_round(self, rnd, clients, comm)

    monkeypatch.setattr(Client, "handle", client_handle)
    monkeypatch.setattr(get_algorithm("cosmos").server_cls, "round", round_)
    summary = run_experiment(small_config("cosmos", **{"data.num_clients": 4, "runtime.executor": "isolated"}),
                             tmp_path / "isolated")
    assert summary["executor"] == "isolated"
    found = {p.stem: p.read_text().splitlines() for p in sorted(walked.glob("*.txt"))}
    client_walks = [k for k in found if k.startswith("client-")]
    assert {k.split("-")[1] for k in client_walks} == {"0", "1", "2", "3"} and {"server-0", "server-1"} <= set(found)
    for where, names in found.items():
        if where.startswith("client-"):
            own = where.split("-")[1]
            assert set(names) <= {f"client {own} train", f"client {own} test"}, (where, names)
            assert f"client {own} train" in names, where  # the walk does find what is there
        else:
            assert not [n for n in names if n.startswith("client")], (where, names)
            assert "global test" in names, where  # the walk does find what is there
    monkeypatch.undo()
    run_experiment(small_config("cosmos", **{"data.num_clients": 4}), tmp_path / "sequential")
    assert (tmp_path / "isolated" / "metrics.jsonl").read_bytes() == (tmp_path / "sequential" / "metrics.jsonl").read_bytes()


def test_withholding_empties_the_other_splits_in_place_and_keeps_nothing_of_them_alive():
    from hetpfl.experiment import prepare

    data = prepare(small_config("fedmd", **{"data.num_clients": 3})).run.data
    train_list, own = data.client_train, data.client_train[1]
    test_sizes = [len(d) for d in data.client_test]
    data.withhold({1}, global_test=False)
    assert data.client_train is train_list  # in place: every holder of the list sees it emptied
    assert data.client_train[1] is own and [len(d) for d in data.client_train] == [0, len(own), 0]
    assert [len(d) for d in data.client_test] == [0, test_sizes[1], 0] and len(data.global_test) == 0
    assert [len(i) for i in data.train_indices] == [0, len(own), 0]
    for split in (data.client_train[0], data.client_test[2], data.global_test):
        assert split.x.base is None and split.y.base is None  # not views keeping the full arrays alive
        assert split.x.shape[1:] == own.x.shape[1:] and split.x.dtype == own.x.dtype

    server_side = prepare(small_config("fedmd", **{"data.num_clients": 3})).run.data
    server_side.withhold((), global_test=True, test_splits=True)  # the isolated run's own process
    assert [len(d) for d in server_side.client_train] == [0, 0, 0]
    assert [len(d) for d in server_side.client_test] == test_sizes and len(server_side.global_test) > 0
