"""The client side of any runtime: run a stage for a client, keeping its state between rounds.

The simulator calls :meth:`ClientHost.handle` in-process; the Flower ClientApp calls the same
method inside each SuperNode. One live model per architecture is reused: a client's weights are
loaded into it before its stage and saved back after, so memory holds weights, not modules.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from .algorithms.base import Client, ClientContext
from .messages import Message, compress, decompress
from .rng import derive_seed


class StateStore(Protocol):
    def get(self, client: int) -> dict[str, Any] | None: ...
    def put(self, client: int, state: dict[str, Any]) -> None: ...


class MemoryStore:
    """Client states in a dict (fast; fine for tens of clients with small models)."""

    def __init__(self) -> None:
        self._states: dict[int, dict[str, Any]] = {}

    def get(self, client: int) -> dict[str, Any] | None:
        return self._states.get(client)

    def put(self, client: int, state: dict[str, Any]) -> None:
        self._states[client] = state


class DiskStore:
    """Client states pickled to one file each (bounded memory for many clients)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="hetpfl-states-")
        self.directory = Path(directory if directory is not None else self._tmp.name)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, client: int) -> Path:
        return self.directory / f"client-{client:06d}.pkl"

    def get(self, client: int) -> dict[str, Any] | None:
        path = self._path(client)
        if not path.exists():
            return None
        with path.open("rb") as fh:
            return pickle.load(fh)

    def put(self, client: int, state: dict[str, Any]) -> None:
        tmp = self._path(client).with_suffix(".tmp")
        with tmp.open("wb") as fh:
            pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(self._path(client))


def make_store(kind: str, directory: str | Path | None = None) -> StateStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "disk":
        return DiskStore(directory)
    raise ValueError(f"runtime.client_state={kind!r} is not supported (allowed: memory, disk)")


def _read_only(message: Message) -> Message:
    """A view a client cannot mutate (the same array may be sent to many clients)."""
    arrays = {}
    for key, array in message.arrays.items():
        view = array.view()
        view.flags.writeable = False
        arrays[key] = view
    return Message(arrays, dict(message.scalars))


class ClientHost:
    """Runs stage handlers for the clients it hosts (all of them in the simulator, one in Flower)."""

    def __init__(self, run: Any, store: StateStore | None = None) -> None:
        self.run = run  # an engine.RunSpec (typed loosely to keep this module below the engine)
        self.store = store if store is not None else MemoryStore()
        self.client: Client = run.algorithm.client_cls(run.algorithm_config)
        self._live: dict[str, torch.nn.Module] = {}

    def _live_model(self, arch: str) -> torch.nn.Module:
        if arch not in self._live:
            self._live[arch] = self.run.new_model(arch, "live", arch)
        return self._live[arch]

    def handle(self, client_id: int, stage: str, rnd: int, message: Message) -> Message:
        run = self.run
        arch = run.client_archs[client_id]
        state = self.store.get(client_id)
        if state is None:
            state = {"model": run.new_model(arch, "client", client_id).state_dict(), "algorithm": {}}
        model = self._live_model(arch)
        model.load_state_dict(state["model"])
        ctx = ClientContext(
            client_id=client_id,
            round=rnd,
            stage=stage,
            arch=arch,
            model=model,
            train=run.data.client_train[client_id],
            test=run.data.client_test[client_id],
            public_inputs=run.data.public.inputs if len(run.data.public) else None,
            num_classes=run.data.num_classes,
            state=state["algorithm"],
            training=run.training,
            seed=run.seed,
        )
        # Dropout and other torch-internal randomness draw from the global stream: seed it per call.
        torch.manual_seed(derive_seed(run.seed, "client", client_id, "round", rnd, stage, "torch"))
        reply = self.client.handle(stage, _read_only(decompress(message)), ctx)
        state["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.store.put(client_id, state)
        return compress(reply, run.compression)
