"""FedMKT (Fan et al., "FedMKT: Federated Mutual Knowledge Transfer for Large and Small Language
Models", 2024) on LoRA clients of different sizes: models learn from the *other* sizes' answers on
public examples, keeping only the knowledge that is better than their own.

Every round t:
  SERVER  sends each client the teacher logits on the public examples: the mean, over the other
          architectures, of each architecture's mean logits from the last round (a run with one
          architecture: its own mean); nothing in the first round;
  CLIENT  transfer: ``transfer_steps`` steps on the public examples of CE(answer) + KL(teacher ‖ own)
          on the answer positions where the teacher's cross-entropy on the answer is lower than its
          own (the paper's selective transfer, "dual minimum cross-entropy"), its local adapter only;
          then the shared routine on its memory; uploads its answer logits on the public examples;
  SERVER  per architecture, the mean of its clients' logits.

Choices: FedMKT's setting is one large server model and small client models; FedMosaic compares it
among clients of different sizes, which is what this does (the mutual transfer is between
architectures). HetVQA's models share one vocabulary, so the paper's token alignment (minimum edit
distance between tokenizers) is the identity. The public examples are the generic mix (with their
answers, as FedMKT's public data is labelled); selection is per answer position; KL at T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..configuration import Validated, option
from ..messages import Message, Schema, StageSchema
from .base import AlgorithmSpec, ClientContext, Comm, Server
from .feddistill import LOGITS, learn_from_public, public_answers, public_batches
from .vqa import VQA_EVALUATE, VQAClient, train_on_memory, vqa_modules


@dataclass
class FedMKTConfig(Validated):
    public_examples: int = option(10, ge=1)  # public examples per pretraining template and source
    transfer_steps: int = option(10, ge=0)  # selective distillation steps each round


class FedMKTServer(Server):
    def __init__(self, config: FedMKTConfig, setup) -> None:
        super().__init__(config, setup)
        self.by_arch: dict[str, np.ndarray] = {}  # architecture -> its clients' mean logits (last round)

    def teacher(self, arch: str) -> np.ndarray | None:
        """The mean of the other architectures' logits (one architecture in the run: its own)."""
        others = [v for a, v in sorted(self.by_arch.items()) if a != arch]
        if not others and arch in self.by_arch:
            others = [self.by_arch[arch]]
        return np.mean(others, axis=0).astype(np.float32) if others else None

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        archs = self.setup.client_archs
        messages = {}
        for c in clients:
            teacher = self.teacher(archs[c])
            messages[c] = Message({"teacher": teacher} if teacher is not None else {})
        replies = comm.ask("train", messages)
        for arch in sorted({archs[c] for c in replies}):
            self.by_arch[arch] = np.mean([replies[c].arrays["logits"] for c in sorted(replies) if archs[c] == arch],
                                         axis=0).astype(np.float32)
        return {}


def selective_transfer_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """CE on the answers, plus KL(teacher ‖ student) where the teacher's CE is below the student's."""
    own = F.cross_entropy(logits, targets, reduction="none")
    better = F.cross_entropy(teacher, targets, reduction="none") < own.detach()
    kl = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(logits, -1))).sum(-1)
    return own.mean() + (kl * better).sum() / max(1, int(better.sum()))


class FedMKTClient(VQAClient):
    def train(self, message: Message, ctx: ClientContext) -> Message:
        config = self.config
        batches = public_batches(ctx, config.public_examples, ctx.training.batch_size)
        if "teacher" in message.arrays:
            learn_from_public(ctx, batches, message.arrays["teacher"], config.transfer_steps, "transfer",
                              selective_transfer_loss)
        train_on_memory(ctx)
        return Message({"logits": public_answers(ctx.model, batches)}, {"num_examples": len(ctx.state["memory_task"])})


SPEC = AlgorithmSpec(
    name="fedmkt",
    config_cls=FedMKTConfig,
    server_cls=FedMKTServer,
    client_cls=FedMKTClient,
    schemas={
        "train": StageSchema(down=Schema(arrays={"teacher": LOGITS}, optional=frozenset({"teacher"})),
                             up=Schema(arrays={"logits": LOGITS}, scalars={"num_examples": int})),
        "evaluate": VQA_EVALUATE,
    },
    summary="FedMKT: clients learn selectively from the other model sizes' answer logits on public examples.",
    client_modules=vqa_modules,
    task_kind="vqa",
)
