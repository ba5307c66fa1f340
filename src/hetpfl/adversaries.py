"""Byzantine clients: a chosen share of the federation attacks, so robust rules can be measured.

The ``adversaries`` section of an experiment picks the attack and the share of clients that run it.
Which clients attack is drawn from the seed (:func:`choose_adversaries`); the summary names them,
and every per-client figure is also reported over the honest clients alone (``honest_*``).

An attack lives on the attacking client — its data (``label_flip``) or what it uploads (the rest),
applied by :class:`hetpfl.clienthost.ClientHost` after the honest stage — so it behaves the same in
the simulator and on Flower, and the server learns of it only through what arrives.

* ``label_flip``: the client trains on labels y → C − 1 − y (its test split stays true).
* ``random_soft_labels``: each uploaded prediction row is random — probabilities drawn from a flat
  Dirichlet, or scores drawn uniformly between the honest matrix's smallest and largest value.
* ``inverted_soft_labels``: the ranking is reversed — probabilities p → (1 − p) / (C − 1), scores
  s → −s — so the client's most likely class becomes its least likely one.
* ``constant_soft_labels``: every row names ``constant_class`` — a one-hot probability row, or
  scores at the matrix's maximum for that class and its minimum elsewhere.
* ``scaled_update`` / ``sign_flipped_update``: a returned weight array w becomes w₀ + s·(w − w₀) or
  w₀ − s·(w − w₀), w₀ the array the server sent, s = ``scale`` (Blanchard et al. 2017; Baruch et al.
  2019 use such boosted updates).

Soft-label attacks change the arrays a method's upload schema marks as predictions
(``ArrayField.probabilities`` or ``ArrayField.logits``); update attacks change the weights a schema
with ``returns_sent`` sends down and gets back. A method that uploads neither cannot be attacked
that way, and the config says so before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .configuration import FieldError, Validated, option
from .messages import Message, Schema
from .rng import derive_seed

DATA_ATTACKS = ("label_flip",)
SOFT_LABEL_ATTACKS = ("random_soft_labels", "inverted_soft_labels", "constant_soft_labels")
UPDATE_ATTACKS = ("scaled_update", "sign_flipped_update")
ATTACKS = ("none", *DATA_ATTACKS, *SOFT_LABEL_ATTACKS, *UPDATE_ATTACKS)


@dataclass
class AdversaryOptions(Validated):
    attack: str = option("none", choices=ATTACKS)
    fraction: float = option(0.0, ge=0, lt=1)  # share of the clients that attack (rounded to the nearest count)
    scale: float = option(10.0, gt=0)  # scaled_update / sign_flipped_update: the update's multiplier
    constant_class: int = option(0, ge=0)  # constant_soft_labels: the class every row names

    @property
    def active(self) -> bool:
        return self.attack != "none" and self.fraction > 0


def choose_adversaries(num_clients: int, options: AdversaryOptions, seed: int) -> tuple[int, ...]:
    """The attacking clients: round(fraction × n) of them, drawn from the seed (sorted ids)."""
    if not options.active:
        return ()
    count = int(round(options.fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, "adversaries"))
    return tuple(sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False)))


def check_attack(options: AdversaryOptions, schemas: dict, task_kind: str, method: str) -> None:
    """Refuse an attack the method gives no way in for (FieldError naming ``adversaries.attack``)."""
    meets = available_attacks(schemas, task_kind)
    if not options.active or options.attack in meets:
        return
    attack = options.attack
    reason = (f"flips class labels; {method} learns {task_kind} data" if attack in DATA_ATTACKS else
              f"{method} uploads no soft labels" if attack in SOFT_LABEL_ATTACKS else
              f"{method} returns no weights it was sent")
    raise FieldError("adversaries.attack", attack, f"{reason} (attacks it can meet: {', '.join(meets) or 'none'})")


def available_attacks(schemas: dict, task_kind: str) -> list[str]:
    """The attacks a method's uploads give a way in for (its stages' upload schemas)."""
    ups = [stage.up for stage in schemas.values()]
    out = list(DATA_ATTACKS) if task_kind == "classification" else []
    if any(up.prediction_fields() for up in ups):
        out += SOFT_LABEL_ATTACKS
    if any(up.returns_sent for up in ups):
        out += UPDATE_ATTACKS
    return out


def flip_labels(dataset, num_classes: int):
    """A copy of an ``ArrayDataset`` whose labels are y → C − 1 − y."""
    return replace(dataset, y=(num_classes - 1 - dataset.y).astype(np.int64))


def tamper(reply: Message, sent: Message, up: Schema, options: AdversaryOptions, *, seed: int, client: int,
           rnd: int, stage: str) -> Message:
    """What an attacking client uploads instead of its honest ``reply`` to ``sent``."""
    arrays = dict(reply.arrays)
    if options.attack in SOFT_LABEL_ATTACKS:
        rng = np.random.default_rng(derive_seed(seed, "attack", client, rnd, stage))
        for name in up.prediction_fields():
            if name in arrays:
                arrays[name] = _soft_label_attack(arrays[name], up.arrays[name].probabilities, options, rng)
    elif options.attack in UPDATE_ATTACKS and up.returns_sent:
        factor = options.scale if options.attack == "scaled_update" else -options.scale
        for name, value in arrays.items():
            origin = sent.arrays.get(name)
            if origin is not None and origin.shape == value.shape and np.issubdtype(value.dtype, np.floating):
                moved = origin.astype(np.float64) + factor * (value.astype(np.float64) - origin.astype(np.float64))
                arrays[name] = moved.astype(value.dtype)
    return Message(arrays, dict(reply.scalars))


def _soft_label_attack(rows: np.ndarray, probabilities: bool, options: AdversaryOptions,
                       rng: np.random.Generator) -> np.ndarray:
    shape, dtype = rows.shape, rows.dtype
    classes = shape[-1]
    attack = options.attack
    if attack == "random_soft_labels":
        if probabilities:
            out = rng.dirichlet(np.ones(classes), size=shape[:-1])
        else:
            out = rng.uniform(float(rows.min()), float(rows.max()), size=shape)
    elif attack == "inverted_soft_labels":
        out = (1.0 - rows.astype(np.float64)) / max(classes - 1, 1) if probabilities else -rows.astype(np.float64)
    else:  # constant_soft_labels
        hot = np.zeros(shape, dtype=bool)
        hot[..., options.constant_class] = True  # prepare checked it is below the class count
        out = hot.astype(np.float64) if probabilities else np.where(hot, float(rows.max()), float(rows.min()))
    return out.astype(dtype)


__all__ = ["ATTACKS", "DATA_ATTACKS", "SOFT_LABEL_ATTACKS", "UPDATE_ATTACKS", "AdversaryOptions", "available_attacks",
           "check_attack", "choose_adversaries", "flip_labels", "tamper"]
