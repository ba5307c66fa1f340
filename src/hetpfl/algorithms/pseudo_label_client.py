"""The client routine COSMOS and its model-agnostic baselines (COMET, FedCT) share.

Every round a client
  1. DISTILLS the pseudo-labels it received (none in the first round) on the public inputs:
     loss = mean_b[w_b · KL(q_b ‖ f(x_b))] + λ · MSE(softmax f(x), softmax f(x + noise)),
     targets sharpened by the temperature T (``learn.distill``);
  2. TRAINS on its private data (the shared ``train_locally`` routine; ``pretrain_epochs`` in its
     first round, the local pre-training that precedes the clustering);
  3. UPLOADS its predictions on the public inputs (softmax rows; FedCT: their argmax).

The defaults follow the official COSMOS code (methods.md §1.2): 5 distillation epochs, batch 32,
batches taken in order without shuffling and the last short batch dropped, a fresh Adam at every
call with lr 1e-3 (the value in effect in the code), gradient-norm clip 1.0, T = 1, λ = 5, input
noise N(0, 0.05²).

Per-sample weights w_b (``client_weighting``):
  * ``pseudo_label`` (default): w_b = n_i(argmax q_b) / N_U, with n_i the client's own count of
    each class. The code's formula with the public sample's pseudo-label in place of its true label:
    label-blind, and it keeps the code's emphasis on the classes the client holds.
  * ``none``: w_b = 1 (plain batch-mean KL).
  * ``public_labels``: w_b = n_i(y_b) / N_U with y_b the TRUE label of public sample b, as the
    official code does. **This reads public labels (a leak)**: the experiment layer hands them to
    the clients (``ctx.leaked_public_labels``) only when this option is chosen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..configuration import Validated, option
from ..learn import distill, predict_proba
from ..messages import ArrayField, Message, Schema, StageSchema
from .base import PROBS, Client, ClientContext, train_locally

CLIENT_WEIGHTINGS = ("pseudo_label", "none", "public_labels")

LABELS = ArrayField(dtype="int64", shape=("num_public_total",), low=0, below="num_classes")  # class ids, whole public set


@dataclass
class PseudoLabelClientConfig(Validated):
    """Hyperparameters of the shared client routine (the method configs inherit them)."""

    temperature: float = option(1.0, gt=0)  # T on the targets (paper's best; code default); 1 leaves them unchanged
    consistency_weight: float = option(5.0, ge=0)  # λ of the noise-consistency term (paper's best)
    noise_std: float = option(0.05, ge=0)  # std of the Gaussian input noise of the consistency term (code)
    distill_epochs: float = option(5.0, ge=0)  # passes over the public inputs per round (code)
    distill_batch_size: int = option(32, ge=1)  # code (64 for EMNIST/TinyImageNet)
    distill_lr: float = option(1e-3, gt=0)  # Adam lr in effect in the code's client distillation (methods.md 1.4)
    distill_max_grad_norm: float | None = option(1.0, gt=0)  # code clips the gradient norm at 1.0
    distill_shuffle: bool = False  # code: batches in public order (row b*32.. of the targets)
    distill_drop_last: bool = True  # code drops the last short batch
    # pseudo_label | none | public_labels (LEAKS public labels)
    client_weighting: str = option("pseudo_label", choices=CLIENT_WEIGHTINGS)
    pretrain_epochs: float | None = option(None, ge=0)  # private epochs in a client's first round (None: client.local_epochs)

    @property
    def uses_public_labels(self) -> bool:
        """True only for the opt-in ``client_weighting: public_labels`` (the official code's leak):
        then, and only then, the experiment layer hands the true public labels to the clients
        (``ctx.leaked_public_labels``)."""
        return self.client_weighting == "public_labels"


def sample_weights(
    config: PseudoLabelClientConfig, targets: np.ndarray, label_counts: np.ndarray,
    public_labels: np.ndarray | None = None,
) -> np.ndarray | None:
    """The per-public-sample weights w_b of the client's distillation loss (module docstring).
    ``public_labels``: the true labels, needed (and only then given) for ``public_labels``."""
    if config.client_weighting == "none":
        return None
    if config.client_weighting == "pseudo_label":
        classes = np.asarray(targets).argmax(axis=-1)
    else:  # public_labels: the official code's (leaking) weighting
        if public_labels is None:
            raise ValueError(
                "client_weighting=public_labels needs the public labels, which only the experiment layer "
                "hands over (hetpfl.prepare.prepare); they are missing here"
            )
        classes = public_labels
        if len(classes) != len(targets):
            raise ValueError(f"{len(classes)} public labels for {len(targets)} target rows")
    return (np.asarray(label_counts, dtype=np.float64)[classes] / len(targets)).astype(np.float32)


def distill_targets(config: PseudoLabelClientConfig, ctx: ClientContext, targets: np.ndarray) -> dict[str, float]:
    """Step 1 of the routine: distill ``targets`` (rows of probabilities) on the public inputs."""
    optim = dataclasses.replace(ctx.training.optim(config.distill_lr), max_grad_norm=config.distill_max_grad_norm)
    return distill(
        ctx.model,
        ctx.public_inputs,
        targets,
        epochs=config.distill_epochs,
        batch_size=config.distill_batch_size,
        optim=optim,
        generator=ctx.generator("distill"),
        temperature=config.temperature,
        consistency_weight=config.consistency_weight,
        noise_std=config.noise_std,
        sample_weights=sample_weights(config, targets, ctx.label_counts(), ctx.leaked_public_labels),
        shuffle=config.distill_shuffle,
        drop_last=config.distill_drop_last,
    )


class PseudoLabelClient(Client):
    """One stage, ``round``: distill the received targets (if any), train locally, upload."""

    def round(self, message: Message, ctx: ClientContext) -> Message:
        targets = self.targets(message, ctx)
        if targets is not None:
            distill_targets(self.config, ctx, targets)
        first = not ctx.state.get("trained")
        train_locally(ctx, epochs=self.config.pretrain_epochs if first else None)
        ctx.state["trained"] = True
        return self.upload(predict_proba(ctx.model, ctx.public_inputs), ctx)

    def targets(self, message: Message, ctx: ClientContext) -> np.ndarray | None:
        """The (N_U, C) target probabilities in ``message`` (absent in the first round)."""
        return message.arrays.get("targets")

    def upload(self, probs: np.ndarray, ctx: ClientContext) -> Message:
        """What travels up: the soft labels on the public inputs."""
        return Message({"probs": probs})


class HardLabelClient(PseudoLabelClient):
    """The same routine with hard labels both ways (FedCT): int64 class ids instead of rows."""

    def targets(self, message: Message, ctx: ClientContext) -> np.ndarray | None:
        labels = message.arrays.get("labels")
        if labels is None:
            return None
        return np.eye(ctx.num_classes, dtype=np.float32)[labels]

    def upload(self, probs: np.ndarray, ctx: ClientContext) -> Message:
        return Message({"labels": probs.argmax(axis=-1).astype(np.int64)})


# The one stage of COSMOS and COMET: soft targets down (none in a client's first round), soft
# predictions on the public inputs up.
SOFT_LABEL_ROUND = StageSchema(
    down=Schema(arrays={"targets": PROBS}, optional=frozenset({"targets"})),
    up=Schema(arrays={"probs": PROBS}),
)


def cluster_targets(clients: list[int], assignment: np.ndarray, feedback: dict[int, np.ndarray]) -> dict[int, Message]:
    """Each client's downlink: its cluster's targets, or an empty message before it has any."""
    return {c: Message({"targets": feedback[int(assignment[c])]}) if int(assignment[c]) in feedback else Message()
            for c in clients}
