"""The round loop, written once, for every algorithm and every runtime.

A runtime supplies a :class:`Transport` (how a stage's messages reach clients and come back);
this module does everything else: the pre-drawn client-sampling stream, message validation in
both directions, exact byte accounting per client and round, time accounting, evaluation of
every client's own model (and of the algorithm's extra models), the per-round records, and
checkpoints of the whole run (:class:`RunState` + the server's and the clients' states) from
which :func:`run_rounds` resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from .adversaries import AdversaryOptions
from .privacy import PrivacyOptions, epsilon, releases_in
from .algorithms.robust import AggregationOptions
from .algorithms.base import EVALUATE_SCHEMA, EVALUATE_STAGE, AlgorithmSpec, ClientTraining, Server, ServerSetup
from .data import FederatedData
from .learn import evaluate
from .messages import Message, MessageError, compress, decompress
from .models import ModuleSpec, build_module
from .rng import derive_seed, numpy_rng
from .state import load_tree, save_tree


# ------------------------------------------------------------------------------------------
# What a run needs, independent of the runtime
# ------------------------------------------------------------------------------------------


#: What a client's failed stage (it raised, timed out, or replied wrongly) does to the run: ``record``
#: it as that client's failure (left out of the stage's aggregate; the round goes on), in every
#: runtime; ``raise`` it and stop (for debugging a method).
CLIENT_ERROR_POLICIES = ("record", "raise")


class ClientFailure(RuntimeError):
    """A client's stage failed and the run's ``on_client_error`` is ``raise``."""


@dataclass
class RunSpec:
    """A resolved experiment: data, per-client architectures, the method and the schedule.

    ``leaked_public_labels`` is None unless the method's config explicitly opts into reading the
    public set's true labels (a documented leak); then clients see them as ``ctx.leaked_public_labels``.
    """

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
    on_client_error: str = "record"  # one of CLIENT_ERROR_POLICIES
    dropout: float = 0.0  # simulator: chance that a sampled client does not answer a stage
    stragglers: float = 0.0  # simulator: chance that its reply misses the stage's deadline
    aggregation: AggregationOptions = field(default_factory=AggregationOptions)
    adversaries: AdversaryOptions = field(default_factory=AdversaryOptions)
    adversarial_clients: tuple[int, ...] = ()  # who runs ``adversaries.attack`` (drawn from the seed)
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions)
    max_reply_bytes: int = 2**30  # a larger reply is refused before it is decoded (runtime.max_reply_mb)
    leaked_public_labels: np.ndarray | None = None
    stateless_clients: bool = False  # runtime.client_state=none: no client keeps its model to evaluate

    @property
    def num_clients(self) -> int:
        return self.data.num_clients

    @functools.cached_property
    def message_sizes(self) -> dict[str, int]:
        """The named sizes messages are validated against (the run's; a message down binds more)."""
        data = self.data
        return {"num_classes": data.num_classes, "num_public_total": len(data.public), "num_tasks": len(data.tasks)}

    @functools.cached_property
    def client_example_counts(self) -> tuple[int, ...]:
        """Each client's examples, train and test: the most its replies may say it used
        (``num_examples``; a deployment's server learns them from each node's hello)."""
        return tuple(len(train) + len(test) for train, test in zip(self.data.client_train, self.data.client_test))

    def message_sizes_for(self, client: int) -> dict[str, int]:
        """The named sizes a client's messages are validated against."""
        return {**self.message_sizes, "num_examples_max": self.client_example_counts[client]}

    def client_modules(self, client: int) -> dict[str, ModuleSpec]:
        """The module slots client ``client`` holds (its method's declaration for its architecture)."""
        return self.algorithm.modules_for(self.client_archs[client], self.algorithm_config, self.data)

    def new_module(self, spec: ModuleSpec, *key: str | int) -> torch.nn.Module:
        """A freshly initialized registry module whose weights depend only on (seed, key)."""
        torch.manual_seed(derive_seed(self.seed, "init", *key))
        return build_module(spec, self.data.input_shape, self.data.num_classes, self.data.input_kind)

    def new_model(self, arch: str, *key: str | int) -> torch.nn.Module:
        """A freshly initialized ``arch`` (``name`` or ``name@width``)."""
        return self.new_module(ModuleSpec.parse(arch), *key)

    def server_setup(self) -> ServerSetup:
        return ServerSetup(
            num_clients=self.num_clients,
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            client_archs=list(self.client_archs),
            public_inputs=self.data.public.inputs if len(self.data.public) else None,
            training=self.training,
            seed=self.seed,
            build_model=ServerModules(self),
            value_range=self.data.value_range,
            input_kind=self.data.input_kind,
            examples=getattr(self.data, "server_examples", None),
            aggregation=self.aggregation,
        )

    def make_server(self) -> Server:
        return self.algorithm.server_cls(self.algorithm_config, self.server_setup())

    def schedule(self) -> list[list[int]]:
        return sampling_schedule(self.seed, self.num_clients, self.rounds, self.participation)


class ServerModules:
    """The server's module factory (``ServerSetup.build_model``): seeds by ``("server", key)``.

    It keeps the few facts a module needs, not the run: nothing reachable from a server (its
    attributes, closures or this factory) leads to the clients' data."""

    def __init__(self, run: RunSpec) -> None:
        data = run.data
        self.seed = run.seed
        self.input_shape = tuple(data.input_shape)
        self.num_classes = data.num_classes
        self.input_kind = data.input_kind
        # a pretrained, adapted backbone (HetVQA) is built with the run's backbone options unless overridden
        self.backbone_options = {arch: dict(options) for arch, options in getattr(data, "backbone_options", {}).items()}

    def __call__(self, arch: str, key: str | int, **options: Any) -> torch.nn.Module:
        spec = ModuleSpec.parse(arch)
        base = self.backbone_options.get(spec.arch, {})
        torch.manual_seed(derive_seed(self.seed, "init", "server", key))
        return build_module(ModuleSpec.of(spec.arch, **{**base, **spec.kwargs, **options}), self.input_shape,
                            self.num_classes, self.input_kind)


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
    undelivered: set[int] = field(default_factory=set)  # failed clients whose message never reached them


class ClientStates(Protocol):
    """The clients' saved states as a runtime holds them (a :class:`~hetpfl.clienthost.StateStore`)."""

    def snapshot(self, directory: Path) -> None: ...
    def restore(self, directory: Path) -> None: ...


class Transport(Protocol):
    """Carries a stage's messages to the clients and their replies back; a client whose stage
    failed is in :attr:`Exchange.failures` (what that means for the run is the run's
    ``on_client_error``). ``states``: the clients' states, if this runtime can checkpoint them.
    A transport may also offer ``score_models(models, rnd) -> {client: accuracy} | None``: each
    server model scored on its client's test split where the clients' data are (the isolated
    executor's); without it, or when it returns None, the engine scores them itself. And
    ``map_work(work, tasks) -> results | None``: the server's independent work run over workers
    (``Comm.map``); None: the server runs it in turn; ``map_workers``: how many such tasks run at
    once (absent: 1)."""

    states: ClientStates | None

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
        self.stage_bytes: dict[str, list[int]] = {}  # stage -> [up, down], all clients
        self.stage_seconds: dict[str, float] = {}  # stage -> seconds of its exchanges
        self.releases = np.zeros(num_clients, dtype=np.int64)  # Gaussian releases (privacy accounting)

    def reset(self) -> None:
        self.__init__(self.num_clients)

    def fail(self, client: int, error: str) -> None:
        """Record a failed stage; a client failing several stages in a round keeps them all."""
        earlier = self.failures.get(client)
        self.failures[client] = error if earlier is None else f"{earlier}; {error}"


class RoundComm:
    """The :class:`~hetpfl.algorithms.base.Comm` a server sees during one round."""

    def __init__(self, run: RunSpec, transport: Transport, rnd: int, ledger: Ledger) -> None:
        self.run, self.transport, self.rnd, self.ledger = run, transport, rnd, ledger

    def ask(self, stage: str, messages: Mapping[int, Message]) -> dict[int, Message]:
        schema = self.run.algorithm.schema(stage)
        outgoing: dict[int, Message] = {}
        sizes: dict[int, dict[str, int]] = {}  # per client: the sizes its message down binds, its reply keeps
        for client in sorted(messages):
            if not 0 <= client < self.run.num_clients:
                raise MessageError(f"stage '{stage}': no client {client} (clients are 0..{self.run.num_clients - 1})")
            sizes[client] = self.run.message_sizes_for(client)
            schema.down.validate(messages[client], where=f"stage '{stage}' down to client {client}", sizes=sizes[client])
            outgoing[client] = compress(messages[client], self.run.compression)
        started = time.perf_counter()
        result = self.transport.exchange(stage, self.rnd, outgoing)
        for client in outgoing:
            if client not in result.undelivered:  # a message that never reached its client cost nothing
                self._count(stage, client, outgoing[client].num_bytes, down=True)
        self.ledger.stage_seconds[stage] = self.ledger.stage_seconds.get(stage, 0.0) + time.perf_counter() - started
        if stage != EVALUATE_STAGE:  # evaluation is timed on its own
            self.ledger.transport_seconds += time.perf_counter() - started
            self.ledger.client_seconds += result.client_seconds
        if self.run.privacy.active and stage != EVALUATE_STAGE:
            for client, reply in result.replies.items():  # every upload that arrived spent privacy, valid or not
                self.ledger.releases[client] += releases_in(reply, schema.up)
        replies: dict[int, Message] = {}
        for client in sorted(result.replies):
            if client not in outgoing:
                raise MessageError(f"stage '{stage}': reply from client {client}, which was not asked")
            size = result.replies[client].num_bytes
            self._count(stage, client, size, down=False)
            where = f"stage '{stage}' reply from client {client}"
            try:
                if size > self.run.max_reply_bytes:  # checked before it is decoded or validated
                    raise MessageError(f"{where}: {size} bytes, over runtime.max_reply_mb "
                                       f"({self.run.max_reply_bytes / 2**20:.4g} MiB)")
                reply = decompress(result.replies[client])
                schema.up.validate(reply, where=where, sizes=sizes[client], sent=messages[client])
            except MessageError as exc:
                if self.run.on_client_error == "raise":
                    raise
                self.ledger.fail(client, f"{stage}: invalid reply: {exc}")
                continue
            replies[client] = reply
        for client, error in sorted(result.failures.items()):
            if self.run.on_client_error == "raise":
                raise ClientFailure(f"round {self.rnd}, stage '{stage}', client {client}: {error} "
                                    "(runtime.on_client_error=record records it and goes on)")
            self.ledger.fail(client, f"{stage}: {error}")
        return replies

    def map(self, work: Callable[..., Any], tasks: Sequence[tuple]) -> list[Any]:
        """The server's independent pieces of work (``Comm.map``): over the executor's workers where
        the transport offers ``map_work``, else here in turn."""
        sharer = getattr(self.transport, "map_work", None)
        results = None if sharer is None else sharer(work, list(tasks))
        return [work(*task) for task in tasks] if results is None else results

    @property
    def workers(self) -> int:
        """How many of :meth:`map`'s tasks run at once: the transport's ``map_workers``, else 1."""
        return int(getattr(self.transport, "map_workers", 1))

    def _count(self, stage: str, client: int, size: int, down: bool) -> None:
        self.ledger.stage_bytes.setdefault(stage, [0, 0])[1 if down else 0] += size
        if stage == EVALUATE_STAGE:
            self.ledger.eval_bytes += size
        elif down:
            self.ledger.down[client] += size
        else:
            self.ledger.up[client] += size


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


def evaluate_extra_models(models: dict[str, dict[int, torch.nn.Module]], data: FederatedData,
                          rnd: int, transport: Transport | None = None) -> dict[str, Any]:
    """Accuracy of each extra model on the test split (this round's view) of each client it serves;
    scored where the clients' data are when the transport keeps them apart (``score_models``)."""
    out: dict[str, Any] = {}
    scorer = getattr(transport, "score_models", None)
    for name, per_client in models.items():
        accs = np.full(data.num_clients, np.nan)
        scored = scorer(per_client, rnd) if scorer is not None else None
        for client, model in per_client.items():
            if scored is not None:
                accs[client] = scored.get(client, np.nan)
                continue
            test = data.test_at(client, rnd)
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
        from .algorithms.clustering import adjusted_rand_index  # noqa: PLC0415 (only clustering methods need it)

        out["cluster_ari"] = float(adjusted_rand_index(np.asarray(data.client_groups)[seen], assignment[seen]))
    return out


# ------------------------------------------------------------------------------------------
# Run state and checkpoints
# ------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1


@dataclass
class RunState:
    """What the loop carries from round to round: the next round, the byte and time totals and the
    last evaluated record (the summary's ``final``). Together with the server's and the clients'
    states it is all a run needs to go on; random streams are keyed, so none need saving."""

    next_round: int
    bytes_up: np.ndarray  # per client, all rounds so far
    bytes_down: np.ndarray
    bytes_eval: int = 0
    client_s: float = 0.0
    server_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0  # wall time of earlier sessions of this run (a resumed run adds its own)
    last: dict[str, Any] = field(default_factory=dict)
    stage_bytes: dict[str, list[int]] = field(default_factory=dict)  # stage -> [up, down], whole run
    stage_s: dict[str, float] = field(default_factory=dict)  # stage -> seconds, whole run
    phase_s: dict[str, float] = field(default_factory=dict)  # server phase -> seconds, whole run
    releases: list[int] = field(default_factory=list)  # per client: Gaussian releases (privacy)

    @classmethod
    def fresh(cls, num_clients: int) -> "RunState":
        return cls(0, np.zeros(num_clients, dtype=np.int64), np.zeros(num_clients, dtype=np.int64),
                   releases=[0] * num_clients)

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in vars(self).items() if k not in ("bytes_up", "bytes_down")},
                "bytes_up": self.bytes_up.tolist(), "bytes_down": self.bytes_down.tolist()}

    @classmethod
    def from_json(cls, tree: Mapping[str, Any]) -> "RunState":
        values = dict(tree)
        for key in ("bytes_up", "bytes_down"):
            values[key] = np.asarray(values[key], dtype=np.int64)
        return cls(**values)


