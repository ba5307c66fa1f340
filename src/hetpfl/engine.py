"""The round loop, written once, for every algorithm and every runtime.

A runtime supplies a :class:`Transport` (how a stage's messages reach clients and come back);
this module does everything else: the pre-drawn client-sampling stream, message validation in
both directions, exact byte accounting per client and round, time accounting, evaluation of
every client's own model (and of the algorithm's extra models) and the per-round records.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch

from .algorithms.base import EVALUATE_STAGE, AlgorithmSpec, ClientTraining, Server, ServerSetup
from .data import FederatedData
from .learn import evaluate
from .messages import Message, MessageError, compress, decompress
from .models import build_model
from .rng import derive_seed, numpy_rng


# ------------------------------------------------------------------------------------------
# What a run needs, independent of the runtime
# ------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """A resolved experiment: data, per-client architectures, the method and the schedule."""

    algorithm: AlgorithmSpec
    algorithm_config: Any
    training: ClientTraining
    data: FederatedData
    client_archs: list[str]
    seed: int
    rounds: int
    participation: float = 1.0
    eval_every: int = 1
    compression: str = "none"

    @property
    def num_clients(self) -> int:
        return self.data.num_clients

    def new_model(self, arch: str, *key: str | int) -> torch.nn.Module:
        """A freshly initialized ``arch`` whose weights depend only on (seed, key)."""
        torch.manual_seed(derive_seed(self.seed, "init", *key))
        return build_model(arch, self.data.input_shape, self.data.num_classes)

    def server_setup(self) -> ServerSetup:
        return ServerSetup(
            num_clients=self.num_clients,
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            client_archs=list(self.client_archs),
            public_inputs=self.data.public.inputs if len(self.data.public) else None,
            training=self.training,
            seed=self.seed,
            build_model=lambda arch, key: self.new_model(arch, "server", key),
        )

    def make_server(self) -> Server:
        if self.algorithm.uses_public and len(self.data.public) == 0:
            raise ValueError(f"{self.algorithm.name} needs a public set: set data.public_fraction > 0")
        return self.algorithm.server_cls(self.algorithm_config, self.server_setup())

    def schedule(self) -> list[list[int]]:
        return sampling_schedule(self.seed, self.num_clients, self.rounds, self.participation)


def sampling_schedule(seed: int, num_clients: int, rounds: int, participation: float) -> list[list[int]]:
    """Clients of every round, drawn up front from the seed (shared by all methods)."""
    k = max(1, int(round(participation * num_clients)))
    if k >= num_clients:
        return [list(range(num_clients)) for _ in range(rounds)]
    rng = numpy_rng(seed, "sampling")
    return [sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False)) for _ in range(rounds)]


def assign_architectures(archs: list[str], proportions: list[float] | None, num_clients: int, seed: int) -> list[str]:
    """Each client's architecture: counts by largest remainder of the proportions, order by seed."""
    weights = np.asarray(proportions if proportions is not None else [1.0] * len(archs), dtype=np.float64)
    exact = weights / weights.sum() * num_clients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    assignment = [arch for arch, n in zip(archs, counts) for _ in range(n)]
    order = numpy_rng(seed, "architectures").permutation(num_clients)
    return [assignment[i] for i in order]


# ------------------------------------------------------------------------------------------
# Transport: what a runtime provides
# ------------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """The outcome of one stage: replies by client, failures by client, client compute seconds."""

    replies: dict[int, Message]
    failures: dict[int, str] = field(default_factory=dict)
    client_seconds: float = 0.0


class Transport(Protocol):
    """``remote``: replies come from other processes or machines, so a reply that breaks its
    schema is that client's failure (recorded, round goes on); in-process it is a bug (raised)."""

    remote: bool

    def exchange(self, stage: str, rnd: int, messages: Mapping[int, Message]) -> Exchange: ...


