"""Shared pieces of the methods on HetVQA's LoRA-adapted vision-language clients (``task_kind="vqa"``).

* :func:`vqa_module` / :func:`vqa_modules`: a client's slot — its architecture's pretrained backbone
  with adapters (``data.backbone_options``, filled in by ``prepare``), single or dual;
* the replay memory (:func:`receive`): each round's arrivals join the client's memory, kept in its
  state as arrays; :func:`train_on_memory` is the client routine — batches drawn from the memory
  (favouring rarely used examples), the answer loss, the shared optimizer options, for
  ``ceil(client.local_epochs × arrivals / client.batch_size)`` steps (at least one);
* :class:`VQAClient`: the evaluate stage every such method shares — **Self** exact match (the
  ``accuracy``) with per-task counts, **Others** exact match, Self token F1, and forgetting (the
  mean drop on earlier tasks from their best so far);
* adapters as message arrays (:func:`adapter_arrays`, :func:`load_adapter_arrays`) and the
  per-architecture average (:func:`average_by_architecture`): only adapter tensors travel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.hetvqa import UNSEEN_KINDS, Batch, ReplayMemory
from ..learn.loop import Objective, optimize
from ..learn.vlm import answer_loss, answer_scores, example_batches, memory_batches, mixed_answer_loss
from ..messages import Message, Schema, StageSchema
from ..models import ModuleSpec
from ..models.lora import adapter_state, gate_shares, load_adapter_state, trainable_parameters
from .base import EVALUATE_SCHEMA, MAIN_SLOT, Client, ClientContext, weight_fields
from .weights import weighted_average

#: Fast adaptation's scores (the last round only): exact match on each kind of unseen task before
#: (``zeroshot_``) and after (``adapt_``) a few steps on it.
ADAPTATION_SCALARS = tuple(f"{when}_{kind}" for kind in UNSEEN_KINDS for when in ("zeroshot", "adapt"))
#: The evaluate stage of every VQA method: the default scores plus Others, token F1 and forgetting.
VQA_EVALUATE = StageSchema(
    down=EVALUATE_SCHEMA.down,
    up=Schema(scalars={**EVALUATE_SCHEMA.up.scalars, "others": float, "token_f1": float, "forgetting": float,
                       "global_share": float, **{name: float for name in ADAPTATION_SCALARS}},
              arrays=dict(EVALUATE_SCHEMA.up.arrays),
              # undefined ones are left out: Others before any other client met a task of its own,
              # forgetting before a task switch, fast adaptation before the last round, the global
              # module's share for a model without dual adapters
              optional=EVALUATE_SCHEMA.up.optional | {"others", "forgetting", "global_share", *ADAPTATION_SCALARS},
              # scores and the gate's share are fractions; forgetting is a drop between two scores
              scalar_bounds={**{name: (0.0, 1.0) for name in ("others", "token_f1", "global_share", *ADAPTATION_SCALARS)},
                             "forgetting": (-1.0, 1.0)}),
)
#: Adapters down (the server's) and up (the client's), with the client's example count.
ADAPTERS_ROUND = StageSchema(
    down=Schema(prefix_arrays=weight_fields()),
    up=Schema(prefix_arrays=weight_fields(), scalars={"num_examples": int}),
)


def vqa_module(arch: str, data: Any, *, dual: bool = False, **options: Any) -> ModuleSpec:
    """``arch``'s pretrained backbone with the run's adapters (``dual``: a frozen global and a
    trainable local adapter mixed by the gate; ``options``: more builder options, e.g. PQ-LoRA's)."""
    base = dict(getattr(data, "backbone_options", {}).get(arch, {}))
    return ModuleSpec.of(arch, **{**base, **options, **({"lora_dual": True} if dual else {})})


def backbone_only(arch: str, data: Any) -> ModuleSpec:
    """``arch``'s pretrained backbone without adapters (e.g. FedMosaic's frozen proxy)."""
    options = getattr(data, "backbone_options", {}).get(arch, {})
    return ModuleSpec.of(arch, **{k: v for k, v in options.items() if not k.startswith("lora_")})


def vqa_modules(arch: str, config: Any, data: Any = None) -> dict[str, ModuleSpec]:
    """One slot, ``model``: the backbone with one trainable adapter."""
    return {MAIN_SLOT: vqa_module(arch, data)}


# ---------------------------------------------------------------------------------------------
# Replay memory and the client routine
# ---------------------------------------------------------------------------------------------


def _memory(ctx: ClientContext) -> ReplayMemory:
    memory = ReplayMemory()
    if "memory_task" in ctx.state:
        names = ctx.examples.store.tasks
        memory.keys = [(names[int(t)], int(i)) for t, i in zip(ctx.state["memory_task"], ctx.state["memory_index"])]
        memory.counts = np.asarray(ctx.state["memory_count"], dtype=np.float64).copy()
    return memory


def _keep(ctx: ClientContext, memory: ReplayMemory) -> None:
    ids = {name: i for i, name in enumerate(ctx.examples.store.tasks)}
    ctx.state["memory_task"] = np.array([ids[t] for t, _ in memory.keys], dtype=np.int64)
    ctx.state["memory_index"] = np.array([i for _, i in memory.keys], dtype=np.int64)
    ctx.state["memory_count"] = memory.counts.copy()


def receive(ctx: ClientContext) -> int:
    """Add this round's arrivals (``ctx.train``) to the client's memory, once per round (a method
    that trains twice in a round adds them once). Returns how many arrived."""
    if ctx.state.get("memory_round", -1) < ctx.round:
        memory = _memory(ctx)
        for task, indices in ctx.examples.store.grouped(ctx.train).items():
            memory.add(ctx.examples.store.tasks[task], indices)
        _keep(ctx, memory)
        ctx.state["memory_round"] = ctx.round
    return len(ctx.train)


def local_steps(ctx: ClientContext, fraction: float = 1.0) -> int:
    """Optimizer steps of one local training: ``local_epochs`` passes' worth over this round's
    arrivals (or ``local_steps`` when set), times ``fraction`` (a method that runs several passes per
    step takes fewer steps, as FedMosaic's code equalizes compute), at least one."""
    if ctx.training.local_steps is not None:
        return max(1, math.ceil(fraction * ctx.training.local_steps))
    return max(1, math.ceil(fraction * ctx.training.local_epochs * len(ctx.train) / ctx.training.batch_size))


BatchLoss = Callable[[Sequence[Batch]], torch.Tensor]


@contextmanager
def replay(ctx: ClientContext, stream: str = "fit") -> Iterator[Iterator[list[Batch]]]:
    """This round's arrivals join the memory; within the block, endless steps drawn from it (one
    batch per task in each step, ``client.batch_size`` examples in all); the updated use counts are
    kept when the block ends. For methods that step several objectives on the same batches."""
    receive(ctx)
    memory = _memory(ctx)
    store = ctx.examples.store
    sets = {name: store.examples("train", i) for i, name in enumerate(store.tasks)}
    yield memory_batches(store.pool, sets, memory, ctx.training.batch_size, ctx.rng(stream, "memory"))
    _keep(ctx, memory)


def train_on_memory(ctx: ClientContext, model: nn.Module | None = None, *, params: Sequence[torch.Tensor] | None = None,
                    loss_fn: BatchLoss | None = None, penalty: Callable[[], torch.Tensor] | None = None,
                    stream: str = "fit", steps: int | None = None, lr: float | None = None) -> dict[str, float]:
    """The shared client routine on a VQA client: this round's arrivals join the memory, then
    :func:`local_steps` steps on batches drawn from it (:func:`replay`). ``model``: which module
    (default the ``model`` slot); ``params``: what is updated (default the model's trainable
    tensors: its local adapter and gates); ``loss_fn(batches)``: the data term (default the answer
    loss of ``model``); ``penalty()``: a term added to every step; ``steps``: instead of
    :func:`local_steps`."""
    model = ctx.model if model is None else model

    def loss(step: Sequence[Batch]) -> torch.Tensor:
        value = mixed_answer_loss(model, step) if loss_fn is None else loss_fn(step)
        return value if penalty is None else value + penalty()

    with replay(ctx, stream) as batches:
        return optimize(Objective(loss, trainable_parameters(model) if params is None else params,
                                  ctx.training.optim(lr), train=(model,)),
                        batches, steps=local_steps(ctx) if steps is None else steps)


def size_weighted(batches: Sequence[Batch], per_batch: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
    """``per_batch`` over one step's batches (one per task), weighted by their sizes."""
    total = sum(int(b.text.shape[0]) for b in batches)
    return sum(per_batch(b) * (b.text.shape[0] / total) for b in batches)


# ---------------------------------------------------------------------------------------------
# Evaluation: Self, Others, token F1, forgetting
# ---------------------------------------------------------------------------------------------


def _score(model: nn.Module, store: Any, rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact match, token F1 and answer loss of every reference in ``rows`` (in row order)."""
    em, f1, nll = np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))
    for task in np.unique(rows.x[:, 0]) if len(rows) else ():
        where = np.flatnonzero(rows.x[:, 0] == task)
        em[where], f1[where], nll[where] = answer_scores(model, store.pool, store.examples("test", int(task)),
                                                         rows.x[where, 1], store.vocab)
    return em, f1, nll


def vqa_evaluation(model: nn.Module, ctx: ClientContext, lr_scales: Mapping[int, float] | None = None) -> Message:
    """The evaluate stage's reply for ``model`` (module docstring). Forgetting: over the tasks met
    before the ones arriving now, the mean of (best exact match in earlier evaluations − now); left
    out when there are none (the first task, or every round of a static scenario), as is Others
    when no other client has met a task this one does not train on. ``lr_scales``: the method's own
    learning-rate factors, for the fast adaptation (:func:`fast_adaptation`)."""
    store = ctx.examples.store
    with gate_shares(model) as shares:
        em, f1, nll = _score(model, store, ctx.test)
    others = _score(model, store, ctx.examples.others)[0]
    correct = np.bincount(ctx.test.task, weights=em, minlength=ctx.num_tasks)
    count = np.bincount(ctx.test.task, minlength=ctx.num_tasks)
    accuracy = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
    best = np.asarray(ctx.state.get("best_task_acc", np.full(ctx.num_tasks, np.nan)), dtype=np.float64)
    earlier = np.setdiff1d(np.flatnonzero(count > 0), np.unique(ctx.train.task))
    earlier = earlier[~np.isnan(best[earlier])]
    ctx.state["best_task_acc"] = np.fmax(best, accuracy)
    scalars = {"accuracy": float(em.mean()), "loss": float(nll.mean()) if nll.size else float("nan"),
               "num_examples": len(ctx.test), "token_f1": float(f1.mean())}
    if others.size:
        scalars["others"] = float(others.mean())
    if shares:  # dual adapters: the mean share β̃ of the global module on the client's own test inputs
        scalars["global_share"] = float(torch.cat(shares).mean())
    if earlier.size:
        scalars["forgetting"] = float(np.mean(best[earlier] - accuracy[earlier]))
    if ctx.examples.adaptation_steps:
        scalars.update(fast_adaptation(model, ctx, lr_scales))
    return Message({"task_correct": np.rint(correct).astype(np.int64), "task_count": count.astype(np.int64)}, scalars)


def fast_adaptation(model: nn.Module, ctx: ClientContext, lr_scales: Mapping[int, float] | None = None
                    ) -> dict[str, float]:
    """After the last round, for every unseen task: ``model``'s exact match on it, then again after
    ``adaptation_steps`` steps of the answer loss on its training examples (the shared optimizer
    options and batch size, the tensors training updates, at the factors of the learning rate the
    method trains them with: ``lr_scales``, ``{id(parameter): factor}``, as
    :class:`~hetpfl.learn.loop.Objective` takes them); the model is restored after each task.
    Returns the mean over each kind's tasks (:data:`ADAPTATION_SCALARS`)."""
    store, steps = ctx.examples.store, ctx.examples.adaptation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    out = {}
    for kind, sets in store.unseen.items():
        before, after = [], []
        for name, examples in sets.items():
            rows = np.arange(len(examples.test))
            before.append(answer_scores(model, store.pool, examples.test, rows, store.vocab)[0].mean())
            batches = example_batches(store.pool, [examples.train], ctx.training.batch_size, ctx.rng("adapt", name))
            optimize(Objective(lambda b: answer_loss(model, b), params, ctx.training.optim(), train=(model,),
                               lr_scales=lr_scales), batches, steps=steps)
            after.append(answer_scores(model, store.pool, examples.test, rows, store.vocab)[0].mean())
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)
        out[f"zeroshot_{kind}"], out[f"adapt_{kind}"] = float(np.mean(before)), float(np.mean(after))
    return out


class FixedMix(nn.Module):
    """A dual-adapter model with its global adapter's share fixed at ``share`` (no gate), for decoding."""

    def __init__(self, model: nn.Module, share: float = 0.5) -> None:
        super().__init__()
        self.model, self.share = model, share

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from ..models.lora import adapter_mix  # noqa: PLC0415

        with adapter_mix(self.model, self.share):
            return self.model(images, image_mask, tokens)


class VQAClient(Client):
    """Base client of the VQA methods: their shared evaluate stage, on :meth:`evaluated_model`."""

    def evaluated_model(self, ctx: ClientContext) -> nn.Module:
        """The client's personalized model (default the ``model`` slot)."""
        return ctx.model

    def adaptation_lr_scales(self, ctx: ClientContext) -> Mapping[int, float] | None:
        """The learning-rate factors the method trains some tensors with (``{id(parameter): factor}``),
        which the fast adaptation uses as well; default none (every tensor at the client's lr)."""
        return None

    def evaluate(self, message: Message, ctx: ClientContext) -> Message:
        return vqa_evaluation(self.evaluated_model(ctx), ctx, self.adaptation_lr_scales(ctx))


# ---------------------------------------------------------------------------------------------
# Adapters as messages, averaged per architecture
# ---------------------------------------------------------------------------------------------


def adapter_arrays(model: nn.Module, which: str = "local") -> dict[str, np.ndarray]:
    """One adapter's tensors as message arrays (``w.<layer>.lora_A`` ...)."""
    return {f"w.{k}": v.numpy() for k, v in adapter_state(model, which).items()}


def load_adapter_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray], which: str = "local") -> None:
    """Write received adapter arrays into adapter ``which`` of ``model``."""
    load_adapter_state(model, {k[2:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, which)


def average_by_architecture(replies: Mapping[int, Message], archs: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per architecture, the example-weighted average of its clients' uploaded arrays (FedIT's rule:
    adapters of different architectures have different shapes and are never mixed)."""
    groups: dict[str, list[int]] = {}
    for client in sorted(replies):
        groups.setdefault(archs[client], []).append(client)
    return {arch: weighted_average([dict(replies[c].arrays) for c in members],
                                   [float(replies[c].scalars["num_examples"]) for c in members])
            for arch, members in groups.items()}


__all__ = ["ADAPTATION_SCALARS", "ADAPTERS_ROUND", "FixedMix", "VQA_EVALUATE", "VQAClient", "adapter_arrays", "average_by_architecture", "backbone_only", "fast_adaptation",
           "load_adapter_arrays", "local_steps", "receive", "replay", "size_weighted", "train_on_memory", "vqa_evaluation",
           "vqa_module", "vqa_modules"]
