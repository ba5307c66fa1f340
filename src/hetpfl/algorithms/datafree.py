"""Shared pieces of the data-free distillation baselines (no ``SPEC``).

* :class:`GeneratorConfig`: the server generator's config keys (architecture, latent size, width);
  :class:`AdversarialDistillationConfig` adds the keys of the adversarial distillation loop (FedFTG, DisUE);
* :func:`generator_module`: its :class:`~hetpfl.models.ModuleSpec` for the run's data (outputs span
  the dataset's value range, ``models.generator_spec``);
* :func:`check_generator`: the part of a spec's ``check_run`` that builds the generator once and
  fails before training, naming ``generator_arch``, when it cannot produce the dataset's inputs;
* :func:`class_shares`: each client's share of each class in a round (the class-level ensemble
  weights of FedFTG, DFRD and FedGen);
* :func:`frozen_copies`: uploaded client weights as frozen teacher models (copies of a template);
* :func:`agreement`: how often two classifiers give the same class (tests and measures);
* :func:`class_samples`: a picture of a conditional generator, eight samples per class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..configuration import FieldError, Validated, option, require
from ..learn import arrays_to_state
from ..models import ModuleSpec, available_architectures, generator_spec

GENERATORS = tuple(available_architectures("generator"))


@dataclass
class GeneratorConfig(Validated):
    """The server's generator (CPU-sized defaults; DENSE's code: nz 256, ngf 64; FedFTG: z 100)."""

    generator_arch: str | None = option(None, choices=GENERATORS)  # None: dcgan_generator for images, else mlp
    latent_dim: int = option(32, ge=1)  # size of the code z
    generator_width: int = option(16, ge=1)  # ngf


@dataclass
class AdversarialDistillationConfig(GeneratorConfig):
    """The server's adversarial distillation loop (``learn.adversarial_distillation``: FedFTG's schedule,
    shared by FedFTG and DisUE): per iteration ``generator_steps`` generator updates, then
    ``student_steps`` student updates on fresh samples. Defaults: FedFTG's paper, as recorded by a
    reimplementation (I_g = 1, I_d = 5, loss weights 1, generator Adam 1e-2, KL at T = 1)."""

    generator_steps: int = option(1, ge=1)  # I_g: generator updates per iteration
    student_steps: int = option(5, ge=1)  # I_d: student updates per iteration
    batch_size: int = option(64, ge=1)  # generated samples per update
    generator_lr: float = option(1e-2, gt=0)  # Adam
    ce_weight: float = option(1.0, ge=0)  # fidelity, CE(teacher(x), y)
    adversarial_weight: float = option(1.0, ge=0)  # hard samples, −KL(teacher ‖ student)
    diversity_weight: float = option(1.0, ge=0)
    temperature: float = option(1.0, gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.ce_weight + self.adversarial_weight + self.diversity_weight > 0, "ce_weight", self.ce_weight,
                "the generator needs a term: ce, adversarial or diversity weight > 0")


def generator_module(config: GeneratorConfig, data: Any, *, conditional: bool) -> ModuleSpec:
    """The generator of ``config`` for ``data`` (anything with ``input_kind`` and ``value_range``: the
    run's ``FederatedData`` or the server's ``ServerSetup``)."""
    arch = config.generator_arch or ("dcgan_generator" if data.input_kind == "image" else "mlp_generator")
    return generator_spec(arch, data.value_range, latent_dim=config.latent_dim, ngf=config.generator_width,
                          conditional=conditional)


def check_generator(config: GeneratorConfig, run: Any, *, conditional: bool) -> None:
    """Build the generator once for the run's data; a generator that cannot make the dataset's inputs
    fails here (``algorithm.generator_arch=...: why``), before any training."""
    spec = generator_module(config, run.data, conditional=conditional)
    try:
        generator = run.new_module(spec, "check")
    except ValueError as exc:
        raise FieldError("generator_arch", spec.arch, f"cannot generate this dataset's inputs: {exc}") from None
    if tuple(generator.output_shape) != tuple(run.data.input_shape):
        raise FieldError("generator_arch", spec.arch, f"makes inputs of shape {tuple(generator.output_shape)}, "
                                                      f"the dataset's are {tuple(run.data.input_shape)}")


def class_shares(counts: np.ndarray) -> np.ndarray:
    """α (M, C): α[k, y] = n_k^y / Σ_j n_j^y; a class no client holds: 1/M."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(0, keepdims=True)
    return np.where(totals > 0, counts / np.where(totals > 0, totals, 1), 1.0 / len(counts)).astype(np.float32)


def frozen_copies(template: nn.Module, states: list[dict[str, np.ndarray]]) -> list[nn.Module]:
    """One copy of ``template`` per state (``w.``/``b.`` arrays), in eval mode, without gradients."""
    models = []
    for arrays in states:
        model = copy.deepcopy(template)
        arrays_to_state(model, arrays)
        models.append(model.eval().requires_grad_(False))
    return models


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Share of the inputs ``x`` on which ``a`` and ``b`` (in eval mode) predict the same class."""
    modes = [a.training, b.training]
    a.eval(), b.eval()
    with torch.no_grad():
        same = (a(x).argmax(-1) == b(x).argmax(-1)).float().mean().item()
    a.train(modes[0]), b.train(modes[1])
    return float(same)


def class_samples(generator: nn.Module, setup: Any) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Eight samples of a conditional ``generator`` per class, one row each (images only: ``{}``
    otherwise), drawn from the server's ``visuals`` stream: a server's :meth:`visuals`."""
    if len(setup.input_shape) != 3:
        return {}
    stream, n = setup.generator("visuals"), setup.num_classes
    with torch.no_grad():
        y = torch.arange(n).repeat_interleave(8)
        x = generator.eval().sample(8 * n, stream, y).cpu().numpy()
    return {"generated_samples": (x.reshape(n, 8, *setup.input_shape), [f"class {c}" for c in range(n)])}
