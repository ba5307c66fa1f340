"""The Flower runtime: the same round loop, with messages carried by Flower.

The engine's round loop (:func:`hetpfl.engine.run_rounds`) does not change; this module only
supplies a :class:`FlowerTransport`. Each stage an algorithm's server asks becomes one Flower
``Message`` of type ``query.<stage>`` per client, whose ``RecordDict`` holds

* ``"arrays"``: an ``ArrayRecord`` with the message's arrays (the payload),
* ``"scalars"``: a ``ConfigRecord`` with the message's scalars (the payload),
* ``"meta"``: a ``ConfigRecord`` with the stage, round and client id (routing, not payload),
* ``"experiment"``: a ``ConfigRecord`` with the experiment's config as YAML (so a ClientApp
  process, which may be fresh for every message in a deployment, can rebuild the run).

Only the two payload records count as traffic, and their ``count_bytes()`` equals the
:attr:`hetpfl.messages.Message.num_bytes` the engine accounts.

Three ways in:

* :func:`simulate_on_flower` (``runtime.name: flower-sim``): Flower's simulation engine
  (``run_simulation``, Ray) in this process; :func:`hetpfl.experiment.run_experiment` writes the
  results folder exactly as for the in-process simulator.
* :func:`run_on_grid`: the server side on any Flower ``Grid``; the deployment ServerApp in
  :mod:`hetpfl.flower_app` (run by ``flwr run``) calls it.
* :func:`make_client_app` / :func:`handle_query`: the client side, shared by simulation and
  deployment; it runs the stage through the same :class:`hetpfl.clienthost.ClientHost` the
  in-process simulator uses.

This module sits below the experiment layer: the client side needs to rebuild the run from the
experiment's YAML, and receives the function that does it (``build_run``,
:func:`hetpfl.prepare.run_from_yaml`) from its caller instead of importing it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..algorithms import ALGORITHMS
from ..algorithms.base import EVALUATE_STAGE
from ..clienthost import ClientHost, DiskStore
from ..engine import CheckpointPolicy, Exchange, RunSpec, run_rounds
from ..messages import Message
from ..state import private_folder
from . import Launch, RunBuilder

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import Context, RecordDict
    from flwr.app import Message as FlowerMessage
    from flwr.serverapp import Grid

log = logging.getLogger("flwr.hetpfl")  # a child of Flower's logger: shown in its log stream

ARRAYS, SCALARS, META, EXPERIMENT = "arrays", "scalars", "meta", "experiment"
HELLO = "hello"  # the first query: every SuperNode tells which client (partition) it hosts
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"  # node_config keys (Flower's)
DATA_DIR, STATE_DIR, TORCH_THREADS = "data-dir", "state-dir", "torch-threads"  # our node_config keys
SIMULATION = "simulation"  # meta flag: one process serves every client
# Flower's error codes for a message that never reached its node (MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE):
# its bytes are not counted as sent
UNDELIVERED_CODES = (3, 5)
RUN_KEY = "run-key"  # meta: names the folder where nodes keep this run's client states

# Flower must neither phone home nor look for updates; Ray must not send usage statistics.
QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class FlowerRuntimeError(RuntimeError):
    """The federation is not what the experiment needs (missing nodes, bad partitions...)."""


def quiet_environment() -> None:
    """Set the variables of :data:`QUIET_ENVIRONMENT` unless the user set them."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


# ------------------------------------------------------------------------------------------
# Our Message <-> Flower records (the one place where the conversion lives)
# ------------------------------------------------------------------------------------------


def _as_flower_array(array: np.ndarray):
    from flwr.app import Array  # noqa: PLC0415

    # The .npy encoding of a C-ordered copy, exactly as hetpfl.messages.encode_array counts it
    # (0-d arrays stay 0-d: they are contiguous already and their header has the same length).
    return Array(array if array.ndim == 0 else np.ascontiguousarray(array))


def message_to_records(message: Message):
    """The payload records of ``message``: ``(ArrayRecord, ConfigRecord)``."""
    from flwr.app import ArrayRecord, ConfigRecord  # noqa: PLC0415

    arrays = ArrayRecord({key: _as_flower_array(value) for key, value in message.arrays.items()})
    scalars = ConfigRecord(dict(message.scalars))
    return arrays, scalars


