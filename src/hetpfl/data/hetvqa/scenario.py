"""HetVQA scenarios (data files) and their schedule: which examples reach which client in which round,
and the per-client replay memory training batches are drawn from.

A scenario file (YAML) names its clients, each with a model and its tasks in order::

    name: homo_dynamic
    mode: dynamic          # or static
    rounds_per_task: 5
    clients:
      - {model: vlm_llama_s, tasks: [recognize_mnist/0, same_mnist/0, odd_mnist/0, sum_mnist/0]}
      ...
    unseen:                # after the run: fast adaptation on tasks no client trained on
      new_type: [difference_mnist/0]
      new_domain: [recognize_mnist@rotate/0]

**PFL-Dynamic** (``dynamic``): all clients switch task together every ``rounds_per_task`` rounds; in
round ``r`` of a task a client receives the next ``1/rounds_per_task`` slice of that task's (shuffled)
training examples. **PFL-Static** (``static``): a client's tasks are pooled, shuffled and dealt over
all rounds. Either way what arrives is appended to the client's :class:`ReplayMemory` and training
batches are drawn from the whole memory, favouring rarely used examples, so earlier tasks are
rehearsed (as the official FedMosaic code does).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetpfl.configuration import ConfigError, FieldError, load_yaml
from hetpfl.rng import numpy_rng

from .images import PRETRAIN_SUBSET
from .tasks import parse_task

__all__ = ["MODES", "UNSEEN_KINDS", "ClientPlan", "ReplayMemory", "Scenario", "load_scenario", "parse_scenario", "read_scenario"]

MODES = ("dynamic", "static")
_KEYS = ("name", "mode", "rounds_per_task", "clients", "unseen")
UNSEEN_KINDS = ("new_type", "new_domain")  # unseen tasks: a new question type; a known type in a new domain


@dataclass(frozen=True)
class ClientPlan:
    """One client: its model (a ``vlm_*`` architecture) and its tasks (``<task>/<subset>``) in order."""

    model: str
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str
    rounds_per_task: int
    clients: tuple[ClientPlan, ...]
    unseen: dict[str, tuple[str, ...]]

    @property
    def tasks_per_client(self) -> int:
        return len(self.clients[0].tasks)

    @property
    def num_rounds(self) -> int:
        return self.tasks_per_client * self.rounds_per_task

    @property
    def task_names(self) -> tuple[str, ...]:
        """Every task subset a client trains on, in first-seen order."""
        return tuple(dict.fromkeys(t for c in self.clients for t in c.tasks))

    def relatedness(self) -> np.ndarray:
        """``(clients, clients)``: the Jaccard overlap of two clients' task types — the (template,
        source) pairs of their tasks, ignoring subsets and domains — 1 on the diagonal. The truth a
        relevance-aware method (RELA) should find."""
        kinds = [{(parse_task(t)[0].template.name, parse_task(t)[0].source) for t in c.tasks} for c in self.clients]
        return np.array([[len(a & b) / len(a | b) for b in kinds] for a in kinds])

    def current_task(self, round_index: int) -> int:
        """The position (in every client's list) of the task trained in ``round_index`` (dynamic)."""
        return min(round_index // self.rounds_per_task, self.tasks_per_client - 1)

    def arrivals(self, client: int, round_index: int, sizes: dict[str, int], seed: int = 0) -> list[tuple[str, np.ndarray]]:
        """The (task, example indices) that reach ``client`` in ``round_index``; ``sizes`` gives each
        task's number of training examples. Deterministic in (seed, client)."""
        if not 0 <= round_index < self.num_rounds:
            raise ValueError(f"scenario {self.name!r}: round {round_index} is outside 0..{self.num_rounds - 1}")
        plan = self.clients[client]
        rng = numpy_rng(seed, "hetvqa", "stream", client)
        orders = {t: rng.permutation(sizes[t]) for t in plan.tasks}
        if self.mode == "dynamic":
            task = plan.tasks[self.current_task(round_index)]
            part = np.array_split(orders[task], self.rounds_per_task)[round_index % self.rounds_per_task]
            return [(task, np.sort(part))]
        pooled = [(t, i) for t in plan.tasks for i in orders[t]]
        order = rng.permutation(len(pooled))
        part = np.array_split(order, self.num_rounds)[round_index]
        out = []
        for task in plan.tasks:
            picked = np.array(sorted(pooled[j][1] for j in part if pooled[j][0] == task), dtype=np.int64)
            if picked.size:
                out.append((task, picked))
        return out


def _check_task(key: str, text: Any) -> str:
    try:
        _, subset = parse_task(str(text))
    except ValueError as err:
        raise FieldError(key, text, re.sub(r" \(in '[^']*'\)", "", str(err))) from None  # the key says where
    if subset is None:
        raise FieldError(key, text, "name a subset: '<task>/<k>' (disjoint images of the task's source)")
    if subset >= PRETRAIN_SUBSET:
        raise FieldError(key, text, f"subsets 0..{PRETRAIN_SUBSET - 1} are for tasks "
                                    f"(subset {PRETRAIN_SUBSET} is kept for pretraining)")
    return str(text)


def parse_scenario(tree: Any, models: Collection[str], where: str = "scenario") -> Scenario:
    """A :class:`Scenario` from a parsed YAML mapping whose clients' models must be among ``models``
    (the caller's registry: ``hetpfl.models.VLM_ARCHITECTURES``; the data layer does not know models).
    Raises :class:`FieldError` naming the field for an unknown key, task, model or mode, an empty
    client list, clients with different numbers of tasks (they switch together) or a task listed
    twice for one client."""

    if not isinstance(tree, dict):
        raise FieldError(where, tree, "a scenario is a mapping with keys " + ", ".join(_KEYS))
    for key in tree:
        if key not in _KEYS:
            raise FieldError(f"{where}.{key}", tree[key], f"unknown key; keys: {', '.join(_KEYS)}")
    mode = tree.get("mode", "dynamic")
    if mode not in MODES:
        raise FieldError(f"{where}.mode", mode, f"must be one of {', '.join(MODES)}")
    rounds = tree.get("rounds_per_task", 5)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise FieldError(f"{where}.rounds_per_task", rounds, "must be an int >= 1")
    clients = tree.get("clients")
    if not isinstance(clients, list) or not clients:
        raise FieldError(f"{where}.clients", clients, "must be a non-empty list of {model, tasks}")
    plans = []
    for i, client in enumerate(clients):
        key = f"{where}.clients[{i}]"
        if not isinstance(client, dict) or set(client) != {"model", "tasks"}:
            raise FieldError(key, client, "must be a mapping with exactly the keys model and tasks")
        if client["model"] not in models:
            raise FieldError(f"{key}.model", client["model"], f"not a vision-language model; models: {', '.join(models)}")
        tasks = client["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise FieldError(f"{key}.tasks", tasks, "must be a non-empty list of '<task>/<subset>'")
        names = tuple(_check_task(f"{key}.tasks[{j}]", t) for j, t in enumerate(tasks))
        if len(set(names)) != len(names):
            raise FieldError(f"{key}.tasks", tasks, "lists a task twice")
        if plans and len(names) != len(plans[0].tasks):
            raise FieldError(f"{key}.tasks", tasks, f"has {len(names)} tasks but clients[0] has "
                                                    f"{len(plans[0].tasks)}: clients switch tasks together")
        plans.append(ClientPlan(str(client["model"]), names))
    unseen_tree = tree.get("unseen") or {}
    if not isinstance(unseen_tree, dict):
        raise FieldError(f"{where}.unseen", unseen_tree, f"must be a mapping with keys {', '.join(UNSEEN_KINDS)}")
    unseen = {}
    for kind, tasks in unseen_tree.items():
        if kind not in UNSEEN_KINDS:
            raise FieldError(f"{where}.unseen.{kind}", tasks, f"unknown kind; kinds: {', '.join(UNSEEN_KINDS)}")
        unseen[kind] = tuple(_check_task(f"{where}.unseen.{kind}[{j}]", t) for j, t in enumerate(tasks or []))
    trained = {t for p in plans for t in p.tasks}
    for kind, tasks in unseen.items():
        for j, t in enumerate(tasks):
            if t in trained:
                raise FieldError(f"{where}.unseen.{kind}[{j}]", t, "a client trains on it: it is not unseen")
    return Scenario(str(tree.get("name", where)), mode, rounds, tuple(plans), unseen)


def read_scenario(path: str | Path, key: str = "scenario") -> Any:
    """The parsed YAML of a scenario file (unchecked); errors name ``key``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise FieldError(key, str(path), f"cannot be read ({err.strerror})") from None
    try:
        return load_yaml(text, str(path))
    except ConfigError as err:
        raise FieldError(key, str(path), f"is not usable ({err})") from None


def load_scenario(path: str | Path, models: Collection[str]) -> Scenario:
    """Read and check a scenario file (see :func:`parse_scenario`)."""
    return parse_scenario(read_scenario(path), models, where=Path(path).stem)


class ReplayMemory:
    """A client's examples so far (``(task, index)`` keys) with use counts; batches favour rarely
    used examples: P(example) ∝ softmax(−count / temperature), counts decay by ``decay`` every step
    and grow by 1 when used (the official FedMosaic stream: T = 0.125, decay 0.99)."""

    def __init__(self, temperature: float = 0.125, decay: float = 0.99) -> None:
        if not temperature > 0 or not 0 < decay <= 1:
            raise ValueError(f"replay memory: temperature must be > 0 and decay in (0, 1], got {temperature}, {decay}")
        self.temperature, self.decay = temperature, decay
        self.keys: list[tuple[str, int]] = []
        self.counts = np.zeros(0)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, task: str, indices: np.ndarray) -> None:
        self.keys.extend((task, int(i)) for i in indices)
        self.counts = np.concatenate((self.counts, np.zeros(len(indices))))

    def sample(self, batch_size: int, rng: np.random.Generator) -> list[tuple[str, int]]:
        """Draw up to ``batch_size`` distinct examples, then update the counts."""
        if not self.keys:
            raise ValueError("replay memory is empty: nothing to train on")
        logits = -self.counts / self.temperature
        p = np.exp(logits - logits.max())
        chosen = rng.choice(len(self.keys), size=min(batch_size, len(self.keys)), replace=False, p=p / p.sum())
        self.counts *= self.decay
        self.counts[chosen] += 1
        return [self.keys[i] for i in chosen]

    def state_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "counts": self.counts.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = [(str(t), int(i)) for t, i in state["keys"]]
        self.counts = np.asarray(state["counts"], dtype=np.float64).copy()
