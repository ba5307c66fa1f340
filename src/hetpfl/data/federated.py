"""Federated view of a dataset: per-client private train/test data and an unlabeled public set.

:func:`build_federated_data` turns a :class:`~hetpfl.data.sources.DatasetSource` into a
:class:`FederatedData`, in this order (every random choice from a ``numpy_rng(seed, "data", ...)``
stream):

1. optional stratified subsample of the train split (``max_train_samples``);
2. class-balanced public carve-out (``public_fraction`` of every class, or exactly
   ``public_size`` samples spread evenly over the classes), taken BEFORE partitioning;
3. the remaining train samples are partitioned among the clients (``hetpfl.data.partition``);
4. every test sample of class ``c`` is given to client ``i`` with probability proportional to
   client ``i``'s private train count of ``c``, so each client's test set follows its own label
   distribution, and the client test sets are disjoint. (A test sample whose class no client holds
   goes to no client; it stays in ``global_test``, which is the whole test split.)

The public set's labels are kept apart: :class:`PublicSet` exposes only ``inputs``; the labels are
reachable through :meth:`PublicSet.labels_for_evaluation`, which algorithm code must never call.

Data over time: :meth:`FederatedData.train_at` / :meth:`FederatedData.test_at` give a client's
view in a round. Without a drift schedule they are the static splits themselves; with one
(``drift={"scheme": "class_incremental", ...}``, see :mod:`hetpfl.data.schedule`) every sample
also carries a task id and each round sees the part of the split its schedule names. The
partition, the public set and the client test split do not depend on the drift option.

Feature shift (``feature_shift="rotate"`` or ``"invert"``, :mod:`hetpfl.data.shift`): client ``i``
joins group ``i % G`` (``client_groups``) and its private train and test images go through its
group's transform (rotation by 90·g degrees, or colour inversion). The partition is the one of the
same seed without the shift; the public set and ``global_test`` stay untransformed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hetpfl.data._common import apportion, check_int
from hetpfl.data.partition import partition_labels
from hetpfl.data.public import PublicSet
from hetpfl.data.schedule import DriftSchedule, make_drift_schedule
from hetpfl.data.shift import FeatureShift, make_feature_shift
from hetpfl.data.sources import ArrayDataset, DatasetSource
from hetpfl.data.sources.base import INPUT_KINDS, infer_input_kind
from hetpfl.rng import numpy_rng

__all__ = ["FederatedData", "PublicSet", "build_federated_data"]


@dataclass(eq=False)
class FederatedData:
    """Per-client private train and test data, the public set and the global test split.

    ``client_train`` / ``client_test`` are the whole (static) splits. What a client sees in round
    ``rnd`` is :meth:`train_at` / :meth:`test_at`: the static splits themselves when ``drift`` is
    None, else the views the drift schedule names (built once, cached per instance: a copy made
    with ``dataclasses.replace`` starts with an empty cache, and a view is rebuilt whenever the
    split it came from was replaced). ``input_kind``: one of
    :data:`~hetpfl.data.sources.base.INPUT_KINDS` (inferred from the inputs when left empty).
    ``tasks``: task names (a sample's ``task`` id indexes them; empty without tasks).
    ``shift``: the feature shift applied to the clients' splits (None: none); with one,
    ``client_groups[i]`` is client ``i``'s shift group.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    client_train: list[ArrayDataset]
    client_test: list[ArrayDataset]
    public: PublicSet
    global_test: ArrayDataset
    client_groups: np.ndarray | None
    train_indices: list[np.ndarray]  # indices into source.train of each client's private data
    public_indices: np.ndarray  # indices into source.train
    test_indices: list[np.ndarray] = field(default_factory=list)  # indices into source.test
    scheme: str = ""
    seed: int | None = None
    input_kind: str = ""
    value_range: tuple[float, float] | None = None  # bounds of the normalized inputs (None: unbounded)
    tasks: tuple[str, ...] = ()
    drift: DriftSchedule | None = None
    shift: FeatureShift | None = None
    _views: dict[tuple[str, int, Any], tuple[ArrayDataset, ArrayDataset]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not self.input_kind:
            sample = self.global_test.x if len(self.global_test) else self.public.inputs
            self.input_kind = infer_input_kind(sample, tuple(self.input_shape))
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(
                f"unknown input_kind {self.input_kind!r}; allowed: {', '.join(INPUT_KINDS)}"
            )
        self.tasks = tuple(self.tasks)

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def train_at(self, client: int, rnd: int) -> ArrayDataset:
        """Client ``client``'s training data in round ``rnd`` (from 0). Without drift this is
        ``client_train[client]`` itself (no copy)."""
        return self._view("train", client, rnd, self.client_train[client])

    def test_at(self, client: int, rnd: int) -> ArrayDataset:
        """Client ``client``'s test data in round ``rnd`` (from 0). Without drift this is
        ``client_test[client]`` itself (no copy)."""
        return self._view("test", client, rnd, self.client_test[client])

    def _view(self, split: str, client: int, rnd: int, data: ArrayDataset) -> ArrayDataset:
        if self.drift is None:
            return data
        if client < 0:
            raise IndexError(f"client {client} out of range 0..{self.num_clients - 1}")
        key = self.drift.view_key(split, client, rnd)
        if key is None:
            return data
        slot = (split, client, key)
        hit = self._views.get(slot)
        if hit is not None and hit[0] is data:
            return hit[1]
        view = data.subset(self.drift.select(split, data, key))
        self._views[slot] = (data, view)
        return view

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_views"] = {}  # views are rebuilt on demand; never pickle them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._views = {}

    def withhold(self, keep: Collection[int], *, global_test: bool, test_splits: bool = False) -> None:
        """Empty, in place, every client's splits (and their source indices) but those of ``keep``,
        the clients' test splits unless ``test_splits`` keeps them all, and ``global_test`` unless
        kept: a process that hosts only ``keep`` (an isolated client, a SuperNode), or only the server
        and the experimenter's measurements, then holds nothing else. In place, because every holder
        of this object (a caller's frame included) must see it emptied; the empty splits are fresh
        arrays, not views that would keep the full ones alive."""
        keep = set(keep)
        for splits, indices, kept in ((self.client_train, self.train_indices, keep),
                                      (self.client_test, self.test_indices, range(len(self.client_test))
                                       if test_splits else keep)):
            for i, split in enumerate(splits):
                if i not in kept:
                    splits[i] = _empty_like(split)
            for i in range(len(indices)):
                if i not in kept:
                    indices[i] = np.zeros(0, dtype=indices[i].dtype)
        if not global_test:
            self.global_test = _empty_like(self.global_test)
        self._views.clear()

    def label_counts(self) -> np.ndarray:
        """``(num_clients, num_classes)`` counts of every client's private train labels."""
        return np.stack(
            [
                np.bincount(d.y, minlength=self.num_classes)[: self.num_classes]
                for d in self.client_train
            ]
        ).astype(np.int64)

    def describe(self) -> str:
        """One short paragraph summarizing clients, sizes, label skew, public and test sets."""
        sizes = np.array([len(d) for d in self.client_train])
        tsizes = np.array([len(d) for d in self.client_test])
        counts = self.label_counts()
        present = (counts > 0).sum(axis=1)
        top_share = counts.max(axis=1) / np.maximum(sizes, 1)
        text = (
            f"{self.name}: {self.num_clients} clients, scheme {self.scheme or '?'!s}"
            f"{'' if self.seed is None else f' (seed {self.seed})'}; private train samples per "
            f"client min {sizes.min()} / median {int(np.median(sizes))} / max {sizes.max()} "
            f"(total {sizes.sum()}); classes present per client {present.mean():.1f} of "
            f"{self.num_classes} on average, largest class {100 * top_share.mean():.0f}% of a "
            f"client's data on average; public set {len(self.public)} unlabeled samples; client "
            f"test sets min {tsizes.min()} / median {int(np.median(tsizes))} / max {tsizes.max()} "
            f"(total {tsizes.sum()}), global test {len(self.global_test)}"
        )
        if self.client_groups is not None:
            ng = int(self.client_groups.max()) + 1 if self.client_groups.size else 0
            per = np.bincount(self.client_groups, minlength=ng)
            text += f"; {ng} true client groups of sizes {per.tolist()}"
        if self.shift is not None:
            text += f"; {self.shift.describe()}"
        if self.drift is not None:
            text += f"; {self.drift.describe()}"
        return text + "."


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _empty_like(split: ArrayDataset) -> ArrayDataset:
    """A split with no rows and ``split``'s shapes and dtypes, sharing no memory with it."""
    task = None if split.task is None else np.zeros(0, dtype=split.task.dtype)
    return ArrayDataset(np.zeros((0, *split.x.shape[1:]), dtype=split.x.dtype), np.zeros(0, dtype=split.y.dtype), task)


def _balanced_counts(available: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts summing to ``total``, as equal as the class sizes allow (water-filling);
    the last few units go to random classes."""
    available = np.asarray(available, dtype=np.int64)
    counts = np.zeros_like(available)
    remaining = int(total)
    while remaining > 0:
        room = available - counts
        active = np.flatnonzero(room > 0)
        share = remaining // active.size
        if share == 0:
            counts[rng.choice(active, size=remaining, replace=False)] += 1
            break
        add = np.minimum(room[active], share)
        counts[active] += add
        remaining -= int(add.sum())
    return counts


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------


def build_federated_data(
    source: DatasetSource,
    *,
    num_clients: int,
    scheme: str,
    seed: int,
    public_fraction: float = 0.0,
    public_size: int | None = None,
    max_train_samples: int | None = None,
    partition_params: dict | None = None,
    drift: Mapping[str, Any] | DriftSchedule | None = None,
    feature_shift: str = "none",
    feature_shift_groups: int | None = None,
) -> FederatedData:
    """Split ``source`` into ``num_clients`` clients with partition ``scheme``.

    ``public_fraction``: share of every class of the train split set aside (class-balanced) as the
    unlabeled public set, in [0, 1). ``public_size``: instead, exactly this many public samples,
    spread evenly over the classes. ``max_train_samples``: first subsample the train split to this
    many samples, stratified by class. ``partition_params``: keyword parameters of the scheme.
    ``drift``: a drift schedule, ``{"scheme": name, **options}`` (:mod:`hetpfl.data.schedule`;
    ``None`` or ``{"scheme": "none"}``: static data); it adds task ids and per-round views and
    leaves the partition, the public set and the test split exactly as without it.
    ``feature_shift``: ``none``, ``rotate`` or ``invert`` (:mod:`hetpfl.data.shift`) over
    ``feature_shift_groups`` groups (None: every transform of the shift, 4 or 2); client ``i``'s
    train and test images take group ``i % G``'s transform, the partition is unchanged, and the
    public set and ``global_test`` stay untransformed; ``client_groups`` holds the groups.
    Everything is deterministic given ``seed``.
    """
    if not isinstance(source, DatasetSource):
        raise TypeError(f"source must be a DatasetSource, got {type(source).__name__}")
    k = check_int("num_clients", num_clients, 1)
    seed = check_int("seed", seed, -(2**63))
    if (
        isinstance(public_fraction, bool)
        or not isinstance(public_fraction, (int, float, np.floating))
        or not (0.0 <= float(public_fraction) < 1.0)
    ):
        raise ValueError(
            f"invalid public_fraction={public_fraction!r}: a number in [0, 1) is allowed"
        )
    if public_size is not None:
        public_size = check_int("public_size", public_size, 0)
        if public_fraction > 0:
            raise ValueError(
                f"give either public_fraction ({public_fraction!r}) or public_size "
                f"({public_size!r}), not both"
            )
    if max_train_samples is not None:
        max_train_samples = check_int("max_train_samples", max_train_samples, 1)
    params = dict(partition_params or {})
    num_classes = int(source.num_classes)
    schedule = make_drift_schedule(drift, num_classes=num_classes, num_clients=k, seed=seed)
    shift = make_feature_shift(feature_shift, feature_shift_groups, partition=scheme, input_kind=source.input_kind,
                               input_shape=tuple(source.input_shape), train_x=source.train.x)

    y_all = source.train.y
    if y_all.size and (y_all.min() < 0 or y_all.max() >= num_classes):
        raise ValueError(f"{source.name}: train labels outside 0..{num_classes - 1}")

    # 1. optional stratified subsample of the train split
    pool = np.arange(y_all.size, dtype=np.int64)
    if max_train_samples is not None and max_train_samples < pool.size:
        rng = numpy_rng(seed, "data", "subsample")
        class_sizes = np.bincount(y_all, minlength=num_classes)
        take = apportion(max_train_samples, class_sizes)
        pool = np.sort(
            np.concatenate(
                [
                    rng.choice(np.flatnonzero(y_all == c), size=int(take[c]), replace=False)
                    for c in range(num_classes)
                    if take[c] > 0
                ]
            )
        )

    # 2. class-balanced public carve-out
    y_pool = y_all[pool]
    class_sizes = np.bincount(y_pool, minlength=num_classes)
    rng = numpy_rng(seed, "data", "public")
    if public_size is not None:
        if public_size > pool.size:
            raise ValueError(
                f"invalid public_size={public_size!r}: at most the number of train samples "
                f"({pool.size}) is allowed"
            )
        pub_counts = _balanced_counts(class_sizes, public_size, rng)
    else:
        pub_counts = np.floor(class_sizes * float(public_fraction) + 0.5).astype(np.int64)
    public_parts = [
        rng.choice(pool[y_pool == c], size=int(pub_counts[c]), replace=False)
        for c in range(num_classes)
        if pub_counts[c] > 0
    ]
    public_indices = (
        np.sort(np.concatenate(public_parts)) if public_parts else np.empty(0, np.int64)
    )
    private_pool = np.setdiff1d(pool, public_indices, assume_unique=True)
    if private_pool.size < k:
        raise ValueError(
            f"only {private_pool.size} train samples remain after the public carve-out "
            f"({public_indices.size}), fewer than num_clients={k}"
        )

    # 3. partition the rest
    part = partition_labels(
        scheme, y_all[private_pool], k, numpy_rng(seed, "data", "partition", scheme), **params
    )
    train_indices = [private_pool[ix] for ix in part.client_indices]

    # Always-on audit (not an `assert`, which `python -O` would strip).
    used = np.concatenate(train_indices + [public_indices])
    if np.unique(used).size != used.size or used.size != pool.size:
        raise AssertionError(
            "data split audit failed: public and client train indices overlap or do not cover the "
            "train pool"
        )
    if np.intersect1d(public_indices, np.concatenate(train_indices)).size:
        raise AssertionError("data split audit failed: public indices overlap client indices")

    # 4. client test sets that follow each client's train label distribution
    counts = np.stack([np.bincount(y_all[ix], minlength=num_classes) for ix in train_indices])
    y_test = source.test.y
    rng = numpy_rng(seed, "data", "client_test")
    test_parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in range(num_classes):
        idx = np.flatnonzero(y_test == c)
        total = counts[:, c].sum()
        if idx.size == 0 or total == 0:
            continue
        owner = rng.choice(k, size=idx.size, p=counts[:, c] / total)
        for i in np.unique(owner):
            test_parts[i].append(idx[owner == i])
    test_indices = [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64)
        for p in test_parts
    ]

    # 5. task ids from the drift schedule (the splits above do not depend on it)
    train, test, tasks = source.train, source.test, _source_tasks(source)
    if schedule is not None:
        tasks = tuple(schedule.tasks)
        train = _with_tasks(train, schedule.task_ids(train.y))
        test = _with_tasks(test, schedule.task_ids(test.y))

    # 6. feature shift: each client's own images take its group's transform (nothing else changes)
    client_train = [train.subset(ix) for ix in train_indices]
    client_test = [test.subset(ix) for ix in test_indices]
    groups = None if part.groups is None else np.array(part.groups)
    if shift is not None:
        groups = shift.groups(k)
        client_train = [_shifted(d, shift, int(g)) for d, g in zip(client_train, groups)]
        client_test = [_shifted(d, shift, int(g)) for d, g in zip(client_test, groups)]

    return FederatedData(
        name=source.name,
        input_shape=tuple(source.input_shape),
        num_classes=num_classes,
        client_train=client_train,
        client_test=client_test,
        public=PublicSet(source.train.x[public_indices], y_all[public_indices]),
        global_test=test,
        client_groups=groups,
        train_indices=train_indices,
        public_indices=public_indices,
        test_indices=test_indices,
        scheme=scheme,
        seed=seed,
        input_kind=source.input_kind,
        value_range=source.value_range,
        tasks=tasks,
        drift=schedule,
        shift=shift,
    )


def _shifted(data: ArrayDataset, shift: FeatureShift, group: int) -> ArrayDataset:
    """``data`` with its inputs as group ``group`` sees them (labels and task ids unchanged)."""
    return data if group == 0 else ArrayDataset(shift.apply(data.x, group), data.y, data.task)


def _with_tasks(data: ArrayDataset, task: np.ndarray | None) -> ArrayDataset:
    """``data`` with task ids ``task`` (same arrays, no copy), or ``data`` itself for None."""
    return data if task is None else ArrayDataset(data.x, data.y, task)


def _source_tasks(source: DatasetSource) -> tuple[str, ...]:
    """Names ``task_0 ..`` for task ids a source already carries, else ``()``."""
    ids = [d.task for d in (source.train, source.test) if d.task is not None and d.task.size]
    if not ids:
        return ()
    return tuple(f"task_{t}" for t in range(max(int(t.max()) for t in ids) + 1))
