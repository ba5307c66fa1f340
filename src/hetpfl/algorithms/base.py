"""What an algorithm is: a Server and a Client that talk only through messages.

A method file defines a config dataclass (its hyperparameters and their defaults, with their rules
declared by :func:`~hetpfl.configuration.option`), the stage schemas, a :class:`Server` subclass
whose :meth:`Server.round` reads like the paper's server pseudo-code and asks stages of clients
through a :class:`Comm`, and a :class:`Client` subclass with one method per stage. Nothing here
knows which runtime carries the messages.

A client holds named **module slots** (``model`` by default; a method may declare more, e.g. a
``generator``, through :attr:`AlgorithmSpec.client_modules`) and a typed :class:`ClientState`;
the runtime builds, seeds, stores and restores both.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..configuration import option
from ..data import ArrayDataset
from ..learn import AUGMENTATIONS, OptimOptions, evaluate
from ..messages import ArrayField, Message, Schema, StageSchema
from ..models import ModuleSpec
from ..rng import derive_seed, numpy_rng, torch_generator
from ..state import ClientState
from .robust import AggregationOptions

TASK_KINDS = ("classification", "vqa")  # AlgorithmSpec.task_kind
MAIN_SLOT = "model"  # the slot every method has unless it declares otherwise; ``ctx.model``
EVALUATE_STAGE = "evaluate"
TASK_COUNTS = ArrayField(dtype="int64", shape=("num_tasks",))
EVALUATE_SCHEMA = StageSchema(
    down=Schema(),
    up=Schema(
        scalars={"accuracy": float, "loss": float, "num_examples": int},
        # per-task counts, sent only when the client's test data carries task ids
        arrays={"task_correct": TASK_COUNTS, "task_count": TASK_COUNTS},
        optional=frozenset({"task_correct", "task_count"}),
    ),
)


@dataclass(frozen=True)
class ClientTraining(OptimOptions):
    """The client routine every method shares (so baselines train clients identically).

    It *is* the :class:`~hetpfl.learn.OptimOptions` of local training (lr, optimizer, weight decay,
    momentum, gradient clipping: their defaults live there, once) plus the schedule below.
    """

    local_epochs: float = option(1.0, ge=0)
    # when set, every client takes exactly this many optimizer steps per round whatever its size
    # (Mosaic's and DFRD's code: I = 10); None: ``local_epochs`` passes over the client's data
    local_steps: int | None = option(None, ge=1)
    batch_size: int = option(32, ge=1)
    augment: str = option("none", choices=AUGMENTATIONS)

    def optim(self, lr: float | None = None) -> OptimOptions:
        """The optimizer options of local training (``lr`` overrides the learning rate)."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimOptions)}
        return OptimOptions(**{**base, **({} if lr is None else {"lr": lr})})


@dataclass
class ClientContext:
    """What a client's stage handler may use: its own modules, data, state and random streams.

    ``public_inputs`` carries inputs only; public labels are not reachable from here, except
    ``leaked_public_labels``, set only when a method's config explicitly opts into that leak.
    """

    client_id: int
    round: int
    stage: str
    arch: str
    modules: dict[str, nn.Module]
    train: ArrayDataset
    test: ArrayDataset
    public_inputs: np.ndarray | None
    num_classes: int
    state: ClientState
    training: ClientTraining
    seed: int
    num_tasks: int = 0  # tasks in the data (0: no task ids)
    value_range: tuple[float, float] | None = None  # bounds of the normalized inputs (for generators)
    leaked_public_labels: np.ndarray | None = None
    # data whose samples are references (HetVQA): the shared example store they point into and this
    # round's extra evaluation splits (``data.client_examples``); None for array datasets
    examples: Any = None

    @property
    def model(self) -> nn.Module:
        """The main slot (``modules["model"]``)."""
        try:
            return self.modules[MAIN_SLOT]
        except KeyError:
            raise KeyError(f"this method's clients hold no '{MAIN_SLOT}' slot (slots: {sorted(self.modules)})") from None

    def rng(self, *keys: str | int) -> np.random.Generator:
        return numpy_rng(self.seed, "client", self.client_id, "round", self.round, self.stage, *keys)

    def generator(self, *keys: str | int) -> torch.Generator:
        return torch_generator(self.seed, "client", self.client_id, "round", self.round, self.stage, *keys)

    def label_counts(self) -> np.ndarray:
        """Counts of each class in this client's private training data (this round's view)."""
        return np.bincount(self.train.y, minlength=self.num_classes).astype(np.int64)


