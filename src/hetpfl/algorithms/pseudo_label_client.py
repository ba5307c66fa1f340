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
    the config (``attach_public_labels``) only when this option is chosen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..learn import distill, predict_proba
from ..messages import ArrayField, Message, Schema, StageSchema
from .base import PROBS, Client, ClientContext, train_locally

CLIENT_WEIGHTINGS = ("pseudo_label", "none", "public_labels")

LABELS = ArrayField(dtype="int64", shape=("num_public",))


@dataclass
class PseudoLabelClientConfig:
    """Hyperparameters of the shared client routine (the method configs inherit them)."""

    temperature: float = 1.0  # T on the targets (paper's best; code default); 1 leaves them unchanged
    consistency_weight: float = 5.0  # λ of the noise-consistency term (paper's best)
    noise_std: float = 0.05  # std of the Gaussian input noise of the consistency term (code)
    distill_epochs: float = 5.0  # passes over the public inputs per round (code)
    distill_batch_size: int = 32  # code (64 for EMNIST/TinyImageNet)
    distill_lr: float = 1e-3  # Adam lr in effect in the code's client distillation (methods.md 1.4)
    distill_max_grad_norm: float | None = 1.0  # code clips the gradient norm at 1.0
    distill_shuffle: bool = False  # code: batches in public order (row b*32.. of the targets)
    distill_drop_last: bool = True  # code drops the last short batch
    client_weighting: str = "pseudo_label"  # pseudo_label | none | public_labels (LEAKS public labels)
    pretrain_epochs: float | None = None  # private epochs in a client's first round (None: client.local_epochs)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight={self.consistency_weight}: must be >= 0")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std}: must be >= 0")
        if self.distill_epochs < 0:
            raise ValueError(f"distill_epochs={self.distill_epochs}: must be >= 0")
        if self.distill_batch_size < 1:
            raise ValueError(f"distill_batch_size={self.distill_batch_size}: must be >= 1")
        if self.distill_lr <= 0:
            raise ValueError(f"distill_lr={self.distill_lr}: must be > 0")
        if self.distill_max_grad_norm is not None and self.distill_max_grad_norm <= 0:
            raise ValueError(f"distill_max_grad_norm={self.distill_max_grad_norm}: must be > 0 or null")
        if self.pretrain_epochs is not None and self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs={self.pretrain_epochs}: must be >= 0 or null")
        if self.client_weighting not in CLIENT_WEIGHTINGS:
            raise ValueError(
                f"client_weighting={self.client_weighting!r}: expected one of {', '.join(CLIENT_WEIGHTINGS)}"
            )
        self._public_labels: np.ndarray | None = None  # not a field: never in a config file

    @property
    def uses_public_labels(self) -> bool:
        """True only for the opt-in ``client_weighting: public_labels`` (the official code's leak)."""
        return self.client_weighting == "public_labels"

    def attach_public_labels(self, labels: np.ndarray) -> None:
        """Called by the experiment layer, and only when :attr:`uses_public_labels`."""
        if not self.uses_public_labels:
            raise ValueError("public labels are attached only with client_weighting=public_labels")
        labels = np.array(labels, dtype=np.int64, copy=True)
        labels.flags.writeable = False
        self._public_labels = labels


def sample_weights(
    config: PseudoLabelClientConfig, targets: np.ndarray, label_counts: np.ndarray
) -> np.ndarray | None:
    """The per-public-sample weights w_b of the client's distillation loss (module docstring)."""
    if config.client_weighting == "none":
        return None
    if config.client_weighting == "pseudo_label":
        classes = np.asarray(targets).argmax(axis=-1)
    else:  # public_labels: the official code's (leaking) weighting
        if config._public_labels is None:
            raise ValueError(
                "client_weighting=public_labels needs the public labels, which only the experiment layer "
                "attaches (hetpfl.experiment.prepare); they are missing here"
            )
        classes = config._public_labels
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
        sample_weights=sample_weights(config, targets, ctx.label_counts()),
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
