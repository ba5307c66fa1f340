"""HeteroFL (Diao, Ding & Tarokh, ICLR 2021): clients train width sub-models of one global model.

Client k has a width r_k in (0, 1], given by its architecture string (``models.clients:
[cnn_small, cnn_small@0.5, cnn_small@0.25]``, shares by ``models.proportions``): its model is the
server's architecture with every hidden channel/feature count c narrowed to ceil(r_k c) (input
channels and classes never narrow). Every round t:

  SERVER  for each sampled client k: W_k^t = W^t[S_k], where S_k keeps the *leading*
          ceil(r_k C) indices of every hidden dimension of size C (static: the same every round;
          a flattened-map linear layer keeps whole channel blocks), sent as w./b. arrays;
  CLIENT  loads W_k^t into its own model, trains on its private data (the shared routine) with
          the scaler (every hidden conv/linear output divided by r_k), uploads W_k and n_k (its
          sample count);
  SERVER  for every entry j of the full model, over the clients k whose sub-model holds j:
              W_j^{t+1} = Σ_k n_k W_{k,j} / Σ_k n_k
          entries no sampled client held keep W_j^t.

With every client at width 1 each round is exactly FedAvg's (same messages, same float64
arithmetic in client order), so HeteroFL then writes FedAvg's records.

Choices (the paper's code is ``dem123456789/HeteroFL``; Flower's baseline follows it):

* Averaging weight: the sample count n_k, FedAvg's rule, where the code counts each holding client
  once. Its "masked classifier" (each client updates and uploads only the head rows of the labels
  it has) is not used: the head averages like any other entry. Both keep the width-1 case FedAvg.
* BatchNorm: the paper uses static BN (no running statistics while training; statistics
  recomputed on the clients' data before testing). We keep the registry's BatchNorm with running
  statistics and average them per entry like the weights (``num_batches_tracked`` takes the max,
  as in FedAvg): no extra stage or traffic, every model evaluates as built, and width 1 stays
  FedAvg. With the scaler, a narrow client's statistics are those of the rescaled activations,
  i.e. of the full model's scale — the scale the global model sees.
* Scaler (``scaler``, default on, as the code's ``scale: 1``): forward hooks on the client's
  hidden conv/linear layers (not the head), nothing at width 1. The paper's Scaler is the
  identity at inference because the paper evaluates the full model; we also evaluate each
  client's own sub-model, so a client applies its scaler whenever it runs it (training and its
  evaluate stage). Unscaled at inference, a narrow sub-model meets BatchNorm statistics of the
  scaled activations and falls to chance (tests/configs/alg/heterofl.yaml with resnet_small at
  widths 1, 1/2, 1/4: the 1/4 clients' own accuracy 13 % unscaled, 92 % scaled).
* Widths are fixed per client (the code's ``model_split_mode: fix``); its ``dynamic`` mode (a
  width redrawn every round) is not provided.

Reported: each client's own sub-model on its test split (the personalized measure); the server's
full model as ``global`` on every client's test split and on the global test set.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..configuration import Validated
from ..learn import arrays_to_state, state_to_arrays
from ..messages import Message
from ..models import ModuleSpec
from .base import AlgorithmSpec, Client, ClientContext, Comm, Server, ServerSetup, train_locally
from .fedavg import WEIGHTS_ROUND
from .submodels import average_submodels, check_width_clients, client_width, scaled_hidden_outputs, submodel_arrays


@dataclass
class HeteroFLConfig(Validated):
    """HeteroFL's one switch beyond the shared client routine."""

    scaler: bool = True  # divide hidden outputs by the client's width while it trains (paper, code)


class HeteroFLServer(Server):
    """Holds the full-width model; sends each client its sub-model; averages entry by entry."""

    mode = "leading"  # which channels a sub-model keeps (models.width.WIDTH_MODES)
    aggregates = "entries"  # each entry over its holders: the experiment's coordinate-wise rule applies

    def __init__(self, config: HeteroFLConfig, setup: ServerSetup) -> None:
        super().__init__(config, setup)
        # one base architecture for every client (check_run); the server holds it at width 1
        base = ModuleSpec.parse(setup.client_archs[0]).arch
        self.global_model = setup.build_model(base, "global")

    def window_offset(self, rnd: int) -> int:
        """The offset of the channel window in round ``rnd`` (leading channels: none)."""
        return 0

    def round(self, rnd: int, clients: list[int], comm: Comm) -> dict[str, float]:
        full = state_to_arrays(self.global_model)
        offset = self.window_offset(rnd)
        widths = {c: client_width(self.setup.client_archs[c]) for c in clients}
        submodels = {w: submodel_arrays(self.global_model, full, w, self.mode, offset) for w in sorted(set(widths.values()))}
        replies = comm.ask("train", {c: Message(dict(submodels[widths[c]][0])) for c in clients})
        if replies:
            self.aggregate(full, replies, {c: submodels[widths[c]][1] for c in replies})
        return {}

    def aggregate(self, full: dict, replies: dict[int, Message], indices: dict[int, Any]) -> None:
        """W_j ← Σ n_k W_{k,j} / Σ n_k over the clients holding entry j (client-id order), or the
        experiment's median / trimmed mean over them."""
        order = list(replies)
        averaged = average_submodels(full, [replies[c].arrays for c in order], [indices[c] for c in order],
                                     [float(replies[c].scalars["num_examples"]) for c in order], self.setup.aggregation)
        arrays_to_state(self.global_model, averaged)

    def extra_models(self) -> dict[str, dict[int, nn.Module]]:
        return {"global": {c: self.global_model for c in range(self.setup.num_clients)}}

    def test_models(self) -> dict[str, nn.Module]:
        return {"global": self.global_model}


class HeteroFLClient(Client):
    """Loads its sub-model, trains it (with the scaler), sends it back with its sample count."""

    def train(self, message: Message, ctx: ClientContext) -> Message:
        arrays_to_state(ctx.model, message.arrays)
        with self.scaler(ctx):
            train_locally(ctx)
        return Message(state_to_arrays(ctx.model), {"num_examples": len(ctx.train)})

    def evaluate(self, message: Message, ctx: ClientContext) -> Message:
        """The client's own sub-model on its test split, run as it trains (with its scaler)."""
        with self.scaler(ctx):
            return super().evaluate(message, ctx)

    def scaler(self, ctx: ClientContext) -> AbstractContextManager[None]:
        """Hidden outputs divided by the client's width while its model runs (if ``scaler``)."""
        return scaled_hidden_outputs(ctx.model, client_width(ctx.arch) if self.config.scaler else 1.0)


def check_heterofl(config: HeteroFLConfig, run: Any) -> None:
    """Every client narrows one width-capable architecture, at widths in (0, 1]."""
    check_width_clients("heterofl", run.client_archs)


SPEC = AlgorithmSpec(
    name="heterofl",
    config_cls=HeteroFLConfig,
    server_cls=HeteroFLServer,
    client_cls=HeteroFLClient,
    schemas={"train": WEIGHTS_ROUND},  # w./b. arrays of per-client shapes (shape=None fields)
    summary="Width sub-models (leading channels) of one global model, averaged entry by entry.",
    stateful_clients=False,
    check_run=check_heterofl,
)