class Ledger:
    """Bytes and seconds, per client and per round."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.up = np.zeros(num_clients, dtype=np.int64)
        self.down = np.zeros(num_clients, dtype=np.int64)
        self.eval_bytes = 0
        self.client_seconds = 0.0
        self.transport_seconds = 0.0
        self.failures: dict[int, str] = {}

    def reset(self) -> None:
        self.__init__(self.num_clients)


class RoundComm:
    """The :class:`~hetpfl.algorithms.base.Comm` a server sees during one round."""

    def __init__(self, run: RunSpec, transport: Transport, rnd: int, ledger: Ledger) -> None:
        self.run, self.transport, self.rnd, self.ledger = run, transport, rnd, ledger
        public = run.data.public
        self.sizes = {"num_classes": run.data.num_classes, "num_public_total": len(public)}

    def ask(self, stage: str, messages: Mapping[int, Message]) -> dict[int, Message]:
        schema = self.run.algorithm.schema(stage)
        outgoing: dict[int, Message] = {}
        for client in sorted(messages):
            if not 0 <= client < self.run.num_clients:
                raise MessageError(f"stage '{stage}': no client {client} (clients are 0..{self.run.num_clients - 1})")
            schema.down.validate(messages[client], where=f"stage '{stage}' down to client {client}", sizes=dict(self.sizes))
            outgoing[client] = compress(messages[client], self.run.compression)
            self._count(stage, client, outgoing[client], down=True)
        started = time.perf_counter()
        result = self.transport.exchange(stage, self.rnd, outgoing)
        if stage != EVALUATE_STAGE:  # evaluation is timed on its own
            self.ledger.transport_seconds += time.perf_counter() - started
            self.ledger.client_seconds += result.client_seconds
        replies: dict[int, Message] = {}
        for client in sorted(result.replies):
            if client not in outgoing:
                raise MessageError(f"stage '{stage}': reply from client {client}, which was not asked")
            self._count(stage, client, result.replies[client], down=False)
            reply = decompress(result.replies[client])
            try:
                schema.up.validate(reply, where=f"stage '{stage}' reply from client {client}", sizes=dict(self.sizes))
            except MessageError as exc:
                if not getattr(self.transport, "remote", False):
                    raise
                self.ledger.failures[client] = f"{stage}: invalid reply: {exc}"
                continue
            replies[client] = reply
        for client, error in result.failures.items():
            self.ledger.failures[client] = f"{stage}: {error}"
        return replies

    def _count(self, stage: str, client: int, message: Message, down: bool) -> None:
        if stage == EVALUATE_STAGE:
            self.ledger.eval_bytes += message.num_bytes
        elif down:
            self.ledger.down[client] += message.num_bytes
        else:
            self.ledger.up[client] += message.num_bytes


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def spread(values: np.ndarray, prefix: str) -> dict[str, float]:
    """Mean, std and mean of the worst 10% (at least one client) of per-client accuracies."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        return {}
    k = max(1, int(math.ceil(0.1 * values.size)))
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_std": float(values.std()),
        f"{prefix}_worst10": float(np.sort(values)[:k].mean()),
    }


def evaluate_extra_models(models: dict[str, dict[int, torch.nn.Module]], data: FederatedData) -> dict[str, Any]:
    """Accuracy of each extra model on the test split of each client it serves."""
    out: dict[str, Any] = {}
    for name, per_client in models.items():
        accs = np.full(data.num_clients, np.nan)
        for client, model in per_client.items():
            test = data.client_test[client]
            accs[client] = evaluate(model, test.x, test.y)["accuracy"]
        out.update(spread(accs, f"{name}_acc"))
        out[f"{name}_client_acc"] = [None if math.isnan(a) else float(a) for a in accs]
    return out


def cluster_measures(server: Server, data: FederatedData) -> dict[str, Any]:
    """A clustering method's assignment and, where the partition has true groups, its adjusted
    Rand index against them (over the clients assigned so far). Computed here, outside the
    algorithm, so the server never sees the true groups."""
    assignment = server.cluster_assignment()
    if assignment is None:
        return {}
    assignment = np.asarray(assignment, dtype=np.int64)
    out: dict[str, Any] = {"cluster_assignment": assignment.tolist()}
    seen = assignment >= 0
    if data.client_groups is not None and seen.any():
        from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415 (only clustering methods need it)

        out["cluster_ari"] = float(adjusted_rand_score(np.asarray(data.client_groups)[seen], assignment[seen]))
    return out


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------

RoundCallback = Callable[[dict[str, Any]], None]


