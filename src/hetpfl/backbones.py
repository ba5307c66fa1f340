"""Pretrained vision-language backbones: the "foundation model" step of the multi-modal benchmark,
run once per (architecture, recipe, seed) and cached on disk.

:func:`pretrained_backbone` builds a ``vlm_*`` model, trains all of it on HetVQA's pretraining mix
(naming what one or two images show, :data:`~hetpfl.data.hetvqa.tasks.PRETRAIN_TEMPLATES`, on the
images of the pretraining subset, which no task uses), and saves the weights under
:func:`backbone_dir` in a file named by a checksum of everything that produced them: the
architecture and its options, the vocabulary, the image sources, the recipe and the seed. A later
call with the same inputs loads the file (and checks the checksum stored inside); any change gives a
new file, so a cache is never stale.

Recipe (:class:`PretrainRecipe`): Adam on every parameter, the answer loss of the mix, plus (weight
``vision_probe``) the cross-entropy of a throwaway linear probe from the mean image token to the
image's class. LLaVA starts from a pretrained CLIP vision tower; we have none, and without the probe
the language model takes a long plateau before it starts reading the images at all. ``hetpfl pretrain`` runs it from the command line and
``hetpfl data info hetvqa`` shows where the weights are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.hetvqa import (
    IMAGE_SHAPE,
    NUM_IMAGE_CLASSES,
    PRETRAIN_SUBSET,
    SOURCES,
    ImagePool,
    TaskSpec,
    Vocabulary,
    build_examples,
    load_image_pool,
    vocabulary,
)
from .data.hetvqa.tasks import PRETRAIN_TEMPLATES
from .learn.loop import Objective, optimize
from .learn.options import OptimOptions
from .learn.vlm import answer_loss, example_batches, score_answers
from .models import VLM_ARCHITECTURES, build_model
from .models.vlm import backbone_dir, backbone_file
from .rng import derive_seed, numpy_rng

__all__ = ["PretrainRecipe", "backbone_dir", "backbone_path", "cached_backbones", "pretrained_backbone"]

#: Bump when the pretraining code changes what it produces (part of every checksum).
RECIPE_VERSION = 2  # 2: the mix also names three images


@dataclass(frozen=True)
class PretrainRecipe:
    """How a backbone is pretrained (every field is part of the cache checksum)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 5e-4
    vision_probe: float = 1.0  # weight of the vision encoder's class-probe loss (0: none; see module doc)
    examples_per_source: int = 2000  # per pretraining template and source
    sources: tuple[str, ...] = SOURCES

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "examples_per_source"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pretraining: {name} must be a positive int, got {value!r}")
        if not self.vision_probe >= 0:
            raise ValueError(f"pretraining: vision_probe must be >= 0, got {self.vision_probe!r}")
        if not self.lr > 0:
            raise ValueError(f"pretraining: lr must be > 0, got {self.lr!r}")
        unknown = [s for s in self.sources if s not in SOURCES]
        if not self.sources or unknown:
            raise ValueError(f"pretraining: sources must be some of {', '.join(SOURCES)}, got {self.sources!r}")


