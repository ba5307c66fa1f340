"""Drift schedules: how a client's train and test data change over rounds.

A schedule is a partitioning option (``build_federated_data(..., drift={...})``). It never
changes which samples a client owns; it gives samples task ids and says, per client and round,
which of the client's samples make up its view. :class:`~hetpfl.data.federated.FederatedData`
builds each distinct view once (:meth:`DriftSchedule.view_key` names it) and serves it from
``train_at`` / ``test_at``.

Schemes (:data:`DRIFT_SCHEMES`):

* ``none``: no drift (the same as ``drift=None``): every round sees the whole static split.
* ``class_incremental(tasks, rounds_per_task)``: the classes are split into ``tasks`` tasks of
  consecutive class ids, as even as possible (split-MNIST: 10 classes, 5 tasks ->
  {0,1},{2,3},...). Round ``r`` trains on task ``t(r) = min(r // rounds_per_task, tasks - 1)``
  only, and tests on every task seen so far (``0 .. t(r)``).

A new schedule (a per-client task order, a stream fed in chunks per round, ...) is one class
that follows :class:`DriftSchedule` plus one entry in :data:`DRIFT_SCHEMES`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from hetpfl.configuration import ConfigError, check_keys
from hetpfl.data._common import check_int
from hetpfl.data.sources.base import ArrayDataset

__all__ = ["DRIFT_SCHEMES", "ClassIncremental", "DriftSchedule", "make_drift_schedule"]

SPLITS = ("train", "test")


@runtime_checkable
class DriftSchedule(Protocol):
    """How every client's train and test views change over rounds (deterministic, picklable)."""

    scheme: str
    tasks: tuple[str, ...]  # task names; a sample's task id indexes this tuple (empty: no tasks)

    def task_ids(self, labels: np.ndarray) -> np.ndarray | None:
        """The task id of every sample, from its label (None: the schedule has no tasks)."""
        ...

    def view_key(self, split: str, client: int, rnd: int) -> Hashable | None:
        """Which view of ``client``'s ``split`` (``"train"`` or ``"test"``) round ``rnd`` (from 0)
        uses. Equal keys mean equal views (built once); None means the whole static split."""
        ...

    def select(self, split: str, data: ArrayDataset, key: Hashable) -> np.ndarray:
        """Positions in ``data`` (one client's whole ``split``) of the samples in view ``key``."""
        ...

    def describe(self) -> str:
        """A short phrase for :meth:`FederatedData.describe`."""
        ...


