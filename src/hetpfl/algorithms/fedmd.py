"""FedMD (Li & Wang, 2019): heterogeneous models agree on a public set through soft labels.

Clients first train on their private data. Every round:
  1. COMMUNICATE  each client computes its class scores (logits) on (a subset of) the public inputs;
  2. AGGREGATE    the server averages the scores into a consensus;
  3. DIGEST       each client trains its scores towards the consensus on those inputs (L1 loss,
                  as the paper's code; ``digest_loss: kl`` distills softmax(consensus / T) instead);
  4. REVISIT      each client trains on its private data for a few epochs.
Only scores travel up and only the consensus travels down. FedMD's first step also trains on a
*labelled* public set; ours has no public labels, so clients pre-train on private data only.
Averaging scores matters under label skew: averaged *probabilities* of specialist clients are
nearly flat (mean top probability 0.18 on 20-client digits, α=0.3) and distilling them erodes
every client, while averaged scores keep the consensus' confidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..configuration import Validated, option
from ..learn import DISTILL_LOSSES, distill, predict_logits
from ..learn.stacked import FitJob, fit_many, predict_many
from ..messages import ArrayField, Message, Schema, StageSchema
from .base import AlgorithmSpec, Client, ClientContext, Comm, Server, stackable, train_locally, train_locally_many
from .robust import combine_rows


@dataclass
class FedMDConfig(Validated):
    pretrain_epochs: float = option(5.0, ge=0)  # private-data epochs before the first upload
    public_per_round: int | None = option(None, ge=1)  # public inputs used per round (None: all of them)
    distill_epochs: float = option(1.0, ge=0)
    distill_lr: float | None = option(None, gt=0)  # None: the client routine's lr
    distill_batch_size: int = option(32, ge=1)
    # l1_logits (the paper's code) | kl (on softmax(consensus / T))
    digest_loss: str = option("l1_logits", choices=DISTILL_LOSSES)
    temperature: float = option(1.0, gt=0)  # only for digest_loss: kl


class FedMDServer(Server):
    aggregates = "rows"  # the consensus: the experiment's aggregation rule over score rows

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        subset = self._public_subset(rnd)
        predictions = comm.ask("communicate", {c: Message({"public_idx": subset}) for c in clients})
        if not predictions:
            return {}
        consensus = combine_rows([m.arrays["scores"] for m in predictions.values()], self.setup.aggregation)
        comm.ask("digest_revisit", {c: Message({"public_idx": subset, "consensus": consensus}) for c in predictions})
        return {"public_used": float(len(subset))}

    def _public_subset(self, rnd: int) -> np.ndarray:
        n = len(self.setup.public_inputs)
        k = self.config.public_per_round
        if k is None or k >= n:
            return np.arange(n, dtype=np.int64)
        return np.sort(self.setup.rng("public", rnd).choice(n, size=k, replace=False)).astype(np.int64)


class FedMDClient(Client):
    def communicate(self, message: Message, ctx: ClientContext) -> Message:
        if not ctx.state.get("pretrained"):
            train_locally(ctx, epochs=self.config.pretrain_epochs)
            ctx.state["pretrained"] = True
        inputs = ctx.public_inputs[message.arrays["public_idx"]]
        return Message({"scores": predict_logits(ctx.model, inputs)})

    def digest_revisit(self, message: Message, ctx: ClientContext) -> Message:
        inputs = ctx.public_inputs[message.arrays["public_idx"]]
        consensus = message.arrays["consensus"]
        if self.config.digest_loss == "kl":
            consensus = softmax(consensus / self.config.temperature)
        distill(
            ctx.model,
            inputs,
            consensus,
            epochs=self.config.distill_epochs,
            batch_size=self.config.distill_batch_size,
            optim=ctx.training.optim(self.config.distill_lr),
            generator=ctx.generator("digest"),
            loss=self.config.digest_loss,
        )
        train_locally(ctx)
        return Message()

    # The batched executor: a group of same-architecture clients, each stage as one stacked model
    # (``learn.stacked``), each client with its own batches, streams and optimizer, as above.

    def communicate_many(self, messages: Mapping[int, Message], ctxs: Mapping[int, ClientContext]
                         ) -> dict[int, Message] | None:
        """``communicate`` for a group at once; None (the group then goes client by client) when its
        models do not stack or the clients are asked about different public inputs."""
        group = list(ctxs.values())
        subsets = {messages[c].arrays["public_idx"].tobytes() for c in ctxs}
        if type(self).communicate is not FedMDClient.communicate or not stackable(group) or len(subsets) != 1:
            return None
        fresh = [ctx for ctx in group if not ctx.state.get("pretrained")]
        if fresh:
            train_locally_many(fresh, epochs=self.config.pretrain_epochs)
            for ctx in fresh:
                ctx.state["pretrained"] = True
        inputs = group[0].public_inputs[next(iter(messages.values())).arrays["public_idx"]]
        scores = predict_many([ctx.model for ctx in group], inputs)
        return {c: Message({"scores": s}) for c, s in zip(ctxs, scores)}

    def digest_revisit_many(self, messages: Mapping[int, Message], ctxs: Mapping[int, ClientContext]
                            ) -> dict[int, Message] | None:
        """``digest_revisit`` for a group at once (None as for :meth:`communicate_many`)."""
        group = list(ctxs.values())
        if type(self).digest_revisit is not FedMDClient.digest_revisit or not stackable(group):
            return None
        jobs = []
        for client, ctx in ctxs.items():
            consensus = messages[client].arrays["consensus"]
            if self.config.digest_loss == "kl":
                consensus = softmax(consensus / self.config.temperature)
            jobs.append(FitJob(ctx.model, ctx.public_inputs[messages[client].arrays["public_idx"]], consensus,
                               ctx.generator("digest"), epochs=self.config.distill_epochs, loss=self.config.digest_loss))
        fit_many(jobs, batch_size=self.config.distill_batch_size, optim=group[0].training.optim(self.config.distill_lr))
        train_locally_many(group)
        return {c: Message() for c in ctxs}


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


PUBLIC_IDX = ArrayField(dtype="int64", shape=("num_public",), low=0, below="num_public_total")
# a network's class scores stay far below 1e6; beyond it a float32 consensus of many clients can overflow
SCORES = ArrayField(dtype="float32", shape=("num_public", "num_classes"), logits=True, magnitude=1e6)

SPEC = AlgorithmSpec(
    name="fedmd",
    config_cls=FedMDConfig,
    server_cls=FedMDServer,
    client_cls=FedMDClient,
    schemas={
        "communicate": StageSchema(down=Schema(arrays={"public_idx": PUBLIC_IDX}), up=Schema(arrays={"scores": SCORES})),
        "digest_revisit": StageSchema(
            down=Schema(arrays={"public_idx": PUBLIC_IDX, "consensus": SCORES}),
            up=Schema(),
        ),
    },
    summary="Clients match the averaged class scores on public inputs, then revisit private data.",
    uses_public=True,
)
