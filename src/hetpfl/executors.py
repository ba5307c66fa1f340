"""How the simulator executes one stage's clients: the executors (``runtime.executor``).

An executor receives the stage, the round and the asked clients grouped by their module
architectures, and returns every client's outcome: its reply, or :class:`Failed` for a client whose
stage raised. No algorithm sees which executor ran it.

* ``sequential`` (the reference): every client in turn, in client-id order, in this process.
* ``batched``: as ``sequential``, but a group of clients whose slots share their architectures goes
  to the method's batched handler (``<stage>_many``) where it has one: FedAvg's ``train`` trains the
  group's models as one stacked model (:mod:`hetpfl.learn.stacked`; ``mlp``, the plain
  ``cnn_*`` nets and ``mobilenet_small`` on small inputs), FedMD's ``communicate`` pre-trains and predicts and its ``digest_revisit``
  distills and trains that way, so their records agree with the sequential executor's up to float
  summation order, not bit for bit. Stages and methods without a batched handler run exactly as ``sequential``.
* ``processes``: the clients of a stage spread over worker processes (``runtime.workers``; 0: one
  per CPU core), each running torch with the run's thread count. Workers are forked once per run
  (:mod:`hetpfl.workerpool`: a pipe each, nothing shared that a stopped worker could leave locked),
  so they hold the run's data without copying it; a client's state record and its message travel
  to the worker, and its reply and new record back, as hetpfl messages (arrays and scalars, never
  pickled objects), and the parent keeps every record (checkpoints and resume are unchanged).
  Every random stream is keyed by (seed, client, round, stage), and a worker runs a client's
  stage exactly as the sequential executor does, so the records are the sequential executor's,
  byte for byte (the contract tests check it for every registered method). The server's extra
  models are scored on the clients' test splits over the workers too (``score_models``: each
  distinct model pickled once in the parent, its clients scored in pieces), and the server's
  independent pieces of work (``Comm.map``, e.g. COSMOS's per-cluster models) run there, pickled
  both ways between the parent and its own workers (once the workers are up, a single piece too:
  they are warm, the parent may not be); ``map_workers`` tells a server how many run at once.
  A worker process that ends (a crash in native code, a kill) ends the run with
  :class:`~hetpfl.workerpool.WorkerEnded`; ``isolated`` records such a client and goes on instead.
* ``isolated``: every client in a process of its own that holds only that client's data, as a
  deployment's SuperNode does. The processes are forked once per run from the prepared run; each
  empties every other client's splits (and the global test split) in place before it runs any
  client code, and the run's own process, where the server runs, then empties every client's
  splits, so no frame, closure or ``gc`` walk from a client stage finds another client's data, nor
  one from the server any client's split (``tests/test_isolation.py``). The server's process keeps
  the global test split (the experimenter's); the server's extra models are scored on a client's
  test split in that client's process (``score_models``; the model travels there pickled, server to
  client only). Messages and records travel as hetpfl messages in length-limited frames (never
  pickled: a client process cannot make the server's process run code). Up to ``runtime.workers``
  clients work at once (0: one per core); the records are the sequential executor's, byte for byte.
  A client whose process ends (or answers what cannot be read) is stopped and failed from then on,
  and its extra models go unscored. It costs a process per client (a fork shares the memory the
  run had prepared; each adds its own working memory), so it suits checks and federations of tens
  of clients, not thousands. HetVQA's clients share one example store, so it cannot run isolated.
"""

from __future__ import annotations

import gc
import io
import json
import math
import multiprocessing
import os
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from .clienthost import ClientHost, MemoryStore
from .kernels import current_kernels
from .learn.inference import evaluate
from .messages import Message
from .workerpool import WorkerPool, stop_process


@dataclass(frozen=True)
class Failed:
    """A client whose stage raised (recorded as its failure unless the run says raise)."""

    kind: str  # the exception's type name
    text: str

    def describe(self) -> str:
        return f"raised {self.kind}: {self.text}"


Outcome = Message | Failed


class Executor(Protocol):
    """Runs one stage's groups. ``batched``: offer each group to the method's batched handler
    (``<stage>_many``) when the method has one; otherwise every group is a single client."""

    batched: bool

    def start(self, host: ClientHost) -> None:
        """Called once before the run's first stage (the isolated executor forks its clients here)."""
        ...

    def run(self, host: ClientHost, stage: str, rnd: int, groups: list[list[int]],
            messages: Mapping[int, Message]) -> dict[int, Outcome]: ...

    def close(self) -> None: ...


