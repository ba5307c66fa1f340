"""The in-process runtime: fast, deterministic, the default.

Clients run inside this process through a :class:`~hetpfl.clienthost.ClientHost`; *how* they are
executed is an :class:`Executor` choice (sequential now) that no algorithm sees.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Protocol

from .clienthost import ClientHost, StateStore, make_store
from .engine import Exchange, RunSpec, run_rounds
from .messages import Message


class Executor(Protocol):
    def run(self, tasks: list[tuple[int, Callable[[], Message]]]) -> list[tuple[int, Message]]: ...


class SequentialExecutor:
    """One client after the other, in client-id order."""

    def run(self, tasks: list[tuple[int, Callable[[], Message]]]) -> list[tuple[int, Message]]:
        return [(client, task()) for client, task in tasks]


EXECUTORS = {"sequential": SequentialExecutor}


class InProcessTransport:
    """Delivers each stage's messages to the hosted clients and collects their replies."""

    remote = False  # an invalid reply is a bug in this process: raise it

    def __init__(self, host: ClientHost, executor: Executor | None = None) -> None:
        self.host = host
        self.executor = executor or SequentialExecutor()

    def exchange(self, stage: str, rnd: int, messages: Mapping[int, Message]) -> Exchange:
        tasks = [(c, (lambda c=c: self.host.handle(c, stage, rnd, messages[c]))) for c in sorted(messages)]
        started = time.perf_counter()
        replies = dict(self.executor.run(tasks))
        return Exchange(replies=replies, client_seconds=time.perf_counter() - started)


def simulate(
    run: RunSpec,
    *,
    client_state: str = "memory",
    executor: str = "sequential",
    store: StateStore | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``run`` in this process; returns the summary (records go to ``on_round``)."""
    if executor not in EXECUTORS:
        raise ValueError(f"runtime.executor={executor!r} is not supported (allowed: {', '.join(EXECUTORS)})")
    host = ClientHost(run, store if store is not None else make_store(client_state))
    return run_rounds(run, InProcessTransport(host, EXECUTORS[executor]()), on_round=on_round)
