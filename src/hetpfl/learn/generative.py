"""Generator training and distillation on generated samples: thin uses of the one loop.

- :func:`train_gan`: a client's unconditional GAN with optional terms on a frozen classifier
  (Mosaic's local generators);
- :func:`train_generator_against`: the server's data-free generator step, maximizing teacher–student
  disagreement (DENSE, FedFTG, DFRD);
- :func:`distill_on_generated`: a teacher distilled into a student on samples of one or several
  generators (Mosaic's KD step; DENSE's, FedFTG's and DFRD's student step);
- :func:`distill_on_inputs`: fixed inputs with their teacher logits (DENSE's pool, a public set);
- :func:`adversarial_distillation`: the last two alternating in one loop (one optimizer each, kept
  across steps), the schedule of FedFTG and DFRD.

Every random number (shuffles, latent codes, labels) comes from the ``stream`` passed in. Teachers,
frozen classifiers and generators that only sample are put in eval mode and never updated: their
parameters take no optimizer step (gradients flow through them to what trains, and are computed for
the trained parameters only) and, in eval mode, their BatchNorm running statistics stay as they were.
Modules stay in the modes the last objective set. Each returns the mean loss of each objective under
its name, and ``steps``, like :func:`~hetpfl.learn.supervised.fit`.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batches import IndexBatches, SampledBatches
from .loop import Objective, optimize
from .losses import (
    DISAGREEMENTS,
    bn_statistics_matching,
    class_diversity,
    disagreement,
    distillation_kl,
    gan_discriminator_loss,
    gan_generator_loss,
    l1_to_logits,
    mosaic_distillation,
    noise_diversity,
    prediction_entropy,
)
from .options import OptimOptions
from .tensors import as_input_tensor

__all__ = [
    "GENERATED_DISTILL_LOSSES",
    "LogitEnsemble",
    "adversarial_distillation",
    "distill_on_generated",
    "distill_on_inputs",
    "train_gan",
    "train_generator_against",
]

#: Named losses of :func:`distill_on_generated` (a callable is accepted too).
GENERATED_DISTILL_LOSSES = ("mosaic", "kl", "l1_logits")

DistillLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LogitEnsemble(nn.Module):
    """A teacher made of classifiers: ``Σ_m w_m ⊙ model_m(x)`` on logits.

    ``weights``: None (the mean, DENSE's ``Ensemble_A``), one weight per model ``(M,)``, or one per
    model and class ``(M, C)`` (FedFTG's and DFRD's class-level ensemble, w[m, c] ∝ client m's count
    of class c, each column summing to 1). Its members are submodules, so ``eval()`` reaches them."""

    def __init__(self, models: Sequence[nn.Module], weights: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        if not models:
            raise ValueError("LogitEnsemble needs at least one model")
        self.members = nn.ModuleList(models)
        w = torch.full((len(models), 1), 1.0 / len(models)) if weights is None else torch.as_tensor(
            np.asarray(weights, dtype=np.float32))
        if w.dim() == 1:
            w = w[:, None]
        if w.dim() != 2 or w.shape[0] != len(models):
            raise ValueError(f"LogitEnsemble: weights must have shape ({len(models)},) or ({len(models)}, C), "
                             f"got {tuple(w.shape)}")
        self.register_buffer("weights", w.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for w, model in zip(self.weights, self.members):
            term = model(x) * w.to(x.device)
            total = term if total is None else total + term
        return total


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _check_weights(**weights: float) -> None:
    for name, value in weights.items():
        if not value >= 0:
            raise ValueError(f"{name}={value} must be >= 0 (0 turns the term off)")


def _device(module: nn.Module) -> torch.device:
    ref = next(module.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def _label_sampler(num_classes: int, label_probs: np.ndarray | None, stream: torch.Generator | None
                   ) -> Callable[[int, torch.device], torch.Tensor]:
    """Labels drawn from ``stream``: i.i.d. from ``label_probs`` (default uniform over the classes;
    FedFTG's and DFRD's label sampling pass the clients' class counts, normalized here)."""
    where = stream.device if stream is not None else torch.device("cpu")
    if label_probs is None:
        probs = torch.full((num_classes,), 1.0 / num_classes, device=where)
    else:
        arr = np.asarray(label_probs, dtype=np.float64)
        if arr.shape != (num_classes,) or not (arr >= 0).all() or arr.sum() <= 0:
            raise ValueError(f"label_probs must be {num_classes} non-negative numbers with a positive sum, "
                             f"got shape {arr.shape}")
        probs = torch.as_tensor(arr / arr.sum(), dtype=torch.float32, device=where)

    def draw(n: int, device: torch.device) -> torch.Tensor:
        return torch.multinomial(probs, n, replacement=True, generator=stream).to(device)

    return draw


def _generate(generator: nn.Module, n: int, stream: torch.Generator | None,
              labels: Callable[[int, torch.device], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latent codes (then labels, for a conditional generator) drawn from ``stream``, in that order."""
    z = generator.draw_latent(n, stream)
    y = labels(n, z.device) if labels is not None else None
    return z, y


def _distill_loss(loss: str | DistillLoss, temperature: float, kl_weight: float, ce_weight: float,
                  js_weight: float) -> DistillLoss:
    if callable(loss):
        return loss
    if loss == "mosaic":
        return lambda s, t: mosaic_distillation(s, t, temperature=temperature, kl_weight=kl_weight,
                                                ce_weight=ce_weight, js_weight=js_weight)
    if loss == "kl":
        return lambda s, t: distillation_kl(s, t, temperature)
    if loss == "l1_logits":
        return l1_to_logits
    raise ValueError(f"distillation loss={loss!r} is not supported (allowed: {', '.join(GENERATED_DISTILL_LOSSES)}, "
                     f"or a callable(student_logits, teacher_logits))")


def _mean(value: torch.Tensor) -> torch.Tensor:
    return value.mean() if value.dim() > 0 else value


# ------------------------------------------------------------------------------------------
# Mosaic's client-side GAN
# ------------------------------------------------------------------------------------------


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    x: np.ndarray,
    *,
    epochs: float = 1.0,
    steps: int | None = None,
    batch_size: int = 64,
    optim: OptimOptions = OptimOptions(lr=2e-4),
    discriminator_optim: OptimOptions | None = None,
    stream: torch.Generator | None = None,
    classifier: nn.Module | None = None,
    diversity_weight: float = 0.0,
    entropy_weight: float = 0.0,
    inversion_weight: float = 0.0,
) -> dict[str, float]:
    """Train an unconditional ``generator`` against ``discriminator`` on real inputs ``x`` (Mosaic's
    local generators, ``degan.py``): per batch of real inputs (``epochs`` passes, or ``steps``
    batches), with z ~ N(0, I) of the same batch size,

    1. discriminator step: :func:`~.losses.gan_discriminator_loss` (BCE(D(x), 1) + BCE(D(G(z)), 0));
    2. generator step on the same G(z): :func:`~.losses.gan_generator_loss` (BCE(D(G(z)), 1)) +
       ``diversity_weight`` · :func:`~.losses.class_diversity` + ``entropy_weight`` · mean
       :func:`~.losses.prediction_entropy` of the frozen ``classifier``'s logits on G(z) +
       ``inversion_weight`` · :func:`~.losses.bn_statistics_matching` on that classifier.

    A weight of 0 leaves its term out (not computed; with all three 0 the classifier is never run).
    Mosaic's code: Adam 2e-4 (with β₁ = 0.5, which ``OptimOptions`` does not expose: Adam's default
    β₁ = 0.9 here), batch 64, 200 epochs, ``diversity_weight=5``, ``entropy_weight=0``, inversion off.
    The generator and discriminator train (BN in train mode in both steps, as DCGAN); the classifier
    is in eval mode and unchanged. ``discriminator_optim`` defaults to ``optim``. Returns
    ``{"discriminator", "generator", "steps"}``.
    """
    _check_weights(diversity_weight=diversity_weight, entropy_weight=entropy_weight,
                   inversion_weight=inversion_weight)
    uses_classifier = bool(diversity_weight or entropy_weight or inversion_weight)
    if uses_classifier and classifier is None:
        raise ValueError("train_gan: diversity, entropy and inversion terms need a classifier")
    if getattr(generator, "conditional", False):
        raise ValueError("train_gan trains an unconditional generator (build it with conditional=False)")
    xt = as_input_tensor(x)
    if tuple(xt.shape[1:]) != tuple(generator.output_shape):
        raise ValueError(f"train_gan: inputs of shape {tuple(xt.shape[1:])}, but the generator makes "
                         f"{tuple(generator.output_shape)}")
    device = _device(generator)
    real = IndexBatches(len(xt), batch_size, epochs=epochs, steps=steps, generator=stream)
    order = iter(real)

    def draw(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = next(order)
        return xt[idx].to(device), generator.draw_latent(len(idx), stream)

    cache: dict[str, Any] = {}
    frozen = (classifier,) if classifier is not None else ()

    def discriminator_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        real_x, z = batch
        fake = generator(z)
        cache.clear()
        cache.update(batch=batch, fake=fake)  # its graph to the generator serves the generator step
        return gan_discriminator_loss(discriminator(real_x), discriminator(fake.detach()))

    def generator_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        fake = cache["fake"] if cache.get("batch") is batch else generator(batch[1])
        cache.clear()
        total = _mean(gan_generator_loss(discriminator(fake)))
        if uses_classifier:
            if inversion_weight:
                logits, matching = bn_statistics_matching(classifier, fake)
                total = total + inversion_weight * matching
            else:
                logits = classifier(fake)
            if diversity_weight:
                total = total + diversity_weight * class_diversity(logits)
            if entropy_weight:
                total = total + entropy_weight * prediction_entropy(logits).mean()
        return total

    objectives = [
        Objective(discriminator_loss, discriminator, discriminator_optim or optim,
                  train=(discriminator, generator), eval=frozen, name="discriminator"),
        Objective(generator_loss, generator, optim, train=(generator, discriminator), eval=frozen,
                  name="generator"),
    ]
    return optimize(objectives, SampledBatches(draw, len(real)))


# ------------------------------------------------------------------------------------------
# The server's data-free steps (DENSE, FedFTG, DFRD; Mosaic's distillation)
# ------------------------------------------------------------------------------------------


def _generator_objective(generator: nn.Module, teacher: nn.Module, student: nn.Module, *, optim: OptimOptions,
                         adversarial_weight: float, kind: str, temperature: float, only_disagreeing: bool,
                         bn_weight: float, ce_weight: float, diversity_weight: float, repeats: int = 1,
                         name: str = "loss") -> Objective:
    _check_weights(adversarial_weight=adversarial_weight, bn_weight=bn_weight, ce_weight=ce_weight,
                   diversity_weight=diversity_weight)
    if kind not in DISAGREEMENTS:
        raise ValueError(f"disagreement kind={kind!r} is not supported (allowed: {', '.join(DISAGREEMENTS)})")
    if not (adversarial_weight or bn_weight or ce_weight or diversity_weight):
        raise ValueError("the generator objective needs at least one term with a positive weight")
    conditional = bool(getattr(generator, "conditional", False))

    def loss(batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        z, y = batch
        x = generator(z, y) if conditional else generator(z)
        if bn_weight:
            t, matching = bn_statistics_matching(teacher, x)
        else:
            t, matching = teacher(x), None
        total = x.new_zeros(())
        if adversarial_weight:
            d = disagreement(student(x), t, kind=kind, temperature=temperature, only_disagreeing=only_disagreeing)
            total = total - adversarial_weight * d.mean()
        if matching is not None:
            total = total + bn_weight * matching
        if ce_weight:
            total = total + ce_weight * F.cross_entropy(t, y)
        if diversity_weight:
            total = total + diversity_weight * noise_diversity(z, x)
        return total

    return Objective(loss, generator, optim, train=(generator,), eval=(teacher, student), repeats=repeats, name=name)


def _generator_batches(generator: nn.Module, num_classes: int, *, steps: int, batch_size: int,
                       stream: torch.Generator | None, label_probs: np.ndarray | None, needs_labels: bool
                       ) -> SampledBatches:
    labels = _label_sampler(num_classes, label_probs, stream) if needs_labels else None
    return SampledBatches(lambda _step: _generate(generator, batch_size, stream, labels), steps)


def _num_classes(generator: nn.Module, teacher_logits_dim: int | None = None) -> int:
    n = getattr(generator, "num_classes", None)
    if n is None:
        if teacher_logits_dim is None:
            raise ValueError("the generator has no num_classes; build it with models.build_model")
        return teacher_logits_dim
    return int(n)


def train_generator_against(
    generator: nn.Module,
    teacher: nn.Module,
    student: nn.Module,
    *,
    steps: int,
    batch_size: int = 64,
    optim: OptimOptions = OptimOptions(lr=1e-3),
    stream: torch.Generator | None = None,
    adversarial_weight: float = 1.0,
    kind: str = "kl",
    temperature: float = 1.0,
    only_disagreeing: bool = False,
    bn_weight: float = 0.0,
    ce_weight: float = 0.0,
    diversity_weight: float = 0.0,
    label_probs: np.ndarray | None = None,
    fixed_codes: bool = False,
) -> dict[str, Any]:
    """The server's data-free generator step: ``steps`` updates of ``generator`` on batches of
    ``batch_size`` codes z (and labels y ~ ``label_probs``, uniform by default, for a conditional
    generator or a CE term), minimizing

        −adversarial_weight · mean disagreement(student(x), teacher(x))   (:func:`~.losses.disagreement`)
        + bn_weight · BN matching on the teacher   (:func:`~.losses.bn_statistics_matching`)
        + ce_weight · CE(teacher(x), y)   + diversity_weight · :func:`~.losses.noise_diversity`(z, x),

    x = G(z[, y]). ``kind``/``temperature``/``only_disagreeing`` choose the disagreement form. The
    baselines: DENSE: KL with ``only_disagreeing=True``, BN matching (its ``bn``) and CE on random
    targets (its ``oh``) on an unconditional generator; FedFTG: conditional, CE (fidelity) +
    KL disagreement + diversity, labels from the clients' class counts; DFRD: conditional, the same
    terms with ``only_disagreeing=True``. The teacher (e.g. a :class:`LogitEnsemble`) and the student
    are in eval mode and unchanged; only the generator trains. Returns ``{"loss", "steps"}``.

    ``fixed_codes``: one batch of codes (and targets) is drawn once and learned together with the
    generator (same optimizer) for all ``steps`` — DENSE's synthesis, which inverts the teacher on a
    batch: with an unconditional generator and CE on random targets, only fixed codes tie each
    target to a code. The result then adds ``"codes"``: the learned ``(z, y)``, to pool ``G(z)``.
    """
    objective = _generator_objective(generator, teacher, student, optim=optim, adversarial_weight=adversarial_weight,
                                     kind=kind, temperature=temperature, only_disagreeing=only_disagreeing,
                                     bn_weight=bn_weight, ce_weight=ce_weight, diversity_weight=diversity_weight)
    conditional = bool(getattr(generator, "conditional", False))
    batches = _generator_batches(generator, _num_classes(generator), steps=steps, batch_size=batch_size,
                                 stream=stream, label_probs=label_probs, needs_labels=conditional or ce_weight > 0)
    if not fixed_codes:
        return optimize(objective, batches)
    z, y = next(iter(SampledBatches(batches.sample, 1)))
    z = z.detach().clone().requires_grad_(True)
    objective = dataclasses.replace(objective, params=(*objective.params, z))
    result: dict[str, Any] = dict(optimize(objective, SampledBatches(lambda _step: (z, y), steps)))
    result["codes"] = (z.detach(), y)
    return result


def _as_generators(generators: nn.Module | Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    gens = (generators,) if isinstance(generators, nn.Module) else tuple(generators)
    if not gens:
        raise ValueError("distillation on generated samples needs at least one generator")
    return gens


def _generated_batch(generators: tuple[nn.Module, ...], teacher: nn.Module, n: int, stream: torch.Generator | None,
                     labels: list[Callable[[int, torch.device], torch.Tensor] | None], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples from each generator (in eval mode, no gradient), concatenated, with the teacher's
    logits (eval mode, no gradient)."""
    parts = []
    with torch.no_grad():
        for g, draw_labels in zip(generators, labels):
            g.eval()
            z, y = _generate(g, n, stream, draw_labels)
            parts.append((g(z, y) if y is not None else g(z)).to(device))
        x = torch.cat(parts)
        teacher.eval()
        return x, teacher(x)


def _distill_objective(student: nn.Module, teacher: nn.Module, frozen: tuple[nn.Module, ...], loss_fn: DistillLoss,
                       optim: OptimOptions, student_eval: bool, params: Any = None, repeats: int = 1,
                       name: str = "loss", fresh: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> Objective:
    def loss(batch: Any) -> torch.Tensor:
        x, t = fresh() if fresh is not None else batch
        return _mean(loss_fn(student(x), t))

    modes = {"eval": (*frozen, student)} if student_eval else {"train": (student,), "eval": frozen}
    return Objective(loss, student if params is None else params, optim, repeats=repeats, name=name, **modes)


def distill_on_generated(
    student: nn.Module,
    teacher: nn.Module,
    generators: nn.Module | Sequence[nn.Module],
    *,
    steps: int,
    samples_per_generator: int = 32,
    optim: OptimOptions = OptimOptions(lr=1e-4),
    stream: torch.Generator | None = None,
    loss: str | DistillLoss = "mosaic",
    temperature: float = 1.0,
    kl_weight: float = 0.8,
    ce_weight: float = 0.2,
    js_weight: float = 1.0,
    student_eval: bool = False,
    label_probs: np.ndarray | None = None,
    params: Any = None,
) -> dict[str, float]:
    """Distill ``teacher`` into ``student`` for ``steps`` steps, each on ``samples_per_generator``
    samples from every generator (drawn fresh each step from ``stream``, generators in eval mode; a
    conditional generator gets labels ~ ``label_probs``, uniform by default), with the teacher's
    logits as targets.

    ``loss``: ``"mosaic"`` (:func:`~.losses.mosaic_distillation` with ``temperature``, ``kl_weight``,
    ``ce_weight``, ``js_weight``; Mosaic's code: 32 samples per client generator, Adam 1e-4, T = 1,
    0.8/0.2/1.0, ``student_eval=True``), ``"kl"`` (:func:`~.losses.distillation_kl` at
    ``temperature``: DENSE's student loss), ``"l1_logits"``, or a callable ``(student_logits,
    teacher_logits)`` returning per-sample or mean losses. ``student_eval`` keeps the student in eval
    mode while it learns (BatchNorm statistics frozen, no dropout); otherwise it trains in train mode.
    ``params``: the student's parameters to update (default all). The teacher and the generators are
    in eval mode and unchanged. Returns ``{"loss", "steps"}``.
    """
    gens = _as_generators(generators)
    loss_fn = _distill_loss(loss, temperature, kl_weight, ce_weight, js_weight)
    labels = [_label_sampler(_num_classes(g), label_probs, stream) if getattr(g, "conditional", False) else None
              for g in gens]
    device = _device(student)
    objective = _distill_objective(student, teacher, (teacher, *gens), loss_fn, optim, student_eval, params)
    batches = SampledBatches(
        lambda _step: _generated_batch(gens, teacher, samples_per_generator, stream, labels, device), steps)
    return optimize(objective, batches)


def distill_on_inputs(
    student: nn.Module,
    x: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    optim: OptimOptions = OptimOptions(lr=0.005, optimizer="sgd", momentum=0.9),
    stream: torch.Generator | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Distill fixed targets into ``student``: ``steps`` steps of T²·KL(σ(t/T) ‖ σ(s/T)) on shuffled
    batches of the inputs ``x`` and their teacher logits (a pool of generated samples, DENSE; a
    public set, DisUE), the student in train mode. Returns ``{"loss", "steps"}``."""

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return distillation_kl(student(x[idx]), teacher_logits[idx], temperature).mean()

    return optimize(Objective(loss, student, optim, train=(student,)),
                    IndexBatches(len(x), batch_size, steps=steps, generator=stream))


def adversarial_distillation(
    generator: nn.Module,
    teacher: nn.Module,
    student: nn.Module,
    *,
    steps: int,
    generator_repeats: int = 1,
    student_repeats: int = 1,
    batch_size: int = 64,
    generator_optim: OptimOptions = OptimOptions(lr=1e-3),
    student_optim: OptimOptions = OptimOptions(lr=1e-4),
    stream: torch.Generator | None = None,
    adversarial_weight: float = 1.0,
    kind: str = "kl",
    only_disagreeing: bool = False,
    bn_weight: float = 0.0,
    ce_weight: float = 0.0,
    diversity_weight: float = 0.0,
    label_probs: np.ndarray | None = None,
    loss: str | DistillLoss = "kl",
    temperature: float = 1.0,
    student_eval: bool = False,
) -> dict[str, float]:
    """``steps`` rounds of ``generator_repeats`` generator updates (as :func:`train_generator_against`)
    then ``student_repeats`` student updates (as :func:`distill_on_generated` with one generator,
    ``batch_size`` samples drawn fresh for every update), in one loop: each keeps one optimizer
    (Adam's moments) across all steps. FedFTG's and DFRD's server loop (an inner generator phase and
    a fine-tuning phase per iteration). ``temperature`` serves both the disagreement and ``loss``.
    Returns ``{"generator", "student", "steps"}``.
    """
    gen_objective = _generator_objective(
        generator, teacher, student, optim=generator_optim, adversarial_weight=adversarial_weight, kind=kind,
        temperature=temperature, only_disagreeing=only_disagreeing, bn_weight=bn_weight, ce_weight=ce_weight,
        diversity_weight=diversity_weight, repeats=generator_repeats, name="generator")
    conditional = bool(getattr(generator, "conditional", False))
    num_classes = _num_classes(generator)
    batches = _generator_batches(generator, num_classes, steps=steps, batch_size=batch_size, stream=stream,
                                 label_probs=label_probs, needs_labels=conditional or ce_weight > 0)
    labels = [_label_sampler(num_classes, label_probs, stream) if conditional else None]
    device = _device(student)
    loss_fn = _distill_loss(loss, temperature, 0.8, 0.2, 1.0)

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:
        return _generated_batch((generator,), teacher, batch_size, stream, labels, device)

    student_objective = _distill_objective(student, teacher, (teacher, generator), loss_fn, student_optim,
                                           student_eval, repeats=student_repeats, name="student", fresh=fresh)
    return optimize([gen_objective, student_objective], batches)