def message_to_recorddict(message: Message, meta: Mapping[str, Any] | None = None) -> "RecordDict":
    """``message`` as a Flower ``RecordDict``: payload records plus a ``meta`` record."""
    from flwr.app import ConfigRecord, RecordDict  # noqa: PLC0415

    arrays, scalars = message_to_records(message)
    return RecordDict({ARRAYS: arrays, SCALARS: scalars, META: ConfigRecord(dict(meta or {}))})


def recorddict_to_message(content: "RecordDict") -> Message:
    """The payload of a ``RecordDict`` built by :func:`message_to_recorddict`."""
    arrays = {key: array.numpy() for key, array in content[ARRAYS].items()} if ARRAYS in content else {}
    scalars = dict(content[SCALARS]) if SCALARS in content else {}
    return Message(arrays, scalars)


def payload_bytes(content: "RecordDict") -> int:
    """Flower's own byte count of the payload records (what the engine counts as traffic)."""
    total = 0
    if ARRAYS in content:
        total += content[ARRAYS].count_bytes()
    if SCALARS in content and len(content[SCALARS]):
        total += content[SCALARS].count_bytes()
    return total


def stage_names() -> list[str]:
    """Every stage a ClientApp may be asked: all registered algorithms' stages, evaluate, hello
    (identifiers all: :class:`~hetpfl.algorithms.base.AlgorithmSpec` checks it at registration)."""
    names = {EVALUATE_STAGE, HELLO}
    for spec in ALGORITHMS.values():
        names.update(spec.schemas)
    return sorted(names)


# ------------------------------------------------------------------------------------------
# Server side
# ------------------------------------------------------------------------------------------

POLL_SECONDS = 0.2  # how often the server asks for replies (Grid.send_and_receive waits 3 s)


def send_and_receive(
    grid: "Grid", messages: list["FlowerMessage"], timeout: float | None, poll: float = POLL_SECONDS
) -> dict[int, "FlowerMessage | None"]:
    """Push ``messages``, pull their replies until all came back or ``timeout`` passed.

    Returns ``{index in messages: reply}`` with ``None`` for a message that could not be pushed.
    Replies are matched to messages by ``reply_to_message_id``, which also catches the error
    replies the SuperLink itself makes (e.g. a node that went away).
    """
    if not messages:
        return {}
    pushed = {str(i) for i in grid.push_messages(messages) if i}
    index_of = {str(msg.metadata.message_id): i for i, msg in enumerate(messages)}
    out: dict[int, Any] = {i: None for i, msg in enumerate(messages) if str(msg.metadata.message_id) not in pushed}
    pending = set(pushed)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(sorted(pending)):
            key = str(reply.metadata.reply_to_message_id)
            if key in pending and key in index_of:
                out[index_of[key]] = reply
                pending.discard(key)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll)
    return out