def _checksum(arch: str, options: dict[str, Any], recipe: PretrainRecipe, seed: int) -> str:
    what = {"arch": arch, "options": sorted(options.items()), "recipe": dataclasses.asdict(recipe), "seed": seed,
            "vocabulary": list(vocabulary().itos), "image_shape": IMAGE_SHAPE, "version": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()[:16]


def backbone_path(arch: str, recipe: PretrainRecipe = PretrainRecipe(), seed: int = 0, **options: Any) -> Path:
    """The cache file of ``arch`` pretrained by ``recipe`` with ``seed`` (it may not exist yet)."""
    return backbone_file(arch, _checksum(arch, options, recipe, seed))


def cached_backbones() -> list[dict[str, Any]]:
    """Every cached backbone: path, architecture, size, and the score it reached when pretrained."""
    out = []
    for path in sorted(backbone_dir().glob("vlm_*.pt")):
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
        except Exception:  # noqa: BLE001  (a foreign or broken file: listed as such)
            meta = {"error": "unreadable"}
        out.append({"path": str(path), "bytes": path.stat().st_size, **meta})
    return out


def _pretraining_sets(pool: ImagePool, vocab: Vocabulary, recipe: PretrainRecipe, split: str, n: int):
    return [build_examples(pool, vocab, TaskSpec(t, source), PRETRAIN_SUBSET, split, n)
            for t in PRETRAIN_TEMPLATES.values() for source in recipe.sources if source in t.sources]


def pretrained_backbone(arch: str, recipe: PretrainRecipe = PretrainRecipe(), seed: int = 0, *,
                        data_dir: str | None = None, pool: ImagePool | None = None, use_cache: bool = True,
                        progress: Callable[[int, int, float], None] | None = None, **options: Any) -> nn.Module:
    """``arch`` (a ``vlm_*`` architecture) pretrained by ``recipe`` with ``seed``: loaded from the
    cache when there, else trained (calling ``progress(step, steps, loss)`` every 10 steps) and
    saved. ``options`` are the architecture's (e.g. ``max_images``). The result is in eval mode with
    every parameter trainable; its ``pretraining`` attribute holds the cache metadata."""
    if arch not in VLM_ARCHITECTURES:
        raise ValueError(f"pretraining: {arch!r} is not a vision-language model; models: {', '.join(VLM_ARCHITECTURES)}")
    adapted = sorted(k for k in options if k == "pretrained" or k.startswith("lora_"))
    if adapted:
        raise ValueError(f"pretraining: option {adapted[0]!r} is not an architecture option of the backbone "
                         f"(pretrain the plain model; pass its checksum as `pretrained` when building clients)")
    vocab = vocabulary()
    checksum = _checksum(arch, options, recipe, seed)
    path = backbone_file(arch, checksum)
    torch.manual_seed(derive_seed(seed, "backbone", arch))
    model = build_model(arch, IMAGE_SHAPE, len(vocab), **options)
    if use_cache and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["meta"].get("checksum") != checksum:
            raise ValueError(f"pretraining cache {path} holds checksum {saved['meta'].get('checksum')!r}, "
                             f"expected {checksum!r}: delete the file")
        model.load_state_dict(saved["weights"])
        model.pretraining = saved["meta"]
        return model.eval()
    pool = pool if pool is not None else load_image_pool(recipe.sources, data_dir)
    train_sets = _pretraining_sets(pool, vocab, recipe, "train", recipe.examples_per_source)
    test_sets = _pretraining_sets(pool, vocab, recipe, "test", 100)
    rng = numpy_rng(seed, "backbone", arch, "batches")
    optim = OptimOptions(lr=recipe.lr, optimizer="adam", max_grad_norm=1.0)
    start = time.perf_counter()
    recent: list[torch.Tensor] = []
    steps_done = 0

    # a linear probe from the image tokens to the image's class, trained alongside and thrown away:
    # it stands in for the pretrained (e.g. CLIP) vision tower LLaVA starts from
    probe = nn.Linear(model.vision.norm.normalized_shape[0], NUM_IMAGE_CLASSES)

    def loss(batch: Any) -> torch.Tensor:
        value = answer_loss(model, batch)
        recent.append(value.detach())
        if recipe.vision_probe > 0:
            filled = batch.image_mask
            tokens = model.vision(batch.images[filled]).mean(dim=1)
            value = value + recipe.vision_probe * F.cross_entropy(probe(tokens), batch.image_labels[filled])
        return value

    def after_step() -> None:  # one optimizer for the whole run; progress every 10 steps
        nonlocal steps_done
        steps_done += 1
        if progress is not None and (steps_done % 10 == 0 or steps_done == recipe.steps):
            progress(steps_done, recipe.steps, float(torch.stack(recent[-10:]).mean()))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "backbone", arch, "train"))
        result = optimize(Objective(loss, [*model.parameters(), *probe.parameters()], optim, train=(model,),
                                    after_step=after_step),
                          example_batches(pool, train_sets, recipe.batch_size, rng), steps=recipe.steps)
    final_loss = float(torch.stack(recent[-20:]).mean())
    scores = {s.spec.name: score_answers(model, pool, s, vocab)["exact_match"] for s in test_sets}
    meta = {"arch": arch, "options": {k: v for k, v in options.items()}, "seed": seed, "checksum": checksum,
            "recipe": dataclasses.asdict(recipe), "recipe_version": RECIPE_VERSION, "final_loss": final_loss,
            "mean_loss": result["loss"],
            "test_exact_match": scores, "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": meta, "weights": model.state_dict()}, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves half a file under the final name
    model.pretraining = meta
    return model.eval()


def mean_score(meta: dict[str, Any]) -> float:
    """The mean exact match over the pretraining mix's test sets recorded in ``meta``."""
    return float(np.mean(list(meta["test_exact_match"].values())))
