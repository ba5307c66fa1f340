"""Every loss term, in one place.

Per-sample terms return one value per row (shape ``(B,)``) so callers can weight samples; the
others return a scalar. The generator objectives (GAN terms, prediction entropy, class diversity,
BatchNorm-statistics matching, teacher-student disagreement, noise diversity) and the distillation
losses on generated samples (Mosaic's combination, KL at temperature T) are the second half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against integer ``labels``."""
    return F.cross_entropy(logits, labels)


def restricted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, present: torch.Tensor,
                             alpha: float) -> torch.Tensor:
    """FedRS's restricted softmax: cross-entropy after scaling the logits of the classes the client
    lacks (``present`` is a bool mask over classes) by ``alpha`` in [0, 1]."""
    scale = torch.where(present, torch.ones_like(logits[0]), torch.full_like(logits[0], alpha))
    return F.cross_entropy(logits * scale, labels)


def proximal(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) · Σ ||p − a||² over paired parameters and fixed anchors (FedProx's proximal term,
    Ditto's pull towards the global model)."""
    total = sum(((p - a.detach()) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * mu * total


def kl_to_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample KL(target ‖ softmax(logits)); ``targets`` are probability rows."""
    return F.kl_div(F.log_softmax(logits, dim=-1), targets, reduction="none").sum(-1)


def l1_to_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample mean |logits − target|; ``targets`` are logits (FedMD's digest step)."""
    return (logits - targets).abs().mean(-1)


PER_SAMPLE_DISTILL: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl_to_targets,
    "l1_logits": l1_to_logits,
}
DISTILL_LOSSES = tuple(PER_SAMPLE_DISTILL)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of per-sample losses, each weighted by ``weights`` (default 1)."""
    return (per_sample * weights).mean() if weights is not None else per_sample.mean()


def noise_consistency(
    model: nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    noise_std: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """MSE(softmax(logits), softmax(model(x + ε))), ε ~ N(0, noise_std²) drawn from ``generator``,
    the noisy branch without gradient (COSMOS's noise-consistency term). ``logits`` is ``model(x)``."""
    if not torch.is_floating_point(x):
        raise ValueError(f"the noise-consistency term needs floating inputs, got {x.dtype}")
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device) * noise_std
    with torch.no_grad():
        p_noisy = F.softmax(model(x + noise), dim=-1)
    return F.mse_loss(F.softmax(logits, dim=-1), p_noisy)


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Targets at temperature T: p^(1/T) / sum p^(1/T). T=1 leaves them unchanged; T→0 is one-hot."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, None)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    out = np.exp(logp)
    return (out / out.sum(axis=-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Generator objectives and distillation on generated samples
# ------------------------------------------------------------------------------------------


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE(D(x), 1) + BCE(D(G(z)), 0), each the mean over its own batch, on discriminator logits
    (DCGAN, Radford et al. 2016; Mosaic's ``degan.py`` sums ``errD_real + errD_fake`` the same way,
    on sigmoid outputs). Pass ``D(G(z).detach())`` so only the discriminator learns from it."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Per sample BCE(D(G(z)), 1) = −log σ(D(G(z))): the non-saturating generator loss (DCGAN;
    Mosaic's ``errG_adv``)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits), reduction="none")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per sample H(y) = −Σ_k y_k log y_k with y = softmax(logits). Minimizing it makes a frozen
    classifier confident on generated samples (Mosaic's entropy term E_z[−Σ y log y], weight ``c_l``,
    0 in its code; DAFL's one-hot loss in spirit)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def class_diversity(logits: torch.Tensor) -> torch.Tensor:
    """Σ_k w̄_k log w̄_k with w̄ = the batch mean of softmax(logits): the NEGATIVE entropy of the
    batch's class histogram, in [−log K, 0]. Minimizing it maximizes diversity: −log K when the
    batch spreads evenly over the K classes, 0 when every sample is one class (Mosaic's ``div_loss``,
    weight ``d_l`` = 5 in ``degan.py``; DAFL's information-entropy term)."""
    mean = F.softmax(logits, dim=-1).mean(0)
    return (mean * torch.log(mean.clamp_min(1e-12))).sum()


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_statistics_matching(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(x), R)`` with R = Σ over the BatchNorm layers of ``model`` of
    ||μ_batch − running_mean||₂ + ||σ²_batch − running_var||₂ (DeepInversion, Yin et al. 2020; DENSE's
    ``DeepInversionHook`` and Mosaic's ``deepinversion_cifar.get_loss``): μ and σ² (biased) are the
    per-channel statistics of the batch at each BN layer's input, read by forward hooks during this
    one forward pass (the hooks are removed before returning). Gradients flow to ``x``.

    ``model`` must be frozen in eval mode (its BN layers then normalize with, and keep, their running
    statistics); a BN layer in training mode raises ``ValueError``. BN layers without running
    statistics are skipped; a model without BN layers gives R = 0.
    """
    layers = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    training = [type(m).__name__ for m in layers if m.training]
    if training:
        raise ValueError(f"BatchNorm-statistics matching needs the model in eval mode ({len(training)} BN layers "
                         f"are training, which would update their running statistics)")
    terms: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        h = inputs[0]
        dims = [0, *range(2, h.dim())]
        mean, var = h.mean(dims), h.var(dims, unbiased=False)
        terms.append(torch.linalg.vector_norm(mean - module.running_mean.to(mean.dtype))
                     + torch.linalg.vector_norm(var - module.running_var.to(var.dtype)))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, (torch.stack(terms).sum() if terms else x.new_zeros(()))


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per sample T² · KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al. 2015; DENSE's ``kldiv``, the
    student's loss in DENSE's distillation and the first term of Mosaic's)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


DISAGREEMENTS = ("kl", "l1")


def disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "kl",
                 temperature: float = 1.0, only_disagreeing: bool = False) -> torch.Tensor:
    """Per sample teacher–student disagreement, which a data-free generator MAXIMIZES (it minimizes
    −weight · disagreement) to produce hard samples:

    - ``kind="kl"``: T² · KL(softmax(t/T) ‖ softmax(s/T)) (:func:`distillation_kl`);
    - ``kind="l1"``: mean_k |s_k − t_k| on logits (DFAD, Fang et al. 2019, its MAE model discrepancy).

    ``only_disagreeing`` zeroes the samples on which argmax s = argmax t, so only samples across the
    student's decision boundary count (no gradient flows through the mask).

    The forms the baselines use: DENSE (official code, ``helpers/synthesizers.py``): KL at T = 1 with
    the argmax mask (``only_disagreeing=True``), the mean over the whole batch. FedFTG (Zhang et al.
    2022, hard sample mining): KL between the (class-weighted) ensemble and the global model, no mask.
    DFRD (Luo et al. 2023, its transferability term L_tran): −ε · KL(ensemble ‖ global) with an
    indicator ε that keeps samples where the two disagree (read from its follow-up DFDG by the same
    authors; its code is not in our store): KL with ``only_disagreeing=True``.
    """
    if kind == "kl":
        per = distillation_kl(student_logits, teacher_logits, temperature)
    elif kind == "l1":
        per = l1_to_logits(student_logits, teacher_logits)
    else:
        raise ValueError(f"disagreement kind={kind!r} is not supported (allowed: {', '.join(DISAGREEMENTS)})")
    if only_disagreeing:
        per = per * (student_logits.argmax(-1) != teacher_logits.argmax(-1)).to(per.dtype)
    return per


def mosaic_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                        kl_weight: float = 0.8, ce_weight: float = 0.2, js_weight: float = 1.0) -> torch.Tensor:
    """Per sample Mosaic's distillation loss (official code, ``trainer_mosaic.py``; methods.md §4.2):

        kl_weight · T² · KL(softmax(t/T) ‖ softmax(s/T)) + ce_weight · CE(s, argmax t) + js_weight · J,
        J = ½ [KL(σ(m) ‖ σ(s)) + KL(σ(m) ‖ σ(t))],  m = (s + t) / 2 averaged on LOGITS

    (σ = softmax at temperature 1; J is a JS-like term, not the true Jensen–Shannon divergence).
    Mosaic uses T = 1 and the weights 0.8, 0.2, 1.0. Pass teacher logits without gradient."""
    total = kl_weight * distillation_kl(student_logits, teacher_logits, temperature)
    if ce_weight:
        total = total + ce_weight * F.cross_entropy(student_logits, teacher_logits.argmax(-1), reduction="none")
    if js_weight:
        m = F.log_softmax((student_logits + teacher_logits) / 2, dim=-1)
        s, t = F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
        j = 0.5 * ((m.exp() * (m - s)).sum(-1) + (m.exp() * (m - t)).sum(-1))
        total = total + js_weight * j
    return total


def noise_diversity(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """exp(−mean_{i,j} d_z(i, j) · d_x(i, j)) over all pairs of a batch, d_z the mean squared
    difference of the latent codes and d_x the mean absolute difference of the generated outputs
    (FedGen's ``DiversityLoss``, Zhu et al. 2021; FedFTG's and DFRD's diversity term): minimized, it
    keeps distinct codes from collapsing onto one output."""
    zf, xf = z.flatten(1), x.flatten(1)
    sq = zf.pow(2).sum(-1)
    dz = (sq[:, None] + sq[None, :] - 2 * zf @ zf.T).clamp_min(0) / zf.shape[1]
    dx = torch.cdist(xf[None], xf[None], p=1)[0] / xf.shape[1]
    return torch.exp(-(dz * dx).mean())
