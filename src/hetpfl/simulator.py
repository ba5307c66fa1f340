"""The in-process runtime: fast, deterministic, the default.

Clients run inside this process through a :class:`~hetpfl.clienthost.ClientHost`; *how* they are
executed is an :class:`Executor` choice that no algorithm sees. An executor receives the stage,
the round and the asked clients grouped by their module architectures, and runs each group
through the host: one by one (:class:`SequentialExecutor`, the reference), or, for an executor
with ``batched = True``, through a client's batched handler ``<stage>_many`` where it has one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from .algorithms.base import EVALUATE_STAGE
from .clienthost import ClientHost, StateStore, make_store
from .engine import CheckpointPolicy, Exchange, RunSpec, run_rounds
from .messages import Message
from .rng import numpy_rng


class Executor(Protocol):
    """Runs the groups of one stage. ``batched``: offer each group to the method's batched
    handler (``<stage>_many``) when the method has one."""

    batched: bool

    def run(self, host: ClientHost, stage: str, rnd: int, groups: list[list[int]],
            messages: Mapping[int, Message]) -> dict[int, Message]: ...


class SequentialExecutor:
    """Every group in turn, every client of a group one after the other, in client-id order."""

    batched = False

    def run(self, host: ClientHost, stage: str, rnd: int, groups: list[list[int]],
            messages: Mapping[int, Message]) -> dict[int, Message]:
        replies: dict[int, Message] = {}
        for group in groups:
            replies.update(host.handle_group(group, stage, rnd, messages, batched=self.batched))
        return replies


EXECUTORS: dict[str, type] = {"sequential": SequentialExecutor}


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
        # failure takes no other client with it; a batched group fails together.
        if not self.executor.batched:
            groups = [[c] for group in groups for c in group]
        dropped, late = self._simulated_faults(stage, rnd, list(messages))
        failures = {c: "did not answer (simulated: runtime.dropout)" for c in sorted(dropped)}
        failures.update({c: "missed the stage's deadline (simulated: runtime.stragglers)" for c in sorted(late)})
        replies = {}
        for group in groups:
            group = [c for c in group if c not in dropped]
            if not group:
                continue
            try:
                replies.update(self.executor.run(self.host, stage, rnd, [group], messages))
            except Exception as exc:  # noqa: BLE001  (any error of a client's code is that client's failure)
                if self.host.run.on_client_error == "raise":
                    raise
                failures.update({c: f"raised {type(exc).__name__}: {exc}" for c in group})
        return Exchange(replies={c: replies[c] for c in sorted(replies) if c not in late}, failures=failures,
                        client_seconds=time.perf_counter() - started, undelivered=dropped)

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
    store: StateStore | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: CheckpointPolicy | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``run`` in this process; returns the summary (records go to ``on_round``)."""
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise ValueError(f"runtime.executor={executor!r} is not supported (allowed: {', '.join(EXECUTORS)})")
        executor = EXECUTORS[executor]()
    host = ClientHost(run, store if store is not None else make_store(client_state))
    return run_rounds(run, InProcessTransport(host, executor), on_round=on_round, checkpoint=checkpoint,
                      resume=resume)