class FlowerTransport:
    """Carries each stage's messages as ``query.<stage>`` Flower messages over a ``Grid``.

    A client whose reply is an error, or which does not reply within ``timeout`` seconds, is
    reported in :attr:`Exchange.failures` and left out of the replies; the round goes on.
    """

    states: DiskStore | None

    def __init__(
        self,
        grid: "Grid",
        node_for_client: Mapping[int, int],
        timeout: float | None = None,
        *,
        experiment: str = "",
        extra_meta: Mapping[str, Any] | None = None,
        states: DiskStore | None = None,
    ) -> None:
        self.grid = grid
        self.states = states  # the clients' state folder, when it is on this machine (simulation)
        self.node_for_client = dict(node_for_client)
        self.client_for_node = {node: client for client, node in self.node_for_client.items()}
        if len(self.client_for_node) != len(self.node_for_client):
            raise FlowerRuntimeError(f"two clients mapped to one node: {self.node_for_client}")
        self.timeout = timeout
        self.experiment = experiment
        self.extra_meta = dict(extra_meta or {})

    def _flower_message(self, stage: str, rnd: int, client: int, message: Message) -> "FlowerMessage":
        from flwr.app import ConfigRecord  # noqa: PLC0415
        from flwr.app import Message as FlowerMessage  # noqa: PLC0415

        meta = {"stage": stage, "round": rnd, "client-id": client, **self.extra_meta}
        content = message_to_recorddict(message, meta)
        content[EXPERIMENT] = ConfigRecord({"yaml": self.experiment})
        return FlowerMessage(
            content=content, dst_node_id=self.node_for_client[client], message_type=f"query.{stage}",
            group_id=str(rnd),
        )

    def exchange(self, stage: str, rnd: int, messages: Mapping[int, Message]) -> Exchange:
        clients: list[int] = []
        outgoing = []
        failures: dict[int, str] = {}
        undelivered: set[int] = set()
        for client in sorted(messages):
            if client not in self.node_for_client:
                failures[client] = "no SuperNode hosts this client"
                undelivered.add(client)
                continue
            clients.append(client)
            outgoing.append(self._flower_message(stage, rnd, client, messages[client]))
        replies: dict[int, Message] = {}
        seconds = 0.0
        answers = send_and_receive(self.grid, outgoing, self.timeout)
        for i, client in enumerate(clients):
            if i not in answers:
                failures[client] = f"no reply within {self.timeout:g} s" if self.timeout else "no reply"
                continue
            reply = answers[i]
            if reply is None:
                failures[client] = "the message could not be sent (SuperLink refused it)"
                undelivered.add(client)
            elif reply.has_error():
                failures[client] = f"{reply.error.reason} (Flower error code {reply.error.code})"
                if reply.error.code in UNDELIVERED_CODES:
                    undelivered.add(client)
            else:
                try:
                    replies[client] = recorddict_to_message(reply.content)
                except Exception as exc:  # noqa: BLE001 (a malformed reply fails that client, not the round)
                    failures[client] = f"malformed reply: {type(exc).__name__}: {exc}"
                    continue
                if META in reply.content:
                    seconds += float(reply.content[META].get("seconds", 0.0))
        for client, reason in sorted(failures.items()):
            log.warning("round %d stage %s: client %d failed: %s", rnd, stage, client, reason)
        return Exchange(replies=replies, failures=failures, client_seconds=seconds, undelivered=undelivered)


