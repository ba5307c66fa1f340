"""The training primitives every method shares: one optimization loop, the loss terms, and on top of
them supervised fit, distillation, prediction and evaluation.

Inputs are NumPy arrays (floating inputs become float32 tensors, integer inputs such as token ids
int64; labels int64; probability targets float32); batches are cut from tensors that share memory
with them, so no DataLoader overhead on small models. All shuffling and noise draw from the
``generator`` the caller passes (a per-client stream).

- :mod:`.options`: ``OptimOptions`` and ``select_parameters`` (which parameters train);
- :mod:`.losses`: every loss term;
- :mod:`.batches`: batch sources (index batches over a dataset, sampled synthetic batches);
- :mod:`.loop`: ``optimize`` over ``Objective`` s, the one loop;
- :mod:`.supervised`: ``fit`` and ``distill``; :mod:`.inference`: ``predict_*`` and ``evaluate``;
- :mod:`.generative`: ``train_gan``, ``train_generator_against``, ``distill_on_generated``, ``distill_on_inputs``,
  ``adversarial_distillation`` and the ``LogitEnsemble`` teacher;
- :mod:`.tensors`: array → tensor conversion and augmentation; :mod:`.weights`: weights as arrays.
"""

from .batches import IndexBatches, SampledBatches, index_pass, steps_for_epochs
from .generative import (
    GENERATED_DISTILL_LOSSES,
    LogitEnsemble,
    adversarial_distillation,
    distill_on_generated,
    distill_on_inputs,
    train_gan,
    train_generator_against,
)
from .inference import evaluate, predict_logits, predict_proba
from .loop import Objective, optimize
from .losses import (
    DISAGREEMENTS,
    DISTILL_LOSSES,
    PER_SAMPLE_DISTILL,
    bn_statistics_matching,
    class_diversity,
    cross_entropy,
    disagreement,
    distillation_kl,
    gan_discriminator_loss,
    gan_generator_loss,
    kl_to_targets,
    l1_to_logits,
    mosaic_distillation,
    noise_consistency,
    noise_diversity,
    prediction_entropy,
    proximal,
    restricted_cross_entropy,
    sharpen,
    weighted_mean,
)
from .options import OPTIMIZERS, OptimOptions, select_parameters
from .supervised import distill, fit
from .tensors import AUGMENTATIONS, as_input_tensor, as_tensor, augment_batch, input_dtype
from .weights import arrays_to_state, ema_update, state_to_arrays

__all__ = [
    "AUGMENTATIONS",
    "DISAGREEMENTS",
    "DISTILL_LOSSES",
    "GENERATED_DISTILL_LOSSES",
    "IndexBatches",
    "LogitEnsemble",
    "OPTIMIZERS",
    "Objective",
    "OptimOptions",
    "PER_SAMPLE_DISTILL",
    "SampledBatches",
    "adversarial_distillation",
    "arrays_to_state",
    "as_input_tensor",
    "as_tensor",
    "augment_batch",
    "bn_statistics_matching",
    "class_diversity",
    "cross_entropy",
    "disagreement",
    "distill",
    "distill_on_generated",
    "distill_on_inputs",
    "distillation_kl",
    "evaluate",
    "fit",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "index_pass",
    "input_dtype",
    "kl_to_targets",
    "l1_to_logits",
    "mosaic_distillation",
    "noise_consistency",
    "noise_diversity",
    "proximal",
    "restricted_cross_entropy",
    "optimize",
    "predict_logits",
    "predict_proba",
    "prediction_entropy",
    "select_parameters",
    "sharpen",
    "state_to_arrays",
    "ema_update",
    "steps_for_epochs",
    "train_gan",
    "train_generator_against",
    "weighted_mean",
]