@dataclass(frozen=True)
class ClassIncremental:
    """Class-incremental tasks: consecutive class ids form ``num_tasks`` tasks; round ``r`` trains
    on task ``min(r // rounds_per_task, num_tasks - 1)`` and tests on all tasks seen so far."""

    num_classes: int
    num_tasks: int
    rounds_per_task: int

    scheme: ClassVar[str] = "class_incremental"
    OPTIONS: ClassVar[tuple[str, ...]] = ("tasks", "rounds_per_task")

    def __post_init__(self) -> None:
        classes = check_int("num_classes", self.num_classes, 1)
        tasks = check_int("drift.tasks", self.num_tasks, 1)
        if tasks > classes:
            raise ValueError(
                f"invalid drift.tasks={self.num_tasks!r}: at most the number of classes "
                f"({classes}) is allowed"
            )
        check_int("drift.rounds_per_task", self.rounds_per_task, 1)

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], *, num_classes: int, num_clients: int, seed: int
    ) -> ClassIncremental:
        for key in cls.OPTIONS:
            if key not in options:
                raise ConfigError(
                    f"drift scheme {cls.scheme!r}: missing option {key!r} (an integer >= 1)"
                )
        return cls(num_classes, options["tasks"], options["rounds_per_task"])

    @property
    def task_classes(self) -> tuple[tuple[int, ...], ...]:
        """The class ids of every task (consecutive, sizes differ by at most one)."""
        parts = np.array_split(np.arange(self.num_classes), self.num_tasks)
        return tuple(tuple(int(c) for c in p) for p in parts)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(f"task_{t}" for t in range(self.num_tasks))

    def task_at(self, rnd: int) -> int:
        """The training task of round ``rnd`` (rounds count from 0)."""
        r = check_int("rnd", rnd, 0)
        return min(r // self.rounds_per_task, self.num_tasks - 1)

    def task_ids(self, labels: np.ndarray) -> np.ndarray:
        y = np.asarray(labels)
        if y.size and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"class_incremental drift: labels outside 0..{self.num_classes - 1} have no task"
            )
        sizes = [len(c) for c in self.task_classes]
        task_of_class = np.repeat(np.arange(self.num_tasks, dtype=np.int64), sizes)
        return task_of_class[y.astype(np.int64, copy=False)]

    def view_key(self, split: str, client: int, rnd: int) -> int | None:
        t = self.task_at(rnd)
        if split == "train":
            return None if self.num_tasks == 1 else t
        if split == "test":
            return None if t == self.num_tasks - 1 else t  # every task seen: the whole split
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")

    def select(self, split: str, data: ArrayDataset, key: Hashable) -> np.ndarray:
        if data.task is None:
            if len(data) == 0:
                return np.empty(0, dtype=np.int64)
            raise ValueError(
                "class_incremental drift needs task ids on the data (ArrayDataset.task); "
                "build it with build_federated_data(..., drift=...)"
            )
        if split == "train":
            return np.flatnonzero(data.task == key)
        return np.flatnonzero(data.task <= key)

    def describe(self) -> str:
        return (
            f"class-incremental drift over {self.num_tasks} tasks of classes "
            f"{[list(c) for c in self.task_classes]}, {self.rounds_per_task} rounds each"
        )


def _no_drift(options: Mapping[str, Any], *, num_classes: int, num_clients: int, seed: int) -> None:
    return None


ScheduleFactory = Callable[..., "DriftSchedule | None"]

DRIFT_SCHEMES: dict[str, tuple[tuple[str, ...], ScheduleFactory]] = {
    "none": ((), _no_drift),
    ClassIncremental.scheme: (ClassIncremental.OPTIONS, ClassIncremental.from_options),
}
"""Scheme name -> (its option names, factory ``(options, *, num_classes, num_clients, seed)``)."""


def make_drift_schedule(
    drift: Mapping[str, Any] | DriftSchedule | None,
    *,
    num_classes: int,
    num_clients: int,
    seed: int,
) -> DriftSchedule | None:
    """The schedule described by ``drift`` (``{"scheme": name, **options}``), or None for no drift.

    A ready :class:`DriftSchedule` is returned as is. Raises ``ValueError`` naming the bad key:
    :class:`~hetpfl.configuration.ConfigError` for a missing or unknown scheme, an unknown or
    missing option; ``invalid drift.<option>=<value>: ...`` for a value out of range.
    """
    if drift is None:
        return None
    if isinstance(drift, DriftSchedule):
        return drift
    if not isinstance(drift, Mapping):
        raise ConfigError(
            f"drift must be a mapping like {{'scheme': 'class_incremental', 'tasks': 5, "
            f"'rounds_per_task': 10}} or None, got {type(drift).__name__} {drift!r}"
        )
    if "scheme" not in drift:
        raise ConfigError(f"drift: missing key 'scheme' (allowed schemes: {', '.join(DRIFT_SCHEMES)})")
    scheme = drift["scheme"]
    if not isinstance(scheme, str) or scheme not in DRIFT_SCHEMES:
        raise ConfigError(f"invalid drift.scheme={scheme!r}: allowed: {', '.join(DRIFT_SCHEMES)}")
    option_names, factory = DRIFT_SCHEMES[scheme]
    check_keys("drift", drift, ("scheme", *option_names), what="option")
    options = {k: v for k, v in drift.items() if k != "scheme"}
    return factory(options, num_classes=num_classes, num_clients=num_clients, seed=seed)
