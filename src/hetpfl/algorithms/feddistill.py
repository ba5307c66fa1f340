"""FedDistill on LoRA clients: FedMD-style output sharing (Li & Wang, "FedMD", 2019), the baseline
FedMosaic's code runs as ``feddistill``. Models of any size and family take part together: only
their answers to shared public questions travel.

Every round t:
  SERVER  sends the consensus c^{t−1}: the mean, over the clients of the last round, of their answer
          logits on the public examples (nothing in the first round);
  CLIENT  digest: ``digest_steps`` steps of KL(c ‖ its own answer distribution) at temperature T on the
          public examples (its local adapter only); revisit: the shared routine on its memory; then
          uploads its answer logits on the public examples;
  SERVER  c^t = the mean of the uploaded logits (every architecture: HetVQA's models share one
          vocabulary, so their answer logits are comparable position by position).

Choices: the public examples are HetVQA's generic mix (the pretraining templates on the pretraining
subset's images: ``public_examples`` per template and source), never a client's; logits are taken at
the answer positions of those rows (teacher-forced, as every distillation here); the consensus is the
mean of logits (FedMD averages class scores); T = 1 and KL × T² (Hinton's form); the digest runs
before local training, as FedMD's "digest, then revisit".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import Validated, option
from ..data.hetvqa import make_batch
from ..learn.loop import Objective, optimize
from ..learn.losses import distillation_kl
from ..learn.vlm import answer_logits
from ..messages import ArrayField, Message, Schema, StageSchema
from ..models.lora import trainable_parameters
from .base import AlgorithmSpec, ClientContext, Comm, Server
from .vqa import VQA_EVALUATE, VQAClient, train_on_memory, vqa_modules

LOGITS = ArrayField(dtype="float32", shape=None, logits=True, magnitude=1e6)  # answer scores per position


@dataclass
class FedDistillConfig(Validated):
    public_examples: int = option(10, ge=1)  # public examples per pretraining template and source
    digest_steps: int = option(10, ge=0)  # distillation steps towards the consensus each round
    temperature: float = option(1.0, gt=0)


def public_batches(ctx: ClientContext, n: int, batch_size: int) -> list:
    """The public examples as a fixed list of batches (the same on every client, in one order)."""
    pool, sets = ctx.examples.public(n)
    return [make_batch(pool, s, rows) for s in sets
            for rows in np.array_split(np.arange(len(s)), max(1, len(s) // batch_size))]


class FedDistillServer(Server):
    def __init__(self, config: FedDistillConfig, setup) -> None:
        super().__init__(config, setup)
        self.consensus = np.zeros((0, 0), dtype=np.float32)  # none before the first uploads

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        down = {"consensus": self.consensus} if self.consensus.size else {}
        replies = comm.ask("train", {c: Message(dict(down)) for c in clients})
        if replies:
            self.consensus = np.mean([r.arrays["logits"] for r in replies.values()], axis=0).astype(np.float32)
        return {}


def learn_from_public(ctx: ClientContext, batches: list, flat_targets: np.ndarray, steps: int, stream: str,
                      loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """``steps`` steps over the public ``batches`` (cycling in a shuffled order) of
    ``loss(own answer logits, answers, target logits)`` on the client's trainable tensors; the target
    logits come flat, as uploaded, and are split back per batch."""
    if not steps:
        return
    model = ctx.model
    targets = torch.split(torch.from_numpy(np.array(flat_targets)), [answer_logits_count(b) for b in batches])
    order = ctx.rng(stream).permutation(len(batches))
    chosen = [(batches[i], targets[i]) for i in np.resize(order, steps)]
    optimize(Objective(lambda step: loss(*answer_logits(model, step[0]), step[1]), trainable_parameters(model),
                       ctx.training.optim(), train=(model,)), chosen)


@torch.no_grad()
def public_answers(model: torch.nn.Module, batches: list) -> np.ndarray:
    """The model's answer logits on the public batches, flat (what travels)."""
    model.eval()
    return torch.cat([answer_logits(model, b)[0] for b in batches]).numpy().astype(np.float32)


class FedDistillClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        config = self.config
        batches = public_batches(ctx, config.public_examples, ctx.training.batch_size)
        if "consensus" in message.arrays:  # digest, then revisit
            learn_from_public(ctx, batches, message.arrays["consensus"], config.digest_steps, "digest",
                              lambda own, _, target: distillation_kl(own, target, config.temperature).mean())
        train_on_memory(ctx)
        return Message({"logits": public_answers(ctx.model, batches)}, {"num_examples": len(ctx.state["memory_task"])})


def answer_logits_count(batch) -> int:
    """How many answer positions (answer words and ``<eos>``) a batch has."""
    return int(batch.answer_len.sum())


SPEC = AlgorithmSpec(
    name="feddistill",
    config_cls=FedDistillConfig,
    server_cls=FedDistillServer,
    client_cls=FedDistillClient,
    schemas={
        "train": StageSchema(down=Schema(arrays={"consensus": LOGITS}, optional=frozenset({"consensus"})),
                             up=Schema(arrays={"logits": LOGITS}, scalars={"num_examples": int})),
        "evaluate": VQA_EVALUATE,
    },
    summary="FedDistill (FedMD-style): clients of any size share answer logits on public examples and digest their mean.",
    client_modules=vqa_modules,
    task_kind="vqa",
)
