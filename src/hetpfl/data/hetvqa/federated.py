"""A HetVQA scenario as the engine's federated data: every client's examples as references into one
shared, read-only example store, and what each client sees in each round.

The engine, the client hosts and both runtimes read :class:`~hetpfl.data.FederatedData`;
:class:`HetVQAData` is one. Its samples are references, not inputs: row ``i`` of a split holds
``x[i] = (task id, example index)`` into :attr:`HetVQAData.store` (``task id`` indexes
``data.tasks``), ``y[i]`` the first answer token and ``task[i]`` the task id. A client's model reads a
batch through the store (:meth:`ExampleStore.sets`, then :func:`~.examples.make_batch`), and
every party rebuilds the same store from the scenario and the offline datasets, so no example ever
travels.

Per round (``train_at`` / ``test_at``):

* train: the examples that *arrive* at the client in that round (the scenario's schedule;
  :meth:`~.scenario.Scenario.arrivals`); a client keeps them in its replay memory;
* test (**Self**): the client's test examples of every task it has met so far (dynamic: the tasks up
  to the current one; static: all its tasks, which arrive mixed from the first round);
* :meth:`HetVQAData.others_at` (**Others**): at most ``others_per_task`` test examples of every task
  the *other* clients have met so far and this client never trains on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hetpfl.configuration import Validated, option
from hetpfl.data.federated import FederatedData
from hetpfl.data.public import PublicSet
from hetpfl.data.sources import ArrayDataset

from .examples import TaskExamples, TaskSet, build_examples, build_task_sets
from .images import IMAGE_SHAPE, PRETRAIN_SUBSET, ImagePool
from .scenario import Scenario
from .tasks import PRETRAIN_TEMPLATES, TaskSpec
from .text import Vocabulary

__all__ = ["HetVQAOptions", "ClientExamples", "ExampleStore", "HetVQAData", "build_hetvqa_data"]


@dataclass
class HetVQAOptions(Validated):
    """``data.options`` of a HetVQA run."""

    scenario: Any = None  # a scenario file's path, or the scenario itself as a mapping (configs/hetvqa/)
    train_per_task: int = option(500, ge=1)  # training examples of every task subset
    test_per_task: int = option(100, ge=1)  # test examples of every task subset (Self)
    others_per_task: int = option(50, ge=0)  # of those, how many score each client on the others' tasks
    adaptation_steps: int = option(20, ge=0)  # after the last round, steps on each unseen task (0: none)
    adaptation_examples: int = option(100, ge=1)  # training examples of each unseen task


@dataclass(frozen=True, eq=False)
class ExampleStore:
    """The examples every reference points into: the image pool, the vocabulary and each task's
    example sets (``sets[task id]``), with the task names in id order."""

    pool: ImagePool
    vocab: Vocabulary
    tasks: tuple[str, ...]
    sets: tuple[TaskSet, ...]
    unseen: dict[str, dict[str, TaskSet]] = field(default_factory=dict)  # kind -> {task: examples}

    def examples(self, split: str, task: int) -> TaskExamples:
        return getattr(self.sets[task], split)

    def grouped(self, rows: ArrayDataset) -> dict[int, np.ndarray]:
        """``{task id: example indices}`` of the references in ``rows`` (tasks in id order)."""
        refs = rows.x
        return {int(t): refs[refs[:, 0] == t, 1] for t in np.unique(refs[:, 0])}


@dataclass(frozen=True, eq=False)
class ClientExamples:
    """A client's handle on the benchmark in one round: the store its references point into, its
    **Others** split (references too), and in the last round the fast-adaptation budget."""

    store: ExampleStore
    others: ArrayDataset
    adaptation_steps: int = 0  # > 0 only in the run's last round: then adapt to each unseen task
    # the generic examples every party may use (FedMD-style public data): n -> (pool, example sets)
    public: Callable[[int], tuple[ImagePool, list[TaskExamples]]] | None = None


def _references(store: ExampleStore, split: str, task: int, indices: np.ndarray) -> ArrayDataset:
    examples = store.examples(split, task)
    indices = np.asarray(indices, dtype=np.int64)
    first_answer = examples.text[indices, examples.prompt_len[indices]]
    refs = np.stack((np.full(indices.size, task, dtype=np.int64), indices), axis=1)
    return ArrayDataset(refs, first_answer, np.full(indices.size, task, dtype=np.int64))


def _concat(parts: list[ArrayDataset]) -> ArrayDataset:
    if not parts:
        return ArrayDataset(np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return ArrayDataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                        np.concatenate([p.task for p in parts]))


@dataclass(eq=False)
class HetVQAData(FederatedData):
    """Federated HetVQA (module docstring). ``backbone_options``: per architecture, the builder
    options of a client's model (pretrained checksum, LoRA settings), filled in by ``prepare``."""

    store: ExampleStore | None = None
    scenario: Scenario | None = None
    others_per_task: int = 50
    adaptation_steps: int = 0
    final_round: int = -1  # the run's last round (prepare sets it; fast adaptation happens there)
    backbone_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _task_ids(self, names: tuple[str, ...]) -> list[int]:
        return [self.tasks.index(t) for t in names]

    def seen_tasks(self, client: int, rnd: int) -> list[int]:
        """Ids of the tasks ``client`` has met by round ``rnd``."""
        plan = self.scenario.clients[client].tasks
        if self.scenario.mode == "static":
            return self._task_ids(plan)
        return self._task_ids(plan[: self.scenario.current_task(rnd) + 1])

    def train_at(self, client: int, rnd: int) -> ArrayDataset:
        key = ("train", client, rnd)
        if key not in self._views:
            sizes = {t: len(self.store.sets[self.tasks.index(t)].train) for t in self.scenario.clients[client].tasks}
            arrivals = self.scenario.arrivals(client, rnd, sizes, seed=self.seed or 0)
            view = _concat([_references(self.store, "train", self.tasks.index(t), idx) for t, idx in arrivals])
            self._views[key] = (None, view)
        return self._views[key][1]

    def test_at(self, client: int, rnd: int) -> ArrayDataset:
        seen = tuple(self.seen_tasks(client, rnd))
        key = ("test", client, seen)
        if key not in self._views:
            test = self.client_test[client]
            self._views[key] = (None, test.subset(np.flatnonzero(np.isin(test.task, seen))))
        return self._views[key][1]

    def others_at(self, client: int, rnd: int) -> ArrayDataset:
        """The **Others** split of ``client`` in round ``rnd`` (module docstring)."""
        own = set(self._task_ids(self.scenario.clients[client].tasks))
        met = sorted({t for c in range(self.num_clients) if c != client for t in self.seen_tasks(c, rnd)} - own)
        key = ("others", client, tuple(met))
        if key not in self._views:
            parts = [_references(self.store, "test", t, np.arange(min(self.others_per_task, len(self.store.sets[t].test))))
                     for t in met]
            self._views[key] = (None, _concat(parts))
        return self._views[key][1]

    def server_examples(self, n: int) -> tuple[ImagePool, list[TaskExamples]]:
        """Generic examples the server — or, as public data, any party — may use (PerAda's and
        FedDistill's distillation, FedMosaic's alignment): the pretraining mix's questions on the
        pretraining subset's images, ``n`` per (template, source) — an instruction mix like LLaVA's,
        never a client's examples."""
        key = ("server", n)
        if key not in self._views:
            sets = [build_examples(self.store.pool, self.store.vocab, TaskSpec(t, source), PRETRAIN_SUBSET, "train", n)
                    for t in PRETRAIN_TEMPLATES.values() for source in t.sources if source in self.store.pool.train]
            self._views[key] = (None, sets)
        return self.store.pool, self._views[key][1]

    def client_examples(self, client: int, rnd: int) -> ClientExamples:
        """What a client's context carries besides its splits (``ctx.examples``)."""
        return ClientExamples(self.store, self.others_at(client, rnd),
                              self.adaptation_steps if rnd == self.final_round else 0, self.server_examples)

    def describe(self) -> str:
        sizes = [len(d) for d in self.client_train]
        return (f"hetvqa scenario {self.scenario.name} ({self.scenario.mode}, {self.scenario.rounds_per_task} rounds "
                f"per task): {self.num_clients} clients, {len(self.tasks)} task subsets, "
                f"{self.scenario.tasks_per_client} tasks per client; training examples per client {min(sizes)}.."
                f"{max(sizes)}, test examples per task {len(self.store.sets[0].test)}, Others up to "
                f"{self.others_per_task} per task; models {sorted({c.model for c in self.scenario.clients})}.")


