"""Differential privacy for what clients upload: a Gaussian mechanism on everything that leaves them.

The ``privacy`` section of an experiment turns it on (``mechanism: gaussian``). Every client then
releases its upload through the Gaussian mechanism, on the client, before it leaves
(:class:`hetpfl.clienthost.ClientHost`). Each part of an upload is one release of noise multiplier
σ = ``noise_multiplier`` over that part's L2 sensitivity Δ:

* **predictions** (the fields a schema marks ``probabilities`` or ``logits``: COSMOS's soft labels on
  the public set, FedMD's class scores): score rows clipped to L2 norm ``clip``, Δ = √R · 2·``clip``
  for R rows; probability rows need no clipping, Δ = √R · √2 (two points of the simplex lie at most
  √2 apart); noisy probability rows are projected back onto the simplex (negatives cut, rows
  renormalized; an all-zero row becomes uniform).
* **weights** (``w.`` arrays, all of them together: the model a client returns, DP-FedAvg's update
  without a trusted server): the update, reply − what was sent down (a model nothing was sent for,
  such as Mosaic's generator, counts from zero), clipped to L2 norm ``clip_weights``; Δ = 2·``clip_weights``.
  Post-processing: a BatchNorm ``running_var`` is cut at 0.
* **class prototypes** (Mosaic: feature rows with their class ids): which classes a client holds is
  private, so the release has one row per class whatever the data: the mean of the client's rows of
  that class (zeros for a class it lacks), clipped to ``clip``; Δ = √C · 2·``clip``; the class ids
  become 0..C−1 (the paper's k = 10 centres per class become one).
* **class counts** (Mosaic: n_ic): Δ = √2·n for a client of n examples; rounded and cut to [0, n].

**Neighbouring datasets**: a client's *whole* private data replaced by as many other examples, so
the guarantee covers every sample and the client's whole distribution; how many examples a client
holds (``num_examples``, BatchNorm's integer step counters ``b.``) is public under this relation and
travels as it is. Anything else an upload holds (a cluster choice, a generator's label counts...)
would travel in the clear, so such a method is refused at config time, naming the field.

**Accounting**: each part of each upload is one Gaussian release with multiplier σ (several parts
compose like as many releases), with no subsampling credit (whether a client takes part in a round
is not secret). The privacy spent after k releases is ε at ``delta`` from Opacus's RDP accountant
(Mironov 2017; ``hetpfl[privacy]``), never our own arithmetic. The engine counts each client's
releases (:func:`releases_in` of every reply that reached the server), reports the largest ε over
clients every round (``privacy_epsilon``) and each client's in the summary.

This is *local* DP: the server is not trusted, so each client's noise must hide it alone. For weights
that is a large noise (σ·2·``clip_weights`` on every parameter); the reported accuracies say what it
costs. Evaluation replies (accuracy on a client's test split) are a simulation's measurement, not part
of the protocol, and carry no noise. The noise is drawn from the run's seed by default
(``reproducible_noise``), so a simulation gives the same numbers every time; a deployment must set
it false, since whoever knows the seed could subtract the noise.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .algorithms.base import EVALUATE_STAGE
from .configuration import ConfigError, FieldError, Validated, option
from .messages import Message, Schema
from .rng import derive_seed

MECHANISMS = ("none", "gaussian")


@dataclass
class PrivacyOptions(Validated):
    mechanism: str = option("none", choices=MECHANISMS)
    noise_multiplier: float = option(1.0, gt=0)  # σ: the noise's std over the upload's L2 sensitivity
    clip: float = option(1.0, gt=0)  # L2 bound of each uploaded score or prototype row (probability rows need none)
    clip_weights: float = option(1.0, gt=0)  # L2 bound of a weight update (all its arrays together)
    delta: float = option(1e-5, gt=0, lt=1)  # ε is reported at this δ
    reproducible_noise: bool = True  # noise from the run's seed (simulation); false for a deployment

    @property
    def active(self) -> bool:
        return self.mechanism != "none"


def check_privacy(options: PrivacyOptions, schemas: dict, method: str) -> None:
    """Refuse a mechanism for a method that uploads something the mechanism does not cover, or one
    whose accountant is not installed."""
    if not options.active:
        return
    ups = [stage.up for name, stage in schemas.items() if name != EVALUATE_STAGE]
    if not any(_released_parts(up, [*up.arrays, *up.prefix_arrays]) for up in ups):
        raise FieldError("privacy.mechanism", options.mechanism, f"{method} uploads nothing the mechanism protects "
                         f"(predictions, weights, class prototypes or class counts)")
    clear = sorted({f"{name}.{field}" for name, stage in schemas.items() if name != EVALUATE_STAGE
                    for field in _unprotected(stage.up)})
    if clear:  # a guarantee covers everything that leaves a client, or it is no guarantee
        raise FieldError("privacy.mechanism", options.mechanism, f"{method} uploads {', '.join(clear)}, which "
                         f"the mechanism does not cover (it covers predictions, weights, class prototypes and "
                         f"class counts; sample counts are public)")
    try:
        import opacus.accountants.analysis.rdp  # noqa: F401, PLC0415
    except ImportError:
        raise ConfigError("privacy.mechanism='gaussian' needs Opacus's accountant: pip install 'hetpfl[privacy]'") from None


PUBLIC_SCALARS = ("num_examples",)  # public under the neighbouring relation (the module's docstring)
PUBLIC_PREFIXES = ("b.",)  # integer buffers: BatchNorm's step counters, a function of the sample count


def _unprotected(up: Schema) -> list[str]:
    protected = set(up.prediction_fields()) | {n for n, spec in up.arrays.items() if spec.private}
    return ([n for n in up.arrays if n not in protected]
            + [f"{p}*" for p in up.prefix_arrays if p != "w." and p not in PUBLIC_PREFIXES]
            + [n for n in up.scalars if n not in PUBLIC_SCALARS])


def releases_in(reply: Message, up: Schema) -> int:
    """How many Gaussian releases an upload made (one per prediction field, one for the weights, one
    for the prototypes, one for the class counts): what the accountant composes."""
    return len(_released_parts(up, list(reply.arrays)))


def _released_parts(up: Schema, names: list[str]) -> list[str]:
    """The parts of an upload holding the arrays ``names`` that go through the mechanism, each one
    release (a ``w.`` name stands for all the weights; prototype labels travel with the prototypes)."""
    parts = [n for n in up.prediction_fields() if n in names]
    parts += [n for n, spec in up.arrays.items() if spec.private in ("prototypes", "class_counts") and n in names]
    if "w." in up.prefix_arrays and any(n.startswith("w.") for n in names):
        parts.append("w.")
    return parts


def sensitivity(rows: int, probabilities: bool, clip: float) -> float:
    """L2 distance between any two prediction uploads of ``rows`` rows (the module's docstring)."""
    return math.sqrt(rows) * (math.sqrt(2.0) if probabilities else 2.0 * clip)


def privatize(reply: Message, up: Schema, options: PrivacyOptions, *, seed: int, client: int, rnd: int,
              stage: str, sent: Message | None = None, num_classes: int | None = None) -> Message:
    """The client's reply to ``sent`` with every part released through the Gaussian mechanism (the
    module's docstring); ``num_classes`` lays prototypes out one row per class."""
    rng = np.random.default_rng(derive_seed(seed, "privacy", client, rnd, stage) if options.reproducible_noise else None)
    arrays = dict(reply.arrays)
    for name in up.prediction_fields():
        if name in arrays:
            arrays[name] = _release_predictions(arrays[name], up.arrays[name].probabilities, options, rng)
    if "w." in up.prefix_arrays:
        _release_weights(arrays, sent.arrays if sent is not None else {}, options, rng)
    for name, spec in up.arrays.items():
        if name not in arrays or not spec.private:
            continue
        if spec.private == "class_counts":
            n = int(reply.scalars["num_examples"])
            noisy = arrays[name] + rng.normal(0.0, options.noise_multiplier * math.sqrt(2.0) * n, arrays[name].shape)
            arrays[name] = np.clip(np.rint(noisy), 0, n).astype(arrays[name].dtype)
        elif spec.private == "prototypes":
            labels = next(f for f, s in up.arrays.items() if s.private == "prototype_labels")
            arrays[name], arrays[labels] = _release_prototypes(arrays[name], arrays[labels], num_classes, options, rng)
    return Message(arrays, dict(reply.scalars))


def _release_predictions(values: np.ndarray, probabilities: bool, options: PrivacyOptions,
                         rng: np.random.Generator) -> np.ndarray:
    rows = values.astype(np.float64)
    rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows.reshape(1, 1)
    if not probabilities:
        rows = _clip_rows(rows, options.clip)
    std = options.noise_multiplier * sensitivity(len(rows), probabilities, options.clip)
    noisy = rows + rng.normal(0.0, std, size=rows.shape)
    if probabilities:
        noisy = _onto_simplex(noisy)
    return noisy.reshape(values.shape).astype(values.dtype)


def _release_weights(arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray], options: PrivacyOptions,
                     rng: np.random.Generator) -> None:
    names = sorted(n for n in arrays if n.startswith("w."))
    if not names:
        return
    origin = {n: (sent[n].astype(np.float64) if n in sent and sent[n].shape == arrays[n].shape
                  else np.zeros(arrays[n].shape)) for n in names}
    update = np.concatenate([(arrays[n].astype(np.float64) - origin[n]).ravel() for n in names])
    update *= min(1.0, options.clip_weights / max(float(np.linalg.norm(update)), 1e-12))
    update += rng.normal(0.0, options.noise_multiplier * 2.0 * options.clip_weights, update.shape)
    start = 0
    for n in names:
        size = arrays[n].size
        released = origin[n] + update[start: start + size].reshape(arrays[n].shape)
        if n.endswith("running_var"):  # a variance stays a variance (post-processing)
            released = np.clip(released, 0.0, None)
        arrays[n] = released.astype(arrays[n].dtype)
        start += size