class PhaseClock:
    """Wall-clock seconds of a server's named phases (``with setup.clock.phase("distill"):``).

    The engine takes them every round into ``timings.jsonl`` (``phase_s``) and the summary
    (``time_by_phase_s``); they never enter ``metrics.jsonl``, which stays identical for one seed."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - started

    def take(self) -> dict[str, float]:
        """The seconds since the last call, by phase (and reset)."""
        out, self._seconds = self._seconds, {}
        return out


class ModuleFactory(Protocol):
    """Builds a freshly initialized registry module whose weights depend only on (seed, key)."""

    def __call__(self, arch: str, key: str | int, **options: Any) -> nn.Module: ...


@dataclass
class ServerSetup:
    """What a server may use: public inputs (no labels), the clients' architectures, its own
    compute (``build_model``), the shared client routine, and its random stream."""

    num_clients: int
    num_classes: int
    input_shape: tuple[int, ...]
    client_archs: list[str]
    public_inputs: np.ndarray | None
    training: ClientTraining
    seed: int
    build_model: ModuleFactory
    value_range: tuple[float, float] | None = None  # bounds of the normalized inputs (for generators)
    input_kind: str = ""  # image, vector or tokens
    clock: PhaseClock = field(default_factory=PhaseClock)  # time the server's phases (not saved)
    # data whose samples are references (HetVQA): ``examples(n) -> (pool, example sets)``, examples
    # the server may use (a generic mix, never a client's); None for array datasets
    examples: Callable[[int], Any] | None = None
    # the experiment's aggregation rule (``robust``), for servers that declare ``aggregates``
    aggregation: AggregationOptions = field(default_factory=AggregationOptions)

    def rng(self, *keys: str | int) -> np.random.Generator:
        return numpy_rng(self.seed, "server", *keys)

    def generator(self, *keys: str | int) -> torch.Generator:
        return torch_generator(self.seed, "server", *keys)

    def stream_seed(self, *keys: str | int) -> int:
        """The seed of :meth:`generator`'s stream, for work handed out by :meth:`Comm.map`."""
        return derive_seed(self.seed, "server", *keys)

    def rebuild(self, spec: ModuleSpec) -> nn.Module:
        """An empty module of ``spec`` to load saved weights into (restoring a server)."""
        return self.build_model(spec.arch, "restore", **spec.kwargs)


class Comm(Protocol):
    """How a server reaches clients. Replies come back ordered by client id; a client that
    failed is missing from the replies (the runtime records why)."""

    def ask(self, stage: str, messages: Mapping[int, Message]) -> dict[int, Message]: ...

    def map(self, work: Callable[..., Any], tasks: Sequence[tuple]) -> list[Any]:
        """``[work(*task) for task in tasks]``, in order; the processes executor shares the tasks out
        over its workers (``work`` a module-level function; tasks and results travel pickled, so a
        module given is trained on a copy: use the returned one)."""
        ...

    @property
    def workers(self) -> int:
        """How many of :meth:`map`'s tasks run at once (1: in turn). A server that can only guess
        its next pieces of work should map no more guesses than this: beyond it they cost time."""
        ...