@dataclass
class CheckpointPolicy:
    """Save the whole run every ``every`` rounds (and after the last) under ``directory``, as
    ``round-NNNN/`` folders (the number of rounds done), keeping the newest ``keep_last``."""

    directory: Path
    every: int = 1
    keep_last: int = 2

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.every < 1 or self.keep_last < 1:
            raise ValueError(f"checkpoint every={self.every}, keep_last={self.keep_last}: both must be >= 1")

    def due(self, rnd: int, rounds: int) -> bool:
        return (rnd + 1) % self.every == 0 or rnd == rounds - 1


def _identity(run: RunSpec) -> dict[str, Any]:
    return {"algorithm": run.algorithm.name, "dataset": run.data.name, "num_clients": run.num_clients,
            "seed": run.seed}


def save_checkpoint(policy: CheckpointPolicy, run: RunSpec, server: Server, state: RunState,
                    transport: Transport) -> Path:
    """Write ``round-NNNN/`` atomically (a temporary folder renamed into place): ``run.json`` (the
    run state), ``server.npz`` (the server's state) and ``clients/`` (one record per client)."""
    final = policy.directory / f"round-{state.next_round:04d}"
    tmp = policy.directory / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_tree(tmp / "server.npz", server.state_dict())
    transport.states.snapshot(tmp / "clients")
    meta = {"format": CHECKPOINT_FORMAT, **_identity(run), "state": state.to_json()}
    (tmp / "run.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    for old in sorted(policy.directory.glob("round-*"))[: -policy.keep_last]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete ``round-NNNN`` folder under ``directory`` (None if there is none)."""
    done = sorted(p for p in Path(directory).glob("round-*") if (p / "run.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, run: RunSpec, server: Server, transport: Transport) -> RunState:
    """Restore the server and the clients from checkpoint ``path``; return the run state."""
    path = Path(path)
    meta = json.loads((path / "run.json").read_text())
    expected = {"format": CHECKPOINT_FORMAT, **_identity(run)}
    found = {k: meta.get(k) for k in expected}
    if found != expected:
        raise ValueError(f"checkpoint {path} belongs to another run: it has {found}, this run is {expected}")
    server.load_state_dict(load_tree(path / "server.npz", build=server.setup.rebuild))
    _require_states(transport, "resume")
    transport.states.restore(path / "clients")
    return RunState.from_json(meta["state"])


def _require_states(transport: Transport, what: str) -> None:
    if getattr(transport, "states", None) is None:
        raise ValueError(f"this runtime ({type(transport).__name__}) cannot {what}: it keeps no client states "
                         f"on the server's side")


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------

RoundCallback = Callable[[dict[str, Any]], None]
VISUALS = "visuals"  # summary key of the server's image grids (arrays: the results folder saves them as PNGs)
HEATMAPS = "heatmaps"  # summary key of the server's client x client matrices (saved as PNGs beside the truth)
_FINAL_KEYS = ("acc_by_arch", "acc_by_task", "cluster_ari")
_FINAL_SUFFIXES = ("_mean", "_std", "_worst10", "client_acc", "_test_acc")


def run_rounds(run: RunSpec, transport: Transport, on_round: RoundCallback | None = None, *,
               checkpoint: CheckpointPolicy | None = None, resume: str | Path | None = None) -> dict[str, Any]:
    """Run every round of ``run`` over ``transport``; return the summary.

    ``resume``: a checkpoint folder to go on from (its rounds are not run again). ``checkpoint``:
    when to save the whole run. Resuming gives exactly the records of an uninterrupted run."""
    started = time.perf_counter()
    server = run.make_server()
    schedule = run.schedule()
    if checkpoint is not None:
        _require_states(transport, "checkpoint")
    state = load_checkpoint(resume, run, server, transport) if resume is not None else RunState.fresh(run.num_clients)
    first_round = state.next_round
    ledger = Ledger(run.num_clients)
    for rnd in range(state.next_round, run.rounds):
        ledger.reset()
        t0 = time.perf_counter()
        # Server-side torch randomness (e.g. dropout) draws from a stream keyed by the round.
        torch.manual_seed(derive_seed(run.seed, "server", "round", rnd, "torch"))
        server_measures = server.round(rnd, list(schedule[rnd]), RoundComm(run, transport, rnd, ledger))
        train_s = time.perf_counter() - t0
        record: dict[str, Any] = {"round": rnd, "clients": list(schedule[rnd])}
        record["server"] = {k: float(v) for k, v in (server_measures or {}).items()}
        record.update(cluster_measures(server, run.data))
        t1 = time.perf_counter()
        evaluated = is_evaluation_round(run, rnd)
        if evaluated:
            record.update(evaluate_round(run, server, transport, rnd, ledger))
        eval_s = time.perf_counter() - t1
        record["bytes_up"] = int(ledger.up.sum())
        record["bytes_down"] = int(ledger.down.sum())
        record["bytes_up_by_client"] = ledger.up.tolist()
        record["bytes_down_by_client"] = ledger.down.tolist()
        state.bytes_up += ledger.up
        state.bytes_down += ledger.down
        state.bytes_eval += ledger.eval_bytes
        record["bytes_up_cum"], record["bytes_down_cum"] = int(state.bytes_up.sum()), int(state.bytes_down.sum())
        record["failures"] = {str(k): v for k, v in sorted(ledger.failures.items())}
        if run.privacy.active:
            state.releases = [int(a + b) for a, b in zip(state.releases, ledger.releases)]
            record["privacy_epsilon"] = privacy_spent(run.privacy, state.releases)["epsilon_max"]
        # Wall-clock figures live apart from the measures, which are identical for one seed.
        record["timing"] = {
            "client_s": ledger.client_seconds,
            "server_s": max(0.0, train_s - ledger.transport_seconds),
            "eval_s": eval_s,
            "round_s": time.perf_counter() - t0,
            "wall_s": state.wall_s + time.perf_counter() - started,
        }
        phases = server.setup.clock.take()
        record["timing"]["stage_s"] = dict(ledger.stage_seconds)
        record["timing"]["phase_s"] = phases
        state.client_s += ledger.client_seconds
        state.server_s += record["timing"]["server_s"]
        state.eval_s += eval_s
        _accumulate(state.stage_s, ledger.stage_seconds)
        _accumulate(state.phase_s, phases)
        for stage, (up, down) in ledger.stage_bytes.items():
            total = state.stage_bytes.setdefault(stage, [0, 0])
            total[0] += up
            total[1] += down
        if evaluated:
            state.last = {k: v for k, v in record.items() if k != "timing"}
        state.next_round = rnd + 1
        if on_round is not None:
            on_round(record)
        if checkpoint is not None and checkpoint.due(rnd, run.rounds):
            save_checkpoint(checkpoint, run, server, dataclasses.replace(
                state, wall_s=state.wall_s + time.perf_counter() - started), transport)
    visuals = server.visuals()
    heatmaps = server.heatmaps()
    last = state.last
    final = {k: v for k, v in last.items() if k.endswith(_FINAL_SUFFIXES) or k in _FINAL_KEYS}
    sampled = {c for rnd in range(run.rounds) for c in schedule[rnd]}
    coverage = {
        # how many clients the final own-model figures average (failed or silent clients are left out)
        "final_clients_evaluated": sum(a is not None for a in last.get("client_acc", [])),
        # clients no round ever sampled: their "own model" is untrained, yet it is in the averages
        "never_sampled": sorted(set(range(run.num_clients)) - sampled),
        # who attacked (adversaries section); the honest_* figures leave them out
        **({"adversarial_clients": list(run.adversarial_clients),
            "attack": run.adversaries.attack} if run.adversarial_clients else {}),
    }
    return {
        "algorithm": run.algorithm.name,
        "dataset": run.data.name,
        "seed": run.seed,
        "rounds": run.rounds,
        "num_clients": run.num_clients,
        "final": final,
        "final_round": last.get("round"),
        **coverage,
        "server": last.get("server", {}),
        "bytes_up_total": int(state.bytes_up.sum()),
        "bytes_down_total": int(state.bytes_down.sum()),
        "bytes_up_per_client_mean": float(state.bytes_up.mean()),
        "bytes_down_per_client_mean": float(state.bytes_down.mean()),
        "bytes_eval_total": int(state.bytes_eval),
        "wall_time_s": state.wall_s + time.perf_counter() - started,
        "time_client_s": state.client_s,
        "time_server_s": state.server_s,
        "time_eval_s": state.eval_s,
        "bytes_by_stage": {stage: {"up": up, "down": down} for stage, (up, down) in sorted(state.stage_bytes.items())},
        "time_by_stage_s": dict(sorted(state.stage_s.items())),
        "time_by_phase_s": dict(sorted(state.phase_s.items())),
        **({"resumed_at_round": first_round} if resume is not None else {}),
        **({"privacy": privacy_spent(run.privacy, state.releases)} if run.privacy.active else {}),
        **({VISUALS: visuals} if visuals else {}),
        **({HEATMAPS: heatmaps} if heatmaps else {}),
    }


def privacy_spent(options: PrivacyOptions, releases: list[int]) -> dict[str, Any]:
    """ε at δ of every client after its releases so far (privacy.py: Opacus's RDP accountant)."""
    per_client = [epsilon(k, options.noise_multiplier, options.delta) for k in releases]
    return {"mechanism": options.mechanism, "noise_multiplier": options.noise_multiplier, "clip": options.clip,
            "delta": options.delta, "epsilon_max": max(per_client, default=0.0), "epsilon_by_client": per_client,
            "releases_by_client": list(releases)}


def _accumulate(total: dict[str, float], part: Mapping[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def is_evaluation_round(run: RunSpec, rnd: int) -> bool:
    return (rnd + 1) % run.eval_every == 0 or rnd == run.rounds - 1


def evaluate_round(run: RunSpec, server: Server, transport: Transport, rnd: int, ledger: Ledger) -> dict[str, Any]:
    """Every client's own model on its own test split, then the algorithm's extra models on the
    clients' splits and its test models on the global test set.

    Besides accuracy: any extra scalar a method's ``evaluate`` schema declares is reported as
    ``<name>_mean/_std/_worst10`` and ``<name>_client``, and with tasks in the data, the mean
    over clients of each task's accuracy (``acc_by_task``). With stateless clients there is no
    own model to evaluate: only the server's models are."""
    out: dict[str, Any] = {}
    if not run.stateless_clients:
        out.update(evaluate_clients(run, server, transport, rnd, ledger))
    out.update(evaluate_extra_models(server.extra_models(), run.data, rnd, transport))
    for name, model in server.test_models().items():
        out[f"{name}_test_acc"] = float(evaluate(model, run.data.global_test.x, run.data.global_test.y)["accuracy"])
    if run.adversarial_clients:
        out.update(honest_spread(out, run.adversarial_clients))
    return out


def honest_spread(measures: Mapping[str, Any], adversaries: tuple[int, ...]) -> dict[str, float]:
    """Every per-client accuracy list (``client_acc``: the own models, ``<name>_client_acc``: a
    method's extra models) summarized over the honest clients alone, as ``honest_<prefix>_*``."""
    out: dict[str, float] = {}
    for key, values in measures.items():
        if key == "client_acc":
            prefix = "personalized_acc"
        elif key.endswith("_client_acc"):
            prefix = key[: -len("_client_acc")] + "_acc"
        else:
            continue
        honest = [np.nan if v is None else v for c, v in enumerate(values) if c not in adversaries]
        out.update(spread(np.asarray(honest, dtype=np.float64), f"honest_{prefix}"))
    return out


def evaluate_clients(run: RunSpec, server: Server, transport: Transport, rnd: int, ledger: Ledger) -> dict[str, Any]:
    """The evaluate stage: every client scores its own model on its own test split."""
    everyone = list(range(run.num_clients))
    replies = RoundComm(run, transport, rnd, ledger).ask(EVALUATE_STAGE, server.evaluation_messages(everyone))
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
    extra = sorted(set(run.algorithm.schema(EVALUATE_STAGE).up.scalars) - set(EVALUATE_SCHEMA.up.scalars))
    for name in extra:
        values = np.array([float(replies[c].scalars.get(name, np.nan)) if c in replies else np.nan
                           for c in range(run.num_clients)])
        out.update(spread(values, name))
        out[f"{name}_client"] = [None if math.isnan(v) else float(v) for v in values]
    if run.data.tasks:
        out["acc_by_task"] = task_accuracy(replies, run.data.tasks)
    return out


def task_accuracy(replies: Mapping[int, Message], tasks: tuple[str, ...]) -> dict[str, float]:
    """Per task, the mean over the clients that hold test samples of it of their accuracy on it."""
    per_task: dict[str, list[float]] = {}
    for client in sorted(replies):
        arrays = replies[client].arrays
        if "task_count" not in arrays:
            continue
        for t, (correct, count) in enumerate(zip(arrays["task_correct"], arrays["task_count"])):
            if count > 0:
                per_task.setdefault(tasks[t], []).append(float(correct) / float(count))
    return {task: float(np.mean(v)) for task, v in per_task.items()}