def run_rounds(run: RunSpec, transport: Transport, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run every round of ``run`` over ``transport``; return the summary."""
    started = time.perf_counter()
    server = run.make_server()
    ledger = Ledger(run.num_clients)
    schedule = run.schedule()
    totals = {"up": 0, "down": 0, "eval": 0, "client": 0.0, "server": 0.0, "eval_s": 0.0}
    up_by_client = np.zeros(run.num_clients, dtype=np.int64)
    down_by_client = np.zeros(run.num_clients, dtype=np.int64)
    last: dict[str, Any] = {}
    for rnd in range(run.rounds):
        ledger.reset()
        t0 = time.perf_counter()
        server_measures = server.round(rnd, list(schedule[rnd]), RoundComm(run, transport, rnd, ledger))
        train_s = time.perf_counter() - t0
        record: dict[str, Any] = {"round": rnd, "clients": list(schedule[rnd])}
        record["server"] = {k: float(v) for k, v in (server_measures or {}).items()}
        record.update(cluster_measures(server, run.data))
        t1 = time.perf_counter()
        if (rnd + 1) % run.eval_every == 0 or rnd == run.rounds - 1:
            record.update(evaluate_round(run, server, transport, rnd, ledger))
        eval_s = time.perf_counter() - t1
        record["bytes_up"] = int(ledger.up.sum())
        record["bytes_down"] = int(ledger.down.sum())
        record["bytes_up_by_client"] = ledger.up.tolist()
        record["bytes_down_by_client"] = ledger.down.tolist()
        totals["up"] += record["bytes_up"]
        totals["down"] += record["bytes_down"]
        totals["eval"] += ledger.eval_bytes
        up_by_client += ledger.up
        down_by_client += ledger.down
        record["bytes_up_cum"], record["bytes_down_cum"] = totals["up"], totals["down"]
        record["failures"] = {str(k): v for k, v in sorted(ledger.failures.items())}
        # Wall-clock figures live apart from the measures, which are identical for one seed.
        record["timing"] = {
            "client_s": ledger.client_seconds,
            "server_s": max(0.0, train_s - ledger.transport_seconds),
            "eval_s": eval_s,
            "round_s": time.perf_counter() - t0,
            "wall_s": time.perf_counter() - started,
        }
        totals["client"] += ledger.client_seconds
        totals["server"] += record["timing"]["server_s"]
        totals["eval_s"] += eval_s
        if "personalized_acc_mean" in record:
            last = record
        if on_round is not None:
            on_round(record)
    final = {k: v for k, v in last.items() if k.endswith(("_mean", "_std", "_worst10")) or k.endswith("client_acc") or k in ("acc_by_arch", "cluster_ari")}
    return {
        "algorithm": run.algorithm.name,
        "dataset": run.data.name,
        "seed": run.seed,
        "rounds": run.rounds,
        "num_clients": run.num_clients,
        "final": final,
        "final_round": last.get("round"),
        "server": last.get("server", {}),
        "bytes_up_total": int(totals["up"]),
        "bytes_down_total": int(totals["down"]),
        "bytes_up_per_client_mean": float(up_by_client.mean()),
        "bytes_down_per_client_mean": float(down_by_client.mean()),
        "bytes_eval_total": int(totals["eval"]),
        "wall_time_s": time.perf_counter() - started,
        "time_client_s": totals["client"],
        "time_server_s": totals["server"],
        "time_eval_s": totals["eval_s"],
    }


def evaluate_round(run: RunSpec, server: Server, transport: Transport, rnd: int, ledger: Ledger) -> dict[str, Any]:
    """Every client's own model on its own test split, then the algorithm's extra models."""
    everyone = {c: Message() for c in range(run.num_clients)}
    replies = RoundComm(run, transport, rnd, ledger).ask(EVALUATE_STAGE, everyone)
    accs = np.full(run.num_clients, np.nan)
    for client, reply in replies.items():
        accs[client] = reply.scalars["accuracy"]
    out: dict[str, Any] = spread(accs, "personalized_acc")
    out["client_acc"] = [None if math.isnan(a) else float(a) for a in accs]
    by_arch: dict[str, list[float]] = {}
    for client, arch in enumerate(run.client_archs):
        if not math.isnan(accs[client]):
            by_arch.setdefault(arch, []).append(float(accs[client]))
    out["acc_by_arch"] = {arch: float(np.mean(v)) for arch, v in sorted(by_arch.items())}
    out.update(evaluate_extra_models(server.extra_models(), run.data))
    return out
