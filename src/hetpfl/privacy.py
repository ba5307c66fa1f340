"""Differential privacy for what clients upload: a Gaussian mechanism on their predictions.

The ``privacy`` section of an experiment turns it on (``mechanism: gaussian``). Every client then
releases its prediction matrices (the fields an upload schema marks ``probabilities`` or
``logits``: COSMOS's soft labels on the public set, FedMD's class scores) through the Gaussian
mechanism, on the client, before they leave it (:class:`hetpfl.clienthost.ClientHost`):

1. **Bound**: score rows are clipped to L2 norm ``clip``; probability rows need no clipping.
2. **Sensitivity** (client level: the neighbouring dataset replaces *all* of the client's private
   data, so the guarantee covers every sample and the client's whole distribution): two possible
   uploads of R rows differ by at most Δ = √R · 2·``clip`` for scores, √R · √2 for probability rows
   (two points of the simplex lie at most √2 apart).
3. **Noise**: N(0, (σ·Δ)²) on every entry, σ = ``noise_multiplier``.
4. **Post-processing** (free under DP): probability rows are projected back onto the simplex
   (negatives cut, rows renormalized; an all-zero row becomes uniform), so replies stay valid.

**Accounting**: each upload of a client is one release of a Gaussian mechanism with noise
multiplier σ, with no subsampling credit (whether a client takes part in a round is not secret).
The privacy spent after k releases is ε at ``delta`` from Opacus's RDP accountant (Mironov 2017;
``hetpfl[privacy]``), never our own arithmetic. The engine counts each client's releases (every
reply that reached the server from a stage whose upload holds predictions), reports the largest ε
over clients every round (``privacy_epsilon``) and each client's in the summary.

A guarantee must cover everything that leaves a client, so a method whose uploads hold anything
besides predictions (weights, sample counts, class prototypes beside weights as in Mosaic) is refused
at config time, naming what would travel in the clear; COSMOS, COMET and FedMD upload predictions
only. Evaluation replies (accuracy on a client's test split) are a simulation's measurement, not part
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
    clip: float = option(1.0, gt=0)  # L2 bound of each uploaded score row (probability rows need none)
    delta: float = option(1e-5, gt=0, lt=1)  # ε is reported at this δ
    reproducible_noise: bool = True  # noise from the run's seed (simulation); false for a deployment

    @property
    def active(self) -> bool:
        return self.mechanism != "none"


def check_privacy(options: PrivacyOptions, schemas: dict, method: str) -> None:
    """Refuse a mechanism the method has nothing for, or one whose accountant is not installed."""
    if not options.active:
        return
    if not any(stage.up.prediction_fields() for stage in schemas.values()):
        raise FieldError("privacy.mechanism", options.mechanism, f"{method} uploads no predictions to protect "
                         f"(the mechanism covers soft labels and class scores: e.g. cosmos, fedmd)")
    clear = sorted({f"{name}.{field}" for name, stage in schemas.items() if name != EVALUATE_STAGE
                    for field in _unprotected(stage.up)})
    if clear:  # a guarantee covers everything that leaves a client, or it is no guarantee
        raise FieldError("privacy.mechanism", options.mechanism, f"{method} also uploads {', '.join(clear)}, which "
                         f"the mechanism does not cover (it protects predictions only)")
    try:
        import opacus.accountants.analysis.rdp  # noqa: F401, PLC0415
    except ImportError:
        raise ConfigError("privacy.mechanism='gaussian' needs Opacus's accountant: pip install 'hetpfl[privacy]'") from None


def _unprotected(up: Schema) -> list[str]:
    protected = set(up.prediction_fields())
    return ([n for n in up.arrays if n not in protected] + [f"{p}*" for p in up.prefix_arrays] + list(up.scalars))


def sensitivity(rows: int, probabilities: bool, clip: float) -> float:
    """L2 distance between any two uploads of ``rows`` rows (see the module's step 2)."""
    return math.sqrt(rows) * (math.sqrt(2.0) if probabilities else 2.0 * clip)


def privatize(reply: Message, up: Schema, options: PrivacyOptions, *, seed: int, client: int, rnd: int,
              stage: str) -> Message:
    """The client's reply with every prediction field released through the Gaussian mechanism."""
    fields = up.prediction_fields()
    if not fields:
        return reply
    rng = np.random.default_rng(derive_seed(seed, "privacy", client, rnd, stage) if options.reproducible_noise else None)
    arrays = dict(reply.arrays)
    for name in fields:
        if name not in arrays:
            continue
        values = arrays[name].astype(np.float64)
        rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
        probabilities = up.arrays[name].probabilities
        if not probabilities:
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows * np.minimum(1.0, options.clip / np.maximum(norms, 1e-12))
        std = options.noise_multiplier * sensitivity(len(rows), probabilities, options.clip)
        noisy = rows + rng.normal(0.0, std, size=rows.shape)
        if probabilities:
            noisy = _onto_simplex(noisy)
        arrays[name] = noisy.reshape(values.shape).astype(arrays[name].dtype)
    return Message(arrays, dict(reply.scalars))


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


__all__ = ["MECHANISMS", "PrivacyOptions", "check_privacy", "epsilon", "privatize", "sensitivity"]