class Server:
    """Base server. Subclasses implement :meth:`round`.

    Everything a server keeps between rounds lives in its attributes, and the default
    :meth:`state_dict` saves all of them except ``config`` and ``setup``: arrays, numbers,
    strings, registry-built modules, and dicts/lists of those (see :mod:`hetpfl.state`). A module
    is rebuilt on load from the architecture it recorded when built, so it is declared once.

    ``aggregates``: what the server combines with the experiment's ``aggregation`` rule
    (``"weights"``: whole models, any of ``robust.WEIGHT_RULES``; ``"rows"``: equal arrays such as
    score rows, ``robust.ROW_RULES``; ``"entries"``: width sub-models, each entry over the clients
    holding it, ``robust.ROW_RULES``); None: it uses no such rule (only ``mean`` is accepted).
    """

    aggregates: str | None = None

    def __init__(self, config: Any, setup: ServerSetup) -> None:
        self.config = config
        self.setup = setup

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        """Run one round with the sampled ``clients``; return server-side measures."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What this server holds between rounds (every attribute but ``config`` and ``setup``)."""
        return {name: value for name, value in vars(self).items() if name not in ("config", "setup")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (modules already rebuilt)."""
        for name, value in state.items():
            setattr(self, name, value)

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        """Models besides each client's own to evaluate on each client's test split, e.g.
        ``{"server": {client: cluster_model}}`` or ``{"global": {client: global_model}}``."""
        return {}

    def test_models(self) -> dict[str, nn.Module]:
        """Models to evaluate on the global test set (reported as ``<name>_test_acc``), e.g. the
        global model of a method that has one."""
        return {}

    def visuals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Image grids for the results folder at the end of a run: ``{name: (images of shape
        (rows, cols, C, H, W), one label per row)}``, saved as ``<name>.png`` (e.g. samples of
        each client's generator)."""
        return {}

    def heatmaps(self) -> dict[str, tuple[np.ndarray, str]]:
        """Client × client matrices for the results folder at the end of a run: ``{name: (matrix,
        title)}``, saved as ``<name>.png`` — beside the scenario's true task relatedness when the
        data has one (e.g. FedMosaic's RELA weights)."""
        return {}

    def evaluation_messages(self, clients: list[int]) -> dict[int, Message]:
        """What the evaluate stage sends each client (default nothing). A method whose personalized
        model needs the latest global state (e.g. FedRep: the global body with the client's own
        head) sends it here and declares it in its ``evaluate`` schema; these bytes count as
        evaluation traffic, not as the method's."""
        return {c: Message() for c in clients}

    def cluster_assignment(self) -> np.ndarray | None:
        """For clustering methods: each client's cluster id (-1: none yet), else None. The engine
        compares it with the true groups (the server never sees them)."""
        return None


class Client:
    """Base client. A stage named ``s`` is handled by the method ``s(message, ctx)``.

    One ``Client`` instance serves every client a runtime hosts, so a handler must keep nothing
    about a client on ``self``: whatever a client keeps between rounds goes in ``ctx.state`` or
    its module slots (checked by the contract tests for every registered method).

    A stage may also have a batched form ``s_many(messages, ctxs) -> {client: reply}`` over a
    group of clients that share their module architectures; only a batched executor calls it,
    and it must give the results ``s`` gives client by client (within float tolerance).
    """

    def __init__(self, config: Any) -> None:
        self.config = config

    def handle(self, stage: str, message: Message, ctx: ClientContext) -> Message:
        handler = getattr(self, stage, None)
        if handler is None or stage.startswith("_"):
            raise ValueError(f"{type(self).__name__} has no stage '{stage}'")
        return handler(message, ctx)

    def evaluate(self, message: Message, ctx: ClientContext) -> Message:
        """The client's own model on its own test split (every algorithm, every round)."""
        return evaluation_reply(ctx.model, ctx.test, ctx.num_tasks)

    def evaluate_many(self, messages: Mapping[int, Message], ctxs: Mapping[int, ClientContext]
                      ) -> dict[int, Message] | None:
        """``evaluate`` for a group at once (the batched executor: one stacked model, each client on
        its own test split); None (client by client) where a method scores another model or the
        group's models do not stack."""
        from ..learn.stacked import evaluate_many  # noqa: PLC0415

        group = list(ctxs.values())
        if type(self).evaluate is not Client.evaluate or not stackable(group):
            return None
        num_tasks = group[0].num_tasks
        results = evaluate_many([ctx.model for ctx in group], [ctx.test.x for ctx in group], [ctx.test.y for ctx in group],
                                groups=[ctx.test.task for ctx in group] if num_tasks else None, num_groups=num_tasks)
        return {c: _reply(result) for c, result in zip(ctxs, results)}


def evaluation_reply(model: nn.Module, test: ArrayDataset, num_tasks: int = 0) -> Message:
    """The evaluate stage's reply for ``model`` on ``test``, with per-task counts of correct and
    scored samples when the data has tasks (``num_tasks`` > 0)."""
    groups = test.task if num_tasks else None
    return _reply(evaluate(model, test.x, test.y, groups=groups, num_groups=num_tasks))


def _reply(result: Mapping[str, Any]) -> Message:
    reply = Message(scalars={"accuracy": float(result["accuracy"]), "loss": float(result["loss"]),
                             "num_examples": int(result["n"])})
    if "group_correct" in result:
        reply.arrays["task_correct"] = result["group_correct"]
        reply.arrays["task_count"] = result["group_count"]
    return reply


def default_client_modules(arch: str, config: Any, data: Any = None) -> dict[str, ModuleSpec]:
    """One slot, ``model``, of the client's assigned architecture (``name`` or ``name@width``)."""
    return {MAIN_SLOT: ModuleSpec.parse(arch)}


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered method: its config, its two sides, the messages of each stage and the
    module slots its clients hold (``client_modules(arch, config, data) -> {slot: ModuleSpec}``,
    ``data`` the run's ``FederatedData``, e.g. for a generator's value range).

    Checked at registration: every stage has a handler on ``client_cls`` and is a Python
    identifier (Flower's message types need that); an ``evaluate`` schema, if declared, extends
    the default one (it must still carry accuracy, loss and num_examples)."""

    name: str
    config_cls: type
    server_cls: type[Server]
    client_cls: type[Client]
    schemas: Mapping[str, StageSchema]
    summary: str
    homogeneous_only: bool = False
    uses_public: bool = False
    stateful_clients: bool = True  # clients keep something between rounds (refuses runtime.client_state=none)
    client_modules: Callable[[str, Any, Any], Mapping[str, ModuleSpec]] = field(default=default_client_modules)
    # what the method's clients learn: "classification" (array datasets) or "vqa" (HetVQA scenarios,
    # LoRA-adapted vision-language clients); prepare refuses a method on the other kind of data
    task_kind: str = "classification"
    # setup_run(config, run) -> facts: a one-time step before federation that every party repeats
    # deterministically (or reads from a cache), e.g. FedMosaic's weight alignment; prepare calls it
    # after the data and backbones are ready, and its facts go to the summary's "setup"
    setup_run: Callable[[Any, Any], Mapping[str, Any]] | None = None
    # check_run(config, run) raises FieldError/ValueError for a run this method cannot do (e.g. more
    # clusters than clients, architectures without width support); prepare calls it before training
    check_run: Callable[[Any, Any], None] | None = None

    def __post_init__(self) -> None:
        if self.task_kind not in TASK_KINDS:
            raise ValueError(f"algorithm '{self.name}': task_kind {self.task_kind!r} is not one of {', '.join(TASK_KINDS)}")
        for stage in list(self.schemas) + [EVALUATE_STAGE]:
            if not stage.isidentifier() or stage.startswith("_"):
                raise ValueError(f"algorithm '{self.name}': stage {stage!r} must be a Python identifier "
                                 f"not starting with '_' (it travels as Flower message type query.{stage})")
            if not callable(getattr(self.client_cls, stage, None)):
                raise ValueError(f"algorithm '{self.name}': stage '{stage}' is declared but "
                                 f"{self.client_cls.__name__} has no method '{stage}' to handle it")
        if EVALUATE_STAGE in self.schemas:
            declared = self.schemas[EVALUATE_STAGE].up.scalars
            missing = sorted(set(EVALUATE_SCHEMA.up.scalars) - set(declared))
            if missing:
                raise ValueError(f"algorithm '{self.name}': its evaluate schema must keep {missing}")

    def schema(self, stage: str) -> StageSchema:
        if stage in self.schemas:
            return self.schemas[stage]
        if stage == EVALUATE_STAGE:
            return EVALUATE_SCHEMA
        raise ValueError(f"algorithm '{self.name}' declares no stage '{stage}' (stages: {sorted(self.schemas)})")

    def modules_for(self, arch: str, config: Any, data: Any = None) -> dict[str, ModuleSpec]:
        """The module slots of a client whose assigned architecture is ``arch``."""
        slots = dict(self.client_modules(arch, config, data))
        if not slots or any(not isinstance(s, str) or not s.isidentifier() or s == "state" for s in slots):
            raise ValueError(f"algorithm '{self.name}': clients need at least one module slot, each named by an "
                             f"identifier other than 'state' (got {sorted(map(str, slots))})")
        return slots


# Reusable schema pieces -----------------------------------------------------------------------
WEIGHTS = ArrayField(dtype="float32", shape=None)
BUFFERS_INT = ArrayField(dtype="int64", shape=None)
PROBS = ArrayField(dtype="float32", shape=("num_public_total", "num_classes"), probabilities=True)  # the whole public set


def weight_fields() -> dict[str, ArrayField]:
    """Prefixes for a model's state: float tensors and integer buffers (BatchNorm counters)."""
    return {"w.": WEIGHTS, "b.": BUFFERS_INT}


# The evaluate stage of a method that sends (part of) the global weights to evaluate with (FedRep,
# FedBABU: ``Server.evaluation_messages``): weights down, the usual scores up.
EVALUATE_WITH_WEIGHTS = StageSchema(down=Schema(prefix_arrays=weight_fields()), up=EVALUATE_SCHEMA.up)


@dataclass
class NoConfig:
    """For methods without hyperparameters of their own."""


def train_locally(ctx: ClientContext, epochs: float | None = None, *, model: nn.Module | None = None,
                  lr: float | None = None,
                  params: Iterable[torch.Tensor] | None = None,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  penalty: Callable[[], torch.Tensor] | None = None, stream: str = "fit") -> dict[str, float]:
    """The shared client routine: supervised training on the client's private data (this round's
    view) with the shared schedule and optimizer options.

    ``model``: which module (default the ``model`` slot); ``lr``: another learning rate than the
    shared routine's (e.g. a fine-tuning phase); ``params``: a subset to update (e.g. a
    head); ``loss_fn(logits, labels)``: the data term (default cross-entropy); ``penalty()``: a term
    added to every step; ``stream``: the key of the random stream (shuffles, augmentation) — two
    trainings in one stage use two keys. ``epochs`` given: that many passes; otherwise the shared
    schedule (``client.local_steps`` steps when set, else ``client.local_epochs`` passes)."""
    from ..learn import cross_entropy, fit  # noqa: PLC0415

    return fit(
        ctx.model if model is None else model,
        ctx.train.x,
        ctx.train.y,
        epochs=ctx.training.local_epochs if epochs is None else epochs,
        steps=ctx.training.local_steps if epochs is None else None,
        batch_size=ctx.training.batch_size,
        optim=ctx.training.optim(lr),
        generator=ctx.generator(stream),
        augment=ctx.training.augment,
        params=params,
        loss_fn=cross_entropy if loss_fn is None else loss_fn,
        penalty=penalty,
    )


def stackable(ctxs: Sequence[ClientContext]) -> bool:
    """Whether a group's ``model`` slots can run as one stacked model (the batched executor): one
    stackable architecture (a plain stack of linear, conv and pooling layers on small inputs) and
    the same training options."""
    from ..learn.stacked import stack_signature  # noqa: PLC0415

    signatures = {stack_signature(ctx.model) for ctx in ctxs}
    return len({ctx.training for ctx in ctxs}) == 1 and len(signatures) == 1 and None not in signatures


def train_locally_many(ctxs: Sequence[ClientContext], epochs: float | None = None) -> list[dict[str, float]] | None:
    """:func:`train_locally` with its defaults (``epochs`` as it takes them) for a group of clients at
    once (the batched executor): their ``model`` slots trained as one stacked model
    (:func:`hetpfl.learn.fit_many`). None, with nothing trained, when the group is not
    :func:`stackable`; the caller then trains them one by one."""
    from ..learn.stacked import FitJob, fit_many  # noqa: PLC0415

    if not stackable(ctxs):
        return None
    training = ctxs[0].training
    jobs = [FitJob(ctx.model, ctx.train.x, ctx.train.y, ctx.generator("fit"),
                   epochs=training.local_epochs if epochs is None else epochs,
                   steps=training.local_steps if epochs is None else None) for ctx in ctxs]
    return fit_many(jobs, batch_size=training.batch_size, optim=training.optim(), augment=training.augment)


__all__ = [
    "AlgorithmSpec",
    "Client",
    "ClientContext",
    "ClientState",
    "ClientTraining",
    "Comm",
    "EVALUATE_SCHEMA",
    "EVALUATE_STAGE",
    "EVALUATE_WITH_WEIGHTS",
    "MAIN_SLOT",
    "TASK_KINDS",
    "ModuleFactory",
    "PhaseClock",
    "NoConfig",
    "PROBS",
    "Server",
    "ServerSetup",
    "default_client_modules",
    "evaluation_reply",
    "stackable",
    "train_locally",
    "train_locally_many",
    "weight_fields",
]