def build_hetvqa_data(scenario: Scenario, pool: ImagePool, vocab: Vocabulary, *, train_per_task: int,
                      test_per_task: int, others_per_task: int = 50, adaptation_steps: int = 0,
                      adaptation_examples: int = 100, seed: int = 0) -> HetVQAData:
    """The federated view of ``scenario`` with ``train_per_task`` / ``test_per_task`` examples of each
    task subset (drawn from the benchmark's fixed streams, the same for every run). ``seed`` (the run
    seed) orders each client's arrivals. With ``adaptation_steps`` > 0, the scenario's unseen tasks
    get ``adaptation_examples`` training and ``test_per_task`` test examples each."""
    tasks = scenario.task_names
    sets = build_task_sets(pool, vocab, list(tasks), train_per_task, test_per_task)
    unseen = {kind: build_task_sets(pool, vocab, list(names), adaptation_examples, test_per_task)
              for kind, names in scenario.unseen.items() if names and adaptation_steps > 0}
    store = ExampleStore(pool, vocab, tasks, tuple(sets[t] for t in tasks), unseen)
    client_train, client_test = [], []
    for plan in scenario.clients:
        ids = [tasks.index(t) for t in plan.tasks]
        client_train.append(_concat([_references(store, "train", t, np.arange(train_per_task)) for t in ids]))
        client_test.append(_concat([_references(store, "test", t, np.arange(test_per_task)) for t in ids]))
    empty = np.zeros((0, 2), dtype=np.int64)
    return HetVQAData(
        name="hetvqa", input_shape=IMAGE_SHAPE, num_classes=len(vocab), client_train=client_train,
        client_test=client_test, public=PublicSet(empty, np.zeros(0, dtype=np.int64)),
        global_test=_concat([_references(store, "test", t, np.arange(test_per_task)) for t in range(len(tasks))]),
        client_groups=None, train_indices=[], public_indices=np.zeros(0, dtype=np.int64), scheme=f"scenario:{scenario.name}",
        seed=seed, input_kind="image", tasks=tasks, store=store, scenario=scenario, others_per_task=others_per_task,
        adaptation_steps=adaptation_steps, final_round=scenario.num_rounds - 1,
    )