class SequentialExecutor:
    """Every group in turn, every client of a group one after the other, in client-id order."""

    batched = False

    def run(self, host: ClientHost, stage: str, rnd: int, groups: list[list[int]],
            messages: Mapping[int, Message]) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        for group in groups:
            if not self._attempt(host, group, stage, rnd, messages, self.batched, outcomes):
                for client in group:  # the batched handler declined (or there is none): client by client
                    self._attempt(host, [client], stage, rnd, messages, False, outcomes)
        return outcomes

    @staticmethod
    def _attempt(host: ClientHost, group: list[int], stage: str, rnd: int, messages: Mapping[int, Message],
                 batched: bool, outcomes: dict[int, Outcome]) -> bool:
        """Run ``group``, adding its replies, or each member's failure, to ``outcomes``; False (and
        nothing added) when a batched group was declined."""
        try:
            replies = host.handle_group(group, stage, rnd, messages, batched=batched)
        except Exception as exc:  # noqa: BLE001  (any error of a client's code is that client's failure)
            if host.run.on_client_error == "raise":
                raise
            outcomes.update({c: Failed(type(exc).__name__, str(exc)) for c in group})
            return True
        if replies is None:
            return False
        outcomes.update(replies)
        return True

    def start(self, host: ClientHost) -> None:
        pass

    def close(self) -> None:
        pass


class ClientProcessError(RuntimeError):
    """A client's stage raised in a worker process and the run says raise (its traceback included)."""


# The host a forked worker starts from (set in the parent just before forking; read only there).
_FORK_HOST: ClientHost | None = None
_WORKER_HOST: ClientHost | None = None


def _before_fork() -> None:
    """What every forked process would otherwise load on its own: a ``torch.optim`` optimizer imports
    torch's compiler stack (``torch._dynamo``, ~0.9 s) when built; under the ``reference`` kernels
    (the ``fast`` ones build none: :mod:`hetpfl.learn.fused`) it is loaded once here, and every child
    shares it."""
    if current_kernels() == "reference":
        import torch._dynamo  # noqa: F401, PLC0415


def _start_worker(threads: int) -> None:
    global _WORKER_HOST
    torch.set_num_threads(threads)
    # a fresh host over the inherited run: its own live modules and an empty store (records come with tasks)
    _WORKER_HOST = ClientHost(_FORK_HOST.run, MemoryStore())


def _run_client(task: tuple[int, str, int, bytes, bytes | None]) -> tuple[int, bytes | None, bytes | None, tuple | None]:
    """One client's stage in a worker: (client, reply, new record, failure)."""
    client, stage, rnd, message, record = task
    host = _WORKER_HOST
    store = host.store
    if record is not None:
        store.put(client, Message.from_bytes(record))
    try:
        reply = host.handle(client, stage, rnd, Message.from_bytes(message))
        new_record = store.get(client)
        return client, reply.to_bytes(), None if new_record is None else new_record.to_bytes(), None
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which applies the run's policy)
        return client, None, None, (type(exc).__name__, str(exc), traceback.format_exc())
    finally:
        store._records.pop(client, None)  # the parent keeps the record


def _to_bytes(value: Any) -> bytes:
    """A module, tensors or a task, pickled for the run's own processes (server to worker or back)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(payload: bytes) -> Any:
    # only bytes the run's own processes wrote for each other: never a file, never a client's reply
    return torch.load(io.BytesIO(payload), weights_only=False)


def _score_in_worker(task: tuple[bytes, list[int], int]) -> list[dict[str, Any]]:
    model_bytes, clients, rnd = task
    return [_score_here(_WORKER_HOST.run, client, rnd, model_bytes) for client in clients]


def _work_in_worker(payload: bytes) -> bytes:
    """A piece of the server's work (``Comm.map``) in a worker; modules and tensors travel as bytes."""
    work, task = _from_bytes(payload)
    return _to_bytes(work(*task))


def worker_count(workers: int = 0) -> int:
    """The processes executor's workers: ``workers``, or one per CPU core for 0 (``runtime.workers``)."""
    return workers or (os.cpu_count() or 1)


