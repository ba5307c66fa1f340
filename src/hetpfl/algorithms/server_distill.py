"""Server-side distillation of adapters on HetVQA's generic examples (PerAda, TAKFL): the batches,
the clients' ensemble logits, and distilling one adapter towards target logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data.hetvqa import Batch, make_batch
from ..learn.loop import Objective, optimize
from ..learn.losses import distillation_kl
from ..learn.options import OptimOptions
from ..learn.vlm import answer_logits
from ..models.lora import trainable_parameters
from .base import ServerSetup
from .vqa import adapter_arrays, load_adapter_arrays

__all__ = ["distill_adapter", "ensemble_logits", "server_batches", "student_models"]


def student_models(setup: ServerSetup) -> dict[str, nn.Module]:
    """One server copy of every architecture's adapted backbone (to load adapters into and distil)."""
    if setup.examples is None:
        raise ValueError("server-side distillation needs the server's generic examples (a HetVQA run)")
    return {arch: setup.build_model(arch, "student") for arch in sorted(set(setup.client_archs))}


def server_batches(setup: ServerSetup, per_source: int, *keys: str | int) -> list[Batch]:
    """The server's examples (``per_source`` per pretraining template and source) in batches of the
    client batch size, shuffled by the server's stream ``keys``."""
    pool, sets = setup.examples(per_source)
    rng = setup.rng(*keys)
    size = setup.training.batch_size
    batches = [make_batch(pool, s, np.sort(rows)) for s in sets
               for rows in np.array_split(rng.permutation(len(s)), max(1, len(s) // size))]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def ensemble_logits(models: Mapping[int, tuple[nn.Module, Mapping[str, np.ndarray]]],
                    batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Per batch, the mean answer logits of the given ``{client: (model, its adapter arrays)}`` (each
    client's adapter loaded into its architecture's model in turn)."""
    total: list[torch.Tensor | None] = [None] * len(batches)
    for model, arrays in models.values():
        load_adapter_arrays(model, arrays)
        model.eval()
        for i, batch in enumerate(batches):
            logits = answer_logits(model, batch)[0] / len(models)
            total[i] = logits if total[i] is None else total[i] + logits
    return total


def distill_adapter(student: nn.Module, start: Mapping[str, np.ndarray], batches: Sequence[Batch],
                    targets: Sequence[torch.Tensor], temperature: float, optim: OptimOptions,
                    squared: bool = True) -> tuple[dict[str, np.ndarray], float]:
    """``student`` with adapter ``start`` distilled for one pass over ``batches`` towards ``targets``
    (KL at ``temperature``, times T² unless ``squared`` is False): its adapter arrays after, and the
    mean loss."""
    load_adapter_arrays(student, start)
    factor = 1.0 if squared else 1.0 / temperature**2

    def loss(step) -> torch.Tensor:
        batch, target = step
        return distillation_kl(answer_logits(student, batch)[0], target, temperature).mean() * factor

    result = optimize(Objective(loss, trainable_parameters(student), optim, train=(student,)), list(zip(batches, targets)))
    return adapter_arrays(student), result["loss"]
