"""Per-round client views: static by default, and the class-incremental drift schedule."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from hetpfl.configuration import ConfigError
from hetpfl.data import (
    DRIFT_SCHEMES,
    ArrayDataset,
    ClassIncremental,
    DriftSchedule,
    build_federated_data,
    load_dataset,
    make_drift_schedule,
)

DRIFT = {"scheme": "class_incremental", "tasks": 5, "rounds_per_task": 2}


@pytest.fixture(scope="module")
def gauss10():
    return load_dataset("gaussian", num_classes=10, dim=4, n_train=2000, n_test=1000, seed=3)


def _build(source, drift=None, scheme="dirichlet", seed=0, **params):
    return build_federated_data(
        source,
        num_clients=6,
        scheme=scheme,
        seed=seed,
        public_fraction=0.1,
        partition_params=params or {"alpha": 0.5},
        drift=drift,
    )


def _task_at(rnd, rounds_per_task=2, tasks=5):
    return min(rnd // rounds_per_task, tasks - 1)


# --------------------------------------------------------------------------------------------
# Static views
# --------------------------------------------------------------------------------------------


def test_static_views_are_the_splits_themselves(gauss10):
    for drift in (None, {"scheme": "none"}):
        fd = _build(gauss10, drift)
        assert fd.drift is None and fd.tasks == () and fd.input_kind == "vector"
        for c in range(fd.num_clients):
            for rnd in (0, 1, 7, 1000):
                assert fd.train_at(c, rnd) is fd.client_train[c]
                assert fd.test_at(c, rnd) is fd.client_test[c]
        assert fd.global_test is gauss10.test
        assert all(d.task is None for d in fd.client_train + fd.client_test)


def test_input_kind_follows_the_source():
    fd = build_federated_data(load_dataset("digits"), num_clients=3, scheme="iid", seed=0)
    assert fd.input_kind == "image"


# --------------------------------------------------------------------------------------------
# Class-incremental schedule
# --------------------------------------------------------------------------------------------


def test_class_incremental_task_ids_match_classes(gauss10):
    fd = _build(gauss10, DRIFT)
    assert isinstance(fd.drift, ClassIncremental) and isinstance(fd.drift, DriftSchedule)
    assert fd.tasks == ("task_0", "task_1", "task_2", "task_3", "task_4")
    assert fd.drift.task_classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))  # split-MNIST style
    for d in fd.client_train + fd.client_test + [fd.global_test]:
        assert d.task is not None and d.task.dtype == np.int64
        assert np.array_equal(d.task, d.y // 2)
    assert "class-incremental" in fd.describe()


def test_uneven_and_single_task_splits(gauss10):
    three = ClassIncremental(num_classes=10, num_tasks=3, rounds_per_task=1)
    assert three.task_classes == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert np.array_equal(three.task_ids(np.arange(10)), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    fd = _build(gauss10, {"scheme": "class_incremental", "tasks": 1, "rounds_per_task": 3})
    assert fd.tasks == ("task_0",)
    for rnd in range(5):  # one task: every view is the whole split
        assert fd.train_at(2, rnd) is fd.client_train[2] and fd.test_at(2, rnd) is fd.client_test[2]
    assert all(np.all(d.task == 0) for d in fd.client_train)


@pytest.mark.parametrize("scheme,params", [("dirichlet", {"alpha": 0.5}), ("cosmos", {"num_groups": 3})])
def test_drift_keeps_the_partition(gauss10, scheme, params):
    plain = _build(gauss10, None, scheme, seed=4, **params)
    drift = _build(gauss10, DRIFT, scheme, seed=4, **params)
    for a, b in zip(plain.train_indices, drift.train_indices):
        assert np.array_equal(a, b)
    for a, b in zip(plain.test_indices, drift.test_indices):
        assert np.array_equal(a, b)
    assert np.array_equal(plain.public_indices, drift.public_indices)
    assert np.array_equal(plain.public.inputs, drift.public.inputs)
    assert np.array_equal(plain.public.labels_for_evaluation(), drift.public.labels_for_evaluation())
    for a, b in zip(plain.client_train + plain.client_test, drift.client_train + drift.client_test):
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert np.array_equal(plain.global_test.x, drift.global_test.x)
    assert drift.global_test.x is gauss10.test.x, "task ids are added without copying inputs"
    if plain.client_groups is not None:
        assert np.array_equal(plain.client_groups, drift.client_groups)
    assert np.array_equal(plain.label_counts(), drift.label_counts())


def test_train_views_hold_only_the_current_task(gauss10):
    fd = _build(gauss10, DRIFT)
    for c in range(fd.num_clients):
        full = fd.client_train[c]
        for rnd in range(14):
            t = _task_at(rnd)
            view = fd.train_at(c, rnd)
            assert np.all(view.task == t) and set(np.unique(view.y)) <= {2 * t, 2 * t + 1}
            expected = np.flatnonzero(full.task == t)
            assert np.array_equal(view.y, full.y[expected]) and np.array_equal(view.x, full.x[expected])
    sizes = [sum(len(fd.train_at(c, rnd)) for c in range(6)) for rnd in (0, 2, 4, 6, 8)]
    assert sum(sizes) == sum(len(d) for d in fd.client_train), "the tasks cover every train sample"


def test_test_views_grow_over_rounds(gauss10):
    fd = _build(gauss10, DRIFT)
    for c in range(fd.num_clients):
        full = fd.client_test[c]
        sizes = []
        for rnd in range(12):
            t = _task_at(rnd)
            view = fd.test_at(c, rnd)
            expected = np.flatnonzero(full.task <= t)
            assert np.array_equal(view.y, full.y[expected]) and np.array_equal(view.task, full.task[expected])
            sizes.append(len(view))
        assert sizes == sorted(sizes), "tasks seen so far only grow"
        assert fd.test_at(c, 8) is full and fd.test_at(c, 50) is full, "all tasks seen: the whole split"
    assert sum(len(fd.test_at(c, 0)) for c in range(6)) < sum(len(fd.test_at(c, 2)) for c in range(6))


def test_views_are_cached_per_task(gauss10):
    fd = _build(gauss10, DRIFT)
    assert fd.train_at(1, 0) is fd.train_at(1, 1), "rounds of one task share the view"
    assert fd.train_at(1, 2) is not fd.train_at(1, 0)
    assert fd.test_at(1, 2) is fd.test_at(1, 3)
    assert fd.train_at(1, 8) is fd.train_at(1, 99), "the last task stays"
    for rnd in range(20):
        fd.train_at(1, rnd)
        fd.test_at(1, rnd)
    # one view per (client, task): 5 train views, 4 test views (the last task's is the split itself)
    assert sorted(k for k in fd._views if k[0] == "train") == [("train", 1, t) for t in range(5)]
    assert sorted(k for k in fd._views if k[0] == "test") == [("test", 1, t) for t in range(4)]


def test_drift_is_deterministic(gauss10):
    a, b = _build(gauss10, DRIFT, seed=9), _build(gauss10, DRIFT, seed=9)
    for c in range(6):
        for rnd in (0, 3, 5, 9):
            for va, vb in ((a.train_at(c, rnd), b.train_at(c, rnd)), (a.test_at(c, rnd), b.test_at(c, rnd))):
                assert np.array_equal(va.x, vb.x) and np.array_equal(va.y, vb.y)
                assert np.array_equal(va.task, vb.task)


def test_views_after_replace_use_the_new_splits(gauss10):
    fd = _build(gauss10, DRIFT)
    old_view = fd.train_at(2, 0)  # fill the cache of the original

    def keep(i, d):  # what a Flower SuperNode does: keep only its own partition
        return d if i == 2 else ArrayDataset(d.x[:0], d.y[:0])

    own = dataclasses.replace(
        fd,
        client_train=[keep(i, d) for i, d in enumerate(fd.client_train)],
        client_test=[keep(i, d) for i, d in enumerate(fd.client_test)],
        global_test=keep(-1, fd.global_test),
    )
    assert own._views == {} and own.drift is fd.drift and own.tasks == fd.tasks
    assert np.array_equal(own.train_at(2, 0).y, old_view.y)
    assert len(own.train_at(0, 4)) == 0 and len(own.test_at(0, 4)) == 0  # no task ids, no samples

    half = fd.client_train[2].subset(np.arange(len(fd.client_train[2]) // 2))
    other = dataclasses.replace(fd, client_train=[half if i == 2 else d for i, d in enumerate(fd.client_train)])
    view = other.train_at(2, 0)
    assert np.array_equal(view.y, half.y[half.task == 0]) and len(view) < len(old_view)
    assert fd.train_at(2, 0) is old_view, "the original keeps its own views"

    fd.client_train[2] = half  # in-place change of the list: the stale view is rebuilt
    assert np.array_equal(fd.train_at(2, 0).y, view.y)


def test_pickle_roundtrip_drops_cached_views(gauss10):
    fd = _build(gauss10, DRIFT)
    fresh = pickle.dumps(fd)
    views = [fd.train_at(c, r) for c in range(6) for r in (0, 4)]
    assert fd._views and pickle.dumps(fd) == fresh, "views are never pickled"
    back = pickle.loads(fresh)
    assert back._views == {} and back.tasks == fd.tasks and back.input_kind == "vector"
    again = [back.train_at(c, r) for c in range(6) for r in (0, 4)]
    assert all(np.array_equal(a.x, b.x) and np.array_equal(a.task, b.task) for a, b in zip(views, again))


def test_bad_round_or_client(gauss10):
    fd = _build(gauss10, DRIFT)
    with pytest.raises(ValueError, match="rnd=-1"):
        fd.train_at(0, -1)
    with pytest.raises(IndexError):
        fd.test_at(-1, 0)
    with pytest.raises(IndexError):
        fd.train_at(6, 0)


def test_data_without_task_ids_is_refused():
    sched = ClassIncremental(num_classes=4, num_tasks=2, rounds_per_task=1)
    data = ArrayDataset(np.zeros((3, 2), np.float32), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="task ids"):
        sched.select("train", data, 0)
    with pytest.raises(ValueError, match="labels outside 0..3"):
        sched.task_ids(np.array([0, 4]))


BAD_DRIFT = [
    ({"scheme": "bogus"}, ["drift.scheme", "'bogus'", "class_incremental", "none"]),
    ({"tasks": 2}, ["drift", "'scheme'"]),
    ({"scheme": "class_incremental", "tasks": 0, "rounds_per_task": 1}, ["drift.tasks=0", ">= 1"]),
    ({"scheme": "class_incremental", "tasks": -2, "rounds_per_task": 1}, ["drift.tasks=-2"]),
    ({"scheme": "class_incremental", "tasks": 11, "rounds_per_task": 1}, ["drift.tasks=11", "(10)"]),
    ({"scheme": "class_incremental", "tasks": 2.5, "rounds_per_task": 1}, ["drift.tasks=2.5"]),
    ({"scheme": "class_incremental", "tasks": True, "rounds_per_task": 1}, ["drift.tasks=True"]),
    ({"scheme": "class_incremental", "tasks": 2, "rounds_per_task": 0}, ["drift.rounds_per_task=0", ">= 1"]),
    ({"scheme": "class_incremental", "tasks": 2}, ["'rounds_per_task'", "missing"]),
    ({"scheme": "class_incremental", "rounds_per_task": 2}, ["'tasks'", "missing"]),
    (
        {"scheme": "class_incremental", "tasks": 2, "rounds_per_task": 1, "taks": 2},
        ["drift", "taks", "unknown option", "rounds_per_task, scheme, tasks"],
    ),
    ({"scheme": "none", "tasks": 2}, ["drift", "tasks", "unknown option", "scheme"]),
    ("class_incremental", ["drift must be a mapping", "str"]),
]


@pytest.mark.parametrize("drift,parts", BAD_DRIFT)
def test_bad_drift_options_name_the_key(gauss10, drift, parts):
    with pytest.raises(ValueError) as exc:  # ConfigError (a ValueError) for unknown or missing keys
        _build(gauss10, drift)
    msg = str(exc.value)
    for part in parts:
        assert part in msg, (part, msg)
    if "=" not in parts[0]:  # a key problem, not a value problem
        assert isinstance(exc.value, ConfigError)


def test_schedule_registry_and_ready_schedules(gauss10):
    assert set(DRIFT_SCHEMES) == {"none", "class_incremental"}
    assert make_drift_schedule({"scheme": "none"}, num_classes=10, num_clients=2, seed=0) is None
    ready = ClassIncremental(num_classes=10, num_tasks=2, rounds_per_task=3)
    assert make_drift_schedule(ready, num_classes=10, num_clients=2, seed=0) is ready
    fd = _build(gauss10, ready)
    assert fd.drift is ready and fd.tasks == ("task_0", "task_1")
    assert set(np.unique(fd.train_at(0, 3).y)) <= {5, 6, 7, 8, 9}