class ProcessExecutor:
    """The clients of a stage over worker processes (module docstring)."""

    batched = False

    def __init__(self, workers: int = 0) -> None:
        self.workers = worker_count(workers)
        self._pool: Any = None
        self._host: ClientHost | None = None

    def start(self, host: ClientHost) -> None:
        pass  # the pool is forked at the first stage with two clients or more

    def _pool_for(self, host: ClientHost) -> Any:
        if self._pool is None or self._host is not host:
            self.close()
            global _FORK_HOST
            _FORK_HOST = host
            _before_fork()
            try:  # fork: the workers share the run's data with this process instead of rebuilding it
                self._pool = WorkerPool(self.workers, _start_worker, (torch.get_num_threads(),))
            finally:
                _FORK_HOST = None
            self._host = host
        return self._pool

    def run(self, host: ClientHost, stage: str, rnd: int, groups: list[list[int]],
            messages: Mapping[int, Message]) -> dict[int, Outcome]:
        clients = [c for group in groups for c in group]
        if len(clients) < 2:  # nothing to share out: the reference path, no round trip
            return SequentialExecutor().run(host, stage, rnd, groups, messages)
        pool = self._pool_for(host)
        tasks = []
        for c in clients:
            record = host.store.get(c)
            tasks.append((c, stage, rnd, messages[c].to_bytes(), None if record is None else record.to_bytes()))
        outcomes: dict[int, Outcome] = {}
        # up to 16 pieces per worker: a round trip per task costs milliseconds (tiny clients train in
        # less, so thousands go in chunks), while chunks of unequal clients leave a worker idle at the
        # end (25 COSMOS clients: chunks of 4 -> 1 saved ~0.1 s a stage)
        chunk = max(1, math.ceil(len(tasks) / (16 * self.workers)))
        for client, reply, record, failure in pool.map(_run_client, tasks, chunksize=chunk):  # in client order
            if failure is not None:
                kind, text, trace = failure
                if host.run.on_client_error == "raise":
                    raise ClientProcessError(f"client {client}, stage {stage}, round {rnd}: {kind}: {text}\n{trace}")
                outcomes[client] = Failed(kind, text)
                continue
            if record is not None:
                host.store.put(client, Message.from_bytes(record))
            outcomes[client] = Message.from_bytes(reply)
        return outcomes

    def score_models(self, host: ClientHost, models: Mapping[int, Any], rnd: int) -> dict[int, float] | None:
        """Each model's accuracy on its client's test split, over the workers: a distinct model (a
        cluster's model serves many clients) is pickled once and scored on its clients in pieces of
        about a quarter of a worker's share, so that the workers finish together."""
        by_model: dict[int, list[int]] = {}
        for client in sorted(models):
            by_model.setdefault(id(models[client]), []).append(client)
        if len(models) < 2:  # nothing to share out: score here
            return None
        piece = max(1, math.ceil(len(models) / (4 * self.workers)))
        tasks, pieces = [], []
        for clients in by_model.values():
            model_bytes = _to_bytes(models[clients[0]])
            for start in range(0, len(clients), piece):
                pieces.append(clients[start : start + piece])
                tasks.append((model_bytes, pieces[-1], rnd))
        scores: dict[int, float] = {}
        for clients, results in zip(pieces, self._pool_for(host).map(_score_in_worker, tasks)):
            for client, result in zip(clients, results):
                if result["failure"] is not None:
                    kind, text, trace = result["failure"]
                    raise ClientProcessError(f"scoring a server model on client {client}'s test split: {kind}: {text}\n{trace}")
                scores[client] = result["accuracy"]
        return scores

    @property
    def map_workers(self) -> int:
        """How many of ``map_work``'s tasks run at once."""
        return self.workers

    def map_work(self, host: ClientHost, work: Any, tasks: list[tuple]) -> list[Any] | None:
        """The server's independent work (``Comm.map``) over the workers, results in task order;
        an error in one is raised here, as if the server had run it."""
        if not tasks or (len(tasks) < 2 and self._pool is None):  # nothing to share out: the server runs it
            return None
        # one task goes to a running pool too: its workers are warm, while this process may not have
        # trained anything yet (its first training step pays torch's lazy set-up, ~0.8 s measured)
        payloads = [_to_bytes((work, task)) for task in tasks]
        return [_from_bytes(result) for result in self._pool_for(host).map(_work_in_worker, payloads)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._pool, self._host = None, None


class IsolatedExecutor:
    """Every client in a process of its own, holding only its own data (module docstring)."""

    batched = False

    def __init__(self, workers: int = 0) -> None:
        self.workers = worker_count(workers)  # clients working at once
        self._clients: dict[int, tuple[Any, Any]] = {}  # client -> (its process, the server's end of its pipe)
        self._reply_limit = 2**30

    def start(self, host: ClientHost) -> None:
        run = host.run
        if hasattr(run.data, "client_examples"):
            raise ValueError("runtime.executor='isolated' cannot run HetVQA: its clients share one example store")
        _ = run.message_sizes, run.client_example_counts  # from the whole data, before this process withholds it
        # Past the cap the engine records the reply as too large, as for any executor; a frame far past
        # it is cut here, unread, so a client cannot fill the server's memory.
        self._reply_limit = 2 * run.max_reply_bytes + 2**20
        context = multiprocessing.get_context("fork")
        threads = torch.get_num_threads()
        _before_fork()
        for client in range(run.num_clients):
            server_end, client_end = context.Pipe()
            earlier = [end for _, end in self._clients.values()]  # a client must not inherit the others' pipes
            process = context.Process(target=_serve_isolated_client, daemon=True,
                                      args=(host, client, client_end, server_end, earlier, threads))
            process.start()
            client_end.close()
            self._clients[client] = (process, server_end)
        # The server's process keeps no client's data: the server's models are scored on a client's
        # test split in that client's process (score_models). The global test split stays.
        run.data.withhold((), global_test=True)
        gc.collect()

    def run(self, host: ClientHost, stage: str, rnd: int, groups: list[list[int]],
            messages: Mapping[int, Message]) -> dict[int, Outcome]:
        clients = [c for group in groups for c in group]
        outcomes: dict[int, Outcome] = {}
        for client in clients[: self.workers]:
            self._send(host, client, stage, rnd, messages, outcomes)
        for i, client in enumerate(clients):
            if client not in outcomes:  # sent: its answer comes back in client order
                outcomes[client] = self._collect(host, client, stage, rnd)
            if i + self.workers < len(clients):
                self._send(host, clients[i + self.workers], stage, rnd, messages, outcomes)
        return outcomes

    def _send(self, host: ClientHost, client: int, stage: str, rnd: int, messages: Mapping[int, Message],
              outcomes: dict[int, Outcome]) -> None:
        if client not in self._clients:
            outcomes[client] = Failed("ClientProcessEnded", f"client {client}'s process ended in an earlier stage")
            return
        record = host.store.get(client)
        try:
            _send_frames(self._clients[client][1], {"stage": stage, "round": rnd}, messages[client].to_bytes(),
                         b"" if record is None else record.to_bytes())
        except (OSError, ValueError) as exc:
            self._stop(client)
            outcomes[client] = Failed("ClientProcessEnded", f"client {client}'s process ended ({type(exc).__name__})")

    def _collect(self, host: ClientHost, client: int, stage: str, rnd: int) -> Outcome:
        """The client's answer: its reply (its new record kept here), or its failure. An answer that
        cannot be read ends the client's process: its pipe can no longer be trusted to be in step."""
        try:
            header, reply_bytes, record_bytes = _receive_frames(self._clients[client][1], self._reply_limit, _RECORD_LIMIT)
            failure = header.get("failure")
            if failure is None:
                reply = Message.from_bytes(reply_bytes)
                record = Message.from_bytes(record_bytes) if record_bytes else None
            elif not (isinstance(failure, list) and len(failure) == 3 and all(isinstance(f, str) for f in failure)):
                raise ValueError("a failure that is not [kind, text, traceback]")
        except Exception as exc:  # noqa: BLE001  (whatever came, or did not, is this client's failure)
            self._stop(client)
            why = "its process ended" if isinstance(exc, EOFError) else f"its answer was unreadable ({exc})"
            failure = ["ClientProcessEnded", f"client {client}: {why}; its process is stopped", ""]
        if failure is not None:
            kind, text, trace = failure
            if host.run.on_client_error == "raise":
                raise ClientProcessError(f"client {client}, stage {stage}, round {rnd}: {kind}: {text}\n{trace}")
            return Failed(kind, text)
        if record is not None:
            host.store.put(client, record)
        return reply

    def score_models(self, host: ClientHost, models: Mapping[int, Any], rnd: int) -> dict[int, float]:
        """Each model's accuracy on its client's test split, scored in that client's process (the
        server's process holds no client's data). A client whose process has ended is not scored."""
        clients = [c for c in sorted(models) if c in self._clients]
        scores: dict[int, float] = {}

        def send(client: int) -> None:
            _send_frames(self._clients[client][1], {"score": True, "round": rnd}, _to_bytes(models[client]), b"")

        for client in clients[: self.workers]:
            send(client)
        for i, client in enumerate(clients):
            header, _, _ = _receive_frames(self._clients[client][1], 1 << 20, 1 << 20)
            if header.get("failure") is not None:
                kind, text, trace = header["failure"]
                raise ClientProcessError(f"scoring a server model on client {client}'s test split: {kind}: {text}\n{trace}")
            scores[client] = float(header["accuracy"])
            if i + self.workers < len(clients):
                send(clients[i + self.workers])
        return scores

    def _stop(self, client: int) -> None:
        process, end = self._clients.pop(client)
        stop_process(process, grace=0)
        end.close()

    def close(self) -> None:
        for _process, end in self._clients.values():
            try:
                _send_frames(end, {"stop": True}, b"", b"")
            except (OSError, ValueError):
                pass
        for process, end in self._clients.values():
            stop_process(process, grace=5)
            end.close()
        self._clients = {}


def _send_frames(end: Any, header: dict[str, Any], first: bytes, second: bytes) -> None:
    end.send_bytes(json.dumps(header).encode())
    end.send_bytes(first)
    end.send_bytes(second)


_RECORD_LIMIT = 2**34  # a client's state record coming back (models and method state): only absurd ones are cut


def _receive_frames(end: Any, first_limit: int, second_limit: int) -> tuple[dict[str, Any], bytes, bytes]:
    """A header (JSON) and two payloads, each refused past its limit (OSError) before it is read."""
    header = json.loads(end.recv_bytes(1 << 20))
    if not isinstance(header, dict):
        raise ValueError("a frame header that is not an object")
    return header, end.recv_bytes(first_limit), end.recv_bytes(second_limit)


def _serve_isolated_client(host: ClientHost, client: int, end: Any, server_end: Any, earlier: list[Any],
                           threads: int) -> None:
    """An isolated client's process: withhold every other party's data, then run stages until told to stop."""
    server_end.close()
    for other in earlier:
        other.close()
    torch.set_num_threads(threads)
    host.run.data.withhold({client}, global_test=False)
    host.store = MemoryStore()  # the server's store object: empty here (records come with tasks)
    gc.collect()
    own = ClientHost(host.run, MemoryStore())
    while True:
        try:
            header, message, record = _receive_frames(end, 2**40, 2**40)
        except (EOFError, OSError):
            return  # the server is gone
        if header.get("stop"):
            return
        if header.get("score"):
            _send_frames(end, _score_here(host.run, client, int(header["round"]), message), b"", b"")
            continue
        if record:
            own.store.put(client, Message.from_bytes(record))
        failure, reply_bytes, record_bytes = None, b"", b""
        try:
            reply = own.handle(client, header["stage"], int(header["round"]), Message.from_bytes(message))
            new_record = own.store.get(client)
            reply_bytes = reply.to_bytes()
            record_bytes = b"" if new_record is None else new_record.to_bytes()
        except Exception as exc:  # noqa: BLE001  (reported to the server, which applies the run's policy)
            failure = [type(exc).__name__, str(exc), traceback.format_exc()]
        finally:
            own.store._records.pop(client, None)  # the server keeps the record
        _send_frames(end, {"failure": failure}, reply_bytes, record_bytes)


def _score_here(run: Any, client: int, rnd: int, model_bytes: bytes) -> dict[str, Any]:
    """A server model's accuracy on this client's test split (this round's view): the experimenter's
    measurement, made where the data are. The model comes pickled from the server's process (the
    server's own object; nothing a client sends is ever unpickled)."""
    try:
        model = _from_bytes(model_bytes)
        test = run.data.test_at(client, rnd)
        return {"failure": None, "accuracy": float(evaluate(model, test.x, test.y)["accuracy"])}
    except Exception as exc:  # noqa: BLE001  (reported to the server)
        return {"failure": [type(exc).__name__, str(exc), traceback.format_exc()]}


class BatchedExecutor(SequentialExecutor):
    """The sequential executor, offering each group of same-architecture clients to the method's
    batched handler (``<stage>_many``) where it has one."""

    batched = True


EXECUTORS: dict[str, type] = {"sequential": SequentialExecutor, "processes": ProcessExecutor,
                              "batched": BatchedExecutor, "isolated": IsolatedExecutor}


def make_executor(name: str, workers: int = 0) -> Executor:
    if name not in EXECUTORS:
        raise ValueError(f"runtime.executor={name!r} is not supported (allowed: {', '.join(EXECUTORS)})")
    return EXECUTORS[name](workers) if name in ("processes", "isolated") else EXECUTORS[name]()


__all__ = ["EXECUTORS", "BatchedExecutor", "ClientProcessError", "Executor", "Failed", "IsolatedExecutor", "Outcome", "ProcessExecutor",
           "SequentialExecutor", "make_executor", "worker_count"]
