"""The in-process runtime: fast, deterministic, the default.

Clients run inside this process through a :class:`~hetpfl.clienthost.ClientHost`; *how* they are
executed is an :class:`~hetpfl.executors.Executor` choice that no algorithm sees
(:mod:`hetpfl.executors`): one by one in this process (``sequential``, the reference), or spread
over worker processes (``processes``), or each client in a process of its own holding only its
data (``isolated``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .algorithms.base import EVALUATE_STAGE
from .clienthost import ClientHost, StateStore, make_store
from .engine import CheckpointPolicy, Exchange, RunSpec, run_rounds
from .executors import Executor, Failed, SequentialExecutor, make_executor
from .messages import Message
from .rng import numpy_rng


class InProcessTransport:
    """Delivers each stage's messages to the hosted clients and collects their replies."""

    def __init__(self, host: ClientHost, executor: Executor | None = None) -> None:
        self.host = host
        self.executor = executor or SequentialExecutor()
        self.states = host.store

    def exchange(self, stage: str, rnd: int, messages: Mapping[int, Message]) -> Exchange:
        started = time.perf_counter()
        groups = self.host.groups(list(messages))
        # A raising client is recorded as a deployment would (unless the run says raise). A
        # one-by-one executor runs each client alone (the same calls in the same order), so one
        # failure takes no other client with it; a batched group fails together (one that its
        # handler declines, or that has none, runs client by client in the executor).
        if not self.executor.batched:
            groups = [[c] for group in groups for c in group]
        dropped, late = self._simulated_faults(stage, rnd, list(messages))
        failures = {c: "did not answer (simulated: runtime.dropout)" for c in sorted(dropped)}
        failures.update({c: "missed the stage's deadline (simulated: runtime.stragglers)" for c in sorted(late)})
        groups = [[c for c in group if c not in dropped] for group in groups]
        outcomes = self.executor.run(self.host, stage, rnd, [g for g in groups if g], messages)
        replies = {c: out for c, out in outcomes.items() if not isinstance(out, Failed)}
        failures.update({c: out.describe() for c, out in sorted(outcomes.items()) if isinstance(out, Failed)})
        return Exchange(replies={c: replies[c] for c in sorted(replies) if c not in late}, failures=failures,
                        client_seconds=time.perf_counter() - started, undelivered=dropped)

    def score_models(self, models: Mapping[int, Any], rnd: int) -> dict[int, float] | None:
        """Where the executor keeps the clients' data apart, it scores the server's models there."""
        scorer = getattr(self.executor, "score_models", None)
        return None if scorer is None else scorer(self.host, models, rnd)

    def map_work(self, work: Callable[..., Any], tasks: list[tuple]) -> list[Any] | None:
        """The server's independent work over the executor's workers, where it has them."""
        sharer = getattr(self.executor, "map_work", None)
        return None if sharer is None else sharer(self.host, work, tasks)

    @property
    def map_workers(self) -> int:
        """How many of ``map_work``'s tasks run at once (1 where the executor has no workers for them)."""
        return int(getattr(self.executor, "map_workers", 1))

    def _simulated_faults(self, stage: str, rnd: int, clients: list[int]) -> tuple[set[int], set[int]]:
        """Which clients drop out (never get the message) and which straggle (work, but too late),
        drawn from the seed per (round, stage, client); evaluation is the experimenter's, never dropped."""
        run = self.host.run
        if stage == EVALUATE_STAGE or (run.dropout == 0 and run.stragglers == 0):
            return set(), set()
        draws = {c: numpy_rng(run.seed, "faults", rnd, stage, c).random(2) for c in clients}
        dropped = {c for c, (u, _) in draws.items() if u < run.dropout}
        late = {c for c, (_, v) in draws.items() if c not in dropped and v < run.stragglers}
        return dropped, late


def simulate(
    run: RunSpec,
    *,
    client_state: str = "memory",
    executor: str | Executor = "sequential",
    workers: int = 0,
    store: StateStore | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: CheckpointPolicy | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``run`` in this process; returns the summary (records go to ``on_round``)."""
    if isinstance(executor, str):
        executor = make_executor(executor, workers)
    host = ClientHost(run, store if store is not None else make_store(client_state))
    try:
        executor.start(host)
        summary = run_rounds(run, InProcessTransport(host, executor), on_round=on_round, checkpoint=checkpoint,
                             resume=resume)
        if executor.batched:
            summary["batched_groups"] = host.batched_groups  # group calls trained as one stacked model
        return summary
    finally:
        executor.close()
