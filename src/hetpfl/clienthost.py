"""The client side of any runtime: run a stage for a client, keeping its state between rounds.

The simulator calls :meth:`ClientHost.handle` (or :meth:`ClientHost.handle_group`) in-process; the
Flower ClientApp calls the same method inside each SuperNode. A client holds the module slots its
method declares (``model`` by default). One live module per (slot, architecture) is reused: a
client's weights are loaded into it before its stage and saved back after, so memory holds
weights, not modules.

A client's whole state is one record (:class:`~hetpfl.messages.Message`): its slots' weights under
``<slot>/<parameter>`` and its algorithm state (:class:`~hetpfl.state.ClientState`) under
``state/<name>``. Stores keep records in memory or as one ``.npz`` per client (never pickle), and
can snapshot and restore all of them (checkpoints).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from .adversaries import tamper
from .privacy import privatize
from .algorithms.base import EVALUATE_STAGE, Client, ClientContext
from .messages import Message, compress, decompress
from .models import ModuleSpec
from .rng import derive_seed
from .state import ClientState, load_record, private_folder, save_record

STATE_PREFIX = "state/"


class StateStore(Protocol):
    """Where client records live between rounds."""

    def get(self, client: int) -> Message | None: ...
    def put(self, client: int, record: Message) -> None: ...
    def snapshot(self, directory: Path) -> None: ...
    def restore(self, directory: Path) -> None: ...


def _record_file(directory: Path, client: int) -> Path:
    return Path(directory) / f"client-{client:06d}.npz"


def _saved_clients(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in Path(directory).glob("client-*.npz"))


class MemoryStore:
    """Client records in a dict (fast; fine for tens of clients with small models)."""

    def __init__(self) -> None:
        self._records: dict[int, Message] = {}

    def get(self, client: int) -> Message | None:
        return self._records.get(client)

    def put(self, client: int, record: Message) -> None:
        self._records[client] = record

    def snapshot(self, directory: Path) -> None:
        for client, record in sorted(self._records.items()):
            save_record(_record_file(directory, client), record)

    def restore(self, directory: Path) -> None:
        self._records = {c: load_record(_record_file(directory, c)) for c in _saved_clients(directory)}


class DiskStore:
    """Client records as one ``.npz`` file each (bounded memory for many clients)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="hetpfl-states-")
        self.directory = private_folder(directory if directory is not None else self._tmp.name)

    def get(self, client: int) -> Message | None:
        path = _record_file(self.directory, client)
        return load_record(path) if path.exists() else None

    def put(self, client: int, record: Message) -> None:
        save_record(_record_file(self.directory, client), record)

    def snapshot(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for client in _saved_clients(self.directory):
            shutil.copy(_record_file(self.directory, client), _record_file(directory, client))  # keeps 0600

    def restore(self, directory: Path) -> None:
        for client in _saved_clients(self.directory):
            _record_file(self.directory, client).unlink()
        for client in _saved_clients(directory):
            shutil.copy(_record_file(directory, client), _record_file(self.directory, client))  # keeps 0600


class NullStore:
    """Clients keep nothing between stages (cross-device: each round may meet a new device); every
    stage starts from a client's initial modules. Only for methods whose clients need no state."""

    def get(self, client: int) -> Message | None:
        return None

    def put(self, client: int, record: Message) -> None:
        pass

    def snapshot(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)

    def restore(self, directory: Path) -> None:
        pass


STORES = {"memory": MemoryStore, "disk": DiskStore, "none": NullStore}


def make_store(kind: str, directory: str | Path | None = None) -> StateStore:
    if kind not in STORES:
        raise ValueError(f"runtime.client_state={kind!r} is not supported (allowed: {', '.join(STORES)})")
    return DiskStore(directory) if kind == "disk" else STORES[kind]()


def _read_only(message: Message) -> Message:
    """A view a client cannot mutate (the same array may be sent to many clients)."""
    arrays = {}
    for key, array in message.arrays.items():
        view = array.view()
        view.flags.writeable = False
        arrays[key] = view
    return Message(arrays, dict(message.scalars))


def module_arrays(slot: str, module: nn.Module) -> dict[str, np.ndarray]:
    """A slot's weights and buffers as arrays named ``<slot>/<name>`` (copies)."""
    return {f"{slot}/{name}": value.detach().cpu().numpy().copy() for name, value in module.state_dict().items()}


class ClientHost:
    """Runs stage handlers for the clients it hosts (all of them in the simulator, one in Flower)."""

    def __init__(self, run: Any, store: StateStore | None = None) -> None:
        self.run = run  # an engine.RunSpec (typed loosely to keep this module below the engine)
        self.store = store if store is not None else MemoryStore()
        self.client: Client = run.algorithm.client_cls(run.algorithm_config)
        self._live: dict[tuple[str, ModuleSpec], list[nn.Module]] = {}  # a pool per (slot, spec)
        self.batched_groups = 0  # group calls a batched handler took whole (the batched executor)

    # -- slots and groups --------------------------------------------------------------------
    def slots(self, client: int) -> dict[str, ModuleSpec]:
        return self.run.client_modules(client)

    def groups(self, clients: list[int]) -> list[list[int]]:
        """``clients`` grouped by their slots' architectures (groups and members in id order)."""
        by_key: dict[tuple, list[int]] = {}
        for client in sorted(clients):
            by_key.setdefault(tuple(sorted(self.slots(client).items())), []).append(client)
        return list(by_key.values())

    def _live_modules(self, slots: Mapping[str, ModuleSpec], index: int) -> dict[str, nn.Module]:
        """The ``index``-th live instance of every slot (a group handled at once needs several)."""
        out = {}
        for slot, spec in slots.items():
            pool = self._live.setdefault((slot, spec), [])
            while len(pool) <= index:
                pool.append(self.run.new_module(spec, "live", slot, spec.arch, len(pool)))
            out[slot] = pool[index]
        return out

    # -- records -----------------------------------------------------------------------------
    def initial_record(self, client: int) -> Message:
        """A client's first state: every slot freshly built from its own seed, empty algorithm state.

        The ``model`` slot keeps the seed key of earlier versions, ``("client", id)``; other slots
        use ``("client", id, slot)``."""
        arrays: dict[str, np.ndarray] = {}
        for slot, spec in self.slots(client).items():
            key = ("client", client) if slot == "model" else ("client", client, slot)
            arrays.update(module_arrays(slot, self.run.new_module(spec, *key)))
        return Message(arrays)

    def _load(self, record: Message, modules: Mapping[str, nn.Module]) -> ClientState:
        for slot, module in modules.items():
            prefix = f"{slot}/"
            module.load_state_dict({name[len(prefix):]: torch.from_numpy(array)
                                    for name, array in record.arrays.items() if name.startswith(prefix)})
        n = len(STATE_PREFIX)
        return ClientState({k[n:]: v for k, v in record.arrays.items() if k.startswith(STATE_PREFIX)},
                           {k[n:]: v for k, v in record.scalars.items() if k.startswith(STATE_PREFIX)})

    @staticmethod
    def _record(modules: Mapping[str, nn.Module], state: ClientState) -> Message:
        arrays: dict[str, np.ndarray] = {}
        for slot, module in modules.items():
            arrays.update(module_arrays(slot, module))
        saved = state.to_message()
        arrays.update({STATE_PREFIX + k: v for k, v in saved.arrays.items()})
        return Message(arrays, {STATE_PREFIX + k: v for k, v in saved.scalars.items()})

    def _context(self, client: int, stage: str, rnd: int, modules: dict[str, nn.Module],
                 state: ClientState) -> ClientContext:
        run = self.run
        data = run.data
        return ClientContext(
            client_id=client,
            round=rnd,
            stage=stage,
            arch=run.client_archs[client],
            modules=modules,
            train=data.train_at(client, rnd),
            test=data.test_at(client, rnd),
            public_inputs=data.public.inputs if len(data.public) else None,
            num_classes=data.num_classes,
            state=state,
            training=run.training,
            seed=run.seed,
            num_tasks=len(data.tasks),
            value_range=data.value_range,
            leaked_public_labels=run.leaked_public_labels,
            examples=data.client_examples(client, rnd) if hasattr(data, "client_examples") else None,
        )

    # -- running stages ----------------------------------------------------------------------
    def handle(self, client_id: int, stage: str, rnd: int, message: Message) -> Message:
        """Run ``stage`` for one client: load its record, call the handler, save the record."""
        modules = self._live_modules(self.slots(client_id), 0)
        record = self.store.get(client_id)
        state = self._load(record if record is not None else self.initial_record(client_id), modules)
        ctx = self._context(client_id, stage, rnd, modules, state)
        # Dropout and other torch-internal randomness draw from the global stream: seed it per call.
        torch.manual_seed(derive_seed(self.run.seed, "client", client_id, "round", rnd, stage, "torch"))
        sent = decompress(message)
        reply = self.client.handle(stage, _read_only(sent), ctx)
        self.store.put(client_id, self._record(modules, ctx.state))
        return compress(self._upload(client_id, stage, rnd, sent, reply), self.run.compression)

    def _upload(self, client: int, stage: str, rnd: int, sent: Message, reply: Message) -> Message:
        """What the client uploads: its reply through the privacy mechanism if the run has one
        (privacy.py), and, for a client of the run's adversaries, the attack's version of it
        (adversaries.py; an attacker adds no noise). Evaluation replies are measurements: untouched."""
        run = self.run
        if stage == EVALUATE_STAGE:
            return reply
        up = run.algorithm.schema(stage).up
        if client in run.adversarial_clients:
            return tamper(reply, sent, up, run.adversaries, seed=run.seed, client=client, rnd=rnd, stage=stage)
        if run.privacy.active:
            return privatize(reply, up, run.privacy, seed=run.seed, client=client, rnd=rnd, stage=stage, sent=sent,
                             num_classes=run.data.num_classes)
        return reply

    def handle_group(self, clients: list[int], stage: str, rnd: int, messages: Mapping[int, Message],
                     batched: bool = False) -> dict[int, Message] | None:
        """Run ``stage`` for a group of clients that share their slots' architectures.

        By default one by one (:meth:`handle`). With ``batched``, the whole group goes to the method's
        ``<stage>_many`` handler at once, each client with its own live modules, state and random
        streams. None when there is no such handler or it declines the group (returns None, having
        kept nothing): the caller then runs the group client by client."""
        if not batched:
            return {c: self.handle(c, stage, rnd, messages[c]) for c in clients}
        many = getattr(self.client, f"{stage}_many", None)
        if many is None:
            return None
        ctxs: dict[int, ClientContext] = {}
        for i, client in enumerate(clients):
            modules = self._live_modules(self.slots(client), i)
            record = self.store.get(client)
            state = self._load(record if record is not None else self.initial_record(client), modules)
            ctxs[client] = self._context(client, stage, rnd, modules, state)
        torch.manual_seed(derive_seed(self.run.seed, "group", clients[0], "round", rnd, stage, "torch"))
        sent = {c: decompress(messages[c]) for c in clients}
        replies = many({c: _read_only(sent[c]) for c in clients}, ctxs)
        if replies is None:  # the handler declined the group (before anything was kept)
            return None
        self.batched_groups += 1
        for client, ctx in ctxs.items():
            self.store.put(client, self._record(ctx.modules, ctx.state))
        return {c: compress(self._upload(c, stage, rnd, sent[c], replies[c]), self.run.compression) for c in clients}