def wait_for_nodes(grid: "Grid", expected: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Node ids once at least ``expected`` SuperNodes are connected (they register asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() >= deadline:
            raise FlowerRuntimeError(
                f"waited {timeout:g} s for {expected} SuperNodes (one per client: data.num_clients={expected}) "
                f"but {len(nodes)} connected. Start one flower-supernode per client with "
                f"--node-config 'partition-id=I num-partitions={expected}' (I = 0..{expected - 1}), "
                f"or raise the run config's node-timeout."
            )
        time.sleep(poll)


def client_facts(run: RunSpec, client: int) -> dict[str, Any]:
    """What a node and the server must agree on about a client (else they prepared other data)."""
    return {"n_train": len(run.data.client_train[client]), "n_test": len(run.data.client_test[client]),
            "arch": run.client_archs[client]}


def map_clients_to_nodes(
    grid: "Grid",
    nodes: Iterable[int],
    run: RunSpec,
    experiment: str,
    timeout: float | None,
    extra_meta: Mapping[str, Any] | None = None,
) -> dict[int, int]:
    """Ask every node which partition (client id) it hosts; ``{client: node}`` covering every client.

    Errors name what is wrong: a client no node hosts, two nodes claiming one client, a node
    whose partition differs from the server's (other data, other config) or that failed.
    """
    from flwr.app import ConfigRecord  # noqa: PLC0415
    from flwr.app import Message as FlowerMessage  # noqa: PLC0415

    num_clients = run.num_clients
    nodes = sorted(nodes)
    queries = []
    for node in nodes:
        content = message_to_recorddict(Message(), {"stage": HELLO, "round": -1, "client-id": -1, **(extra_meta or {})})
        content[EXPERIMENT] = ConfigRecord({"yaml": experiment})
        queries.append(FlowerMessage(content=content, dst_node_id=node, message_type=f"query.{HELLO}", group_id=HELLO))
    claims: dict[int, list[int]] = {}
    problems: list[str] = []  # nodes that did not answer properly: fatal only if a client is left without a node
    mismatches: list[str] = []  # nodes whose partition differs from the server's: always fatal
    answers = send_and_receive(grid, queries, timeout)
    for i, node in enumerate(nodes):
        reply = answers.get(i, False)
        if reply is False:
            problems.append(f"node {node} did not answer within {timeout:g} s" if timeout else f"node {node} did not answer")
            continue
        if reply is None:
            problems.append(f"node {node}: the SuperLink refused the message")
            continue
        if reply.has_error():
            problems.append(f"node {node} failed: {reply.error.reason}")
            continue
        try:
            info = dict(reply.content[META])
            client = int(info[PARTITION_ID])
        except (KeyError, TypeError, ValueError) as exc:  # e.g. a node running another hetpfl
            problems.append(f"node {node} sent a malformed hello ({type(exc).__name__}: {exc})")
            continue
        if not 0 <= client < num_clients:
            log.warning("node %d hosts partition %d, outside 0..%d: not used", node, client, num_clients - 1)
            continue
        expected = client_facts(run, client)
        for key, theirs in (("n_train", info.get("n-train")), ("n_test", info.get("n-test")), ("arch", info.get("arch"))):
            if theirs != expected[key]:
                mismatches.append(
                    f"node {node} (partition-id={client}) has {key}={theirs!r} but the server's partition has "
                    f"{expected[key]!r}: the node prepares other data (check its data-dir and dataset files)"
                )
        claims.setdefault(client, []).append(node)
    duplicates = {c: ns for c, ns in claims.items() if len(ns) > 1}
    missing = [c for c in range(num_clients) if c not in claims]
    if duplicates or missing or mismatches:
        lines = []
        if missing:
            lines.append(f"no SuperNode hosts client(s) {missing}")
        for client, ns in sorted(duplicates.items()):
            lines.append(f"nodes {ns} all claim partition-id={client}")
        lines.extend(mismatches + problems)
        raise FlowerRuntimeError(
            f"cannot map {num_clients} clients onto {len(nodes)} SuperNodes: " + "; ".join(lines)
            + f". Each client needs exactly one SuperNode started with --node-config "
            f"'partition-id=I num-partitions={num_clients}'."
        )
    for problem in problems:
        log.warning("%s (not needed: every client has a SuperNode)", problem)
    return {client: ns[0] for client, ns in sorted(claims.items())}


def run_on_grid(
    grid: "Grid",
    run: RunSpec,
    experiment: str,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    node_timeout: float = 120.0,
    stage_timeout: float | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    runtime: str | None = None,
    states: DiskStore | None = None,
    checkpoint: CheckpointPolicy | None = None,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Run every round of ``run`` (whose config is the YAML ``experiment``) over the SuperNodes of
    ``grid``; return the summary. ``states``: the clients' state folder when the server can reach
    it (simulation), which checkpoints and resuming need."""
    started = time.perf_counter()
    num_clients = run.num_clients
    nodes = wait_for_nodes(grid, num_clients, node_timeout)
    node_for_client = map_clients_to_nodes(grid, nodes, run, experiment, node_timeout, extra_meta)
    log.info("%d clients mapped onto SuperNodes in %.1f s", num_clients, time.perf_counter() - started)
    transport = FlowerTransport(grid, node_for_client, stage_timeout, experiment=experiment, extra_meta=extra_meta,
                                states=states)
    summary = run_rounds(run, transport, on_round=on_round, checkpoint=checkpoint, resume=resume)
    summary["flower"] = {
        "node_for_client": {str(c): n for c, n in node_for_client.items()},
        "connect_s": time.perf_counter() - started - summary["wall_time_s"],
    }
    if runtime is not None:
        summary["runtime"] = runtime
    return summary


# ------------------------------------------------------------------------------------------
# Client side (shared by simulation and deployment)
# ------------------------------------------------------------------------------------------


@dataclass
class _ClientSide:
    run: RunSpec
    host: ClientHost


_CLIENT_SIDES: dict[str, _ClientSide] = {}  # per process: a Ray actor hosts many calls


def _client_side(experiment: str, context: "Context", meta: Mapping[str, Any], build_run: RunBuilder) -> _ClientSide:
    """The run and the ClientHost of this node (built once per process, config and run).

    In a simulation one process (a Ray worker) serves every client, so it prepares the whole
    federation once. In a deployment the process keeps only its node's partition (and the public
    inputs, never their labels) in memory and writes none of it to disk: a fresh ClientApp process
    prepares it again from the dataset files (the decoded-array cache makes that about a second for
    the image datasets), so nothing but the clients' state records is ever stored, and nothing is
    loaded with pickle.
    """
    node_config = context.node_config
    data_dir = node_config.get(DATA_DIR)
    threads = node_config.get(TORCH_THREADS, meta.get(TORCH_THREADS))
    if threads:
        import torch  # noqa: PLC0415

        if torch.get_num_threads() != int(threads):
            torch.set_num_threads(int(threads))
    # Where this node keeps its clients' states between rounds: its own folder (node_config)
    # first, else (in a simulation only: a deployed node never writes where a server says) the
    # folder the simulation runtime names, else the system temp folder; one subfolder per run
    # (named by the server's run key) so that runs never share personal models.
    simulated = bool(meta.get(SIMULATION))
    base = (node_config.get(STATE_DIR) or (meta.get(STATE_DIR) if simulated else None)
            or Path(tempfile.gettempdir()) / f"hetpfl-flower-{_user()}")
    private_folder(base)  # 0700 and ours: nobody else reads a client's data or plants a file here
    state_dir = private_folder(Path(str(base)) / f"run-{meta.get(RUN_KEY) or context.run_id}")
    partition = None if simulated else _partition_id(context)
    key = hashlib.sha256(f"{experiment}\0{data_dir}\0{state_dir}\0{partition}".encode()).hexdigest()
    side = _CLIENT_SIDES.get(key)
    if side is None:
        run = build_run(experiment, data_dir)
        if partition is not None:  # the other clients' splits and the global test split emptied, so freed
            run.data.withhold({partition}, global_test=False)
        side = _ClientSide(run, ClientHost(run, DiskStore(state_dir)))
        if len(_CLIENT_SIDES) >= 8:  # a process serves one run; keep memory bounded anyway
            _CLIENT_SIDES.clear()
        _CLIENT_SIDES[key] = side
    return side


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


def _partition_id(context: "Context") -> int | None:
    value = context.node_config.get(PARTITION_ID)
    return None if value is None else int(value)


def handle_query(msg: "FlowerMessage", context: "Context", build_run: RunBuilder) -> "FlowerMessage":
    """Every ``query.<stage>`` message: run the stage for this node's client, reply its message.

    Exceptions become error replies (the server reports the client as failed for this stage).
    """
    from flwr.app import ConfigRecord, Error, RecordDict  # noqa: PLC0415
    from flwr.app import Message as FlowerMessage  # noqa: PLC0415
    from flwr.common.constant import ErrorCode  # noqa: PLC0415

    try:
        meta = dict(msg.content[META])
        stage = str(meta["stage"])
        side = _client_side(str(msg.content[EXPERIMENT]["yaml"]), context, meta, build_run)
        partition = _partition_id(context)
        if stage == HELLO:
            if partition is None:
                raise FlowerRuntimeError(
                    "this SuperNode has no partition-id: start it with --node-config 'partition-id=I num-partitions=N'"
                )
            num_clients = side.run.num_clients
            num_partitions = context.node_config.get(NUM_PARTITIONS)
            # (a simulation may run several experiments on one federation: spare nodes are fine)
            if num_partitions is not None and int(num_partitions) != num_clients and not meta.get(SIMULATION):
                raise FlowerRuntimeError(
                    f"node_config num-partitions={num_partitions} but the experiment has "
                    f"data.num_clients={num_clients}"
                )
            facts = client_facts(side.run, partition) if 0 <= partition < num_clients else {}
            info = {PARTITION_ID: partition, "n-train": facts.get("n_train", -1), "n-test": facts.get("n_test", -1),
                    "arch": facts.get("arch", "")}
            return FlowerMessage(RecordDict({META: ConfigRecord(info)}), reply_to=msg)
        client, rnd = int(meta["client-id"]), int(meta["round"])
        if partition is not None and partition != client:
            raise FlowerRuntimeError(f"asked to run client {client} on the SuperNode of partition-id={partition}")
        started = time.perf_counter()
        reply = side.host.handle(client, stage, rnd, recorddict_to_message(msg.content))
        seconds = time.perf_counter() - started
        return FlowerMessage(message_to_recorddict(reply, {"seconds": seconds, "client-id": client}), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 (reported to the server as this client's failure)
        log.error("ClientApp failed on %s:\n%s", msg.metadata.message_type, traceback.format_exc())
        reason = f"{type(exc).__name__}: {exc}"
        return FlowerMessage(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def make_client_app(build_run: RunBuilder) -> Any:
    """A Flower ClientApp answering ``query.<stage>`` for every registered stage, which rebuilds
    the run from the experiment's YAML with ``build_run``."""
    from flwr.clientapp import ClientApp  # noqa: PLC0415

    app = ClientApp()
    handler = functools.partial(handle_query, build_run=build_run)
    for stage in stage_names():
        app.query(stage)(_named(handler, stage))
    return app


def _named(handler: Callable[..., Any], stage: str) -> Callable[..., Any]:
    """A plain function per stage (Flower registers functions; a partial has no name)."""

    def query(msg: "FlowerMessage", context: "Context") -> "FlowerMessage":
        return handler(msg, context)

    query.__name__ = query.__qualname__ = f"query_{stage}"
    return query


# ------------------------------------------------------------------------------------------
# Simulation
# ------------------------------------------------------------------------------------------

# A simulated SuperNode is a Ray worker of this machine: it is never lost, only slow (its first
# answer prepares the whole federation; on a loaded 2-core machine that took over 120 s), so the
# simulation waits longer than a deployment's default before calling a node missing.
SIMULATION_NODE_TIMEOUT = 600.0


def simulate_on_flower(
    launch: Launch | Sequence[Launch],
    *,
    client_app: Any = None,
    num_cpus: int | None = None,
    node_timeout: float = SIMULATION_NODE_TIMEOUT,
    stage_timeout: float | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Run ``launch`` on Flower's simulation engine (one SuperNode per client); return the summary.

    Several launches run one after the other on the same simulated federation (one Ray start for
    all; SuperNodes as many as the largest run has clients), returning their summaries in order.
    Client states live in a DiskStore under a temporary folder that is removed afterwards
    (not in ``context.state``, which Flower copies to the Ray worker and back on every call); the
    server reaches that folder, so checkpoints and resuming work as in-process. Ray workers run
    torch on one thread each, so parallel clients do not oversubscribe the CPU.
    """
    quiet_environment()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU clients: no accelerator env
    from flwr.serverapp import ServerApp  # noqa: PLC0415
    from flwr.simulation import run_simulation  # noqa: PLC0415

    launches = [launch] if isinstance(launch, Launch) else list(launch)
    if not launches:
        return []
    if client_app is None and any(item.build_run is None for item in launches):
        raise FlowerRuntimeError("a Flower simulation needs launch.build_run (YAML -> run) for its ClientApp")
    cpus = num_cpus or os.cpu_count() or 1
    summaries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hetpfl-flower-sim-") as state_dir:
        server_app = ServerApp()

        @server_app.main()
        def _main(grid: "Grid", context: "Context") -> None:
            for item in launches:
                run_key = uuid.uuid4().hex[:16]
                summaries.append(run_on_grid(
                    grid, item.run, item.experiment_yaml, item.on_round, node_timeout=node_timeout,
                    stage_timeout=stage_timeout,
                    extra_meta={STATE_DIR: state_dir, TORCH_THREADS: 1, SIMULATION: True, RUN_KEY: run_key},
                    states=DiskStore(Path(state_dir) / f"run-{run_key}"),
                    checkpoint=item.checkpoint, resume=item.resume,
                ))

        run_simulation(
            server_app=server_app,
            client_app=client_app if client_app is not None else make_client_app(launches[0].build_run),
            num_supernodes=max(item.run.num_clients for item in launches),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "include_dashboard": False},
            },
        )
    if len(summaries) != len(launches):
        raise FlowerRuntimeError("the Flower simulation ended without a result (see Flower's log above)")
    return summaries[0] if isinstance(launch, Launch) else summaries


__all__ = [
    "FlowerRuntimeError",
    "client_facts",
    "make_client_app",
    "stage_names",
    "send_and_receive",
    "FlowerTransport",
    "handle_query",
    "map_clients_to_nodes",
    "message_to_recorddict",
    "message_to_records",
    "payload_bytes",
    "recorddict_to_message",
    "run_on_grid",
    "simulate_on_flower",
    "wait_for_nodes",
]