def _release_prototypes(rows: np.ndarray, labels: np.ndarray, num_classes: int | None, options: PrivacyOptions,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if num_classes is None:
        raise ValueError("privatize: prototypes need num_classes (one released row per class)")
    means = np.zeros((num_classes, rows.shape[1]))
    for c in range(num_classes):
        mine = rows[labels == c]
        if len(mine):
            means[c] = mine.astype(np.float64).mean(axis=0)
    means = _clip_rows(means, options.clip)
    noisy = means + rng.normal(0.0, options.noise_multiplier * math.sqrt(num_classes) * 2.0 * options.clip, means.shape)
    return noisy.astype(rows.dtype), np.arange(num_classes, dtype=labels.dtype)


def _clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def _onto_simplex(rows: np.ndarray) -> np.ndarray:
    rows = np.clip(rows, 0.0, None)
    sums = rows.sum(axis=1, keepdims=True)
    return np.where(sums > 0, rows / np.where(sums > 0, sums, 1.0), 1.0 / rows.shape[1])


@functools.lru_cache(maxsize=4096)
def epsilon(releases: int, noise_multiplier: float, delta: float) -> float:
    """ε at ``delta`` after ``releases`` Gaussian releases of noise multiplier σ (Opacus's RDP accountant,
    sample rate 1); 0 before any release."""
    if releases == 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # noqa: PLC0415
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # noqa: PLC0415

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=releases, orders=orders)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": ε is huge then, and still an upper bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


__all__ = ["MECHANISMS", "PUBLIC_PREFIXES", "PUBLIC_SCALARS", "PrivacyOptions", "check_privacy", "epsilon", "privatize",
           "releases_in", "sensitivity"]
