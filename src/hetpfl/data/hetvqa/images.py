"""HetVQA's images: every source brought to one format, split into disjoint subsets, and the visual
domains (new-domain tasks) as deterministic transforms.

Format: ``(3, 32, 32)`` uint8 (float in [0, 1] once a batch is read, :func:`to_model_input`).
Grayscale sources are replicated over three channels; 28x28 images are padded by 2 pixels a side;
scikit-learn's 8x8 digits are upsampled 4x (bilinear). Each source's train and test images are cut
into :data:`NUM_SUBSETS` disjoint subsets by a fixed permutation (never the run seed), so task
``<template>_<source>/<k>`` on one client and ``/<j>`` on another see different images of the same
source — the "same source, disjoint data" relation that relevance-aware aggregation exploits — and
subset :data:`PRETRAIN_SUBSET` is kept for pretraining the backbones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hetpfl.data.sources import load_dataset
from hetpfl.rng import numpy_rng

__all__ = ["DOMAINS", "IMAGE_SHAPE", "NUM_SUBSETS", "PRETRAIN_SUBSET", "SOURCES", "ImagePool", "load_image_pool",
           "to_model_input"]

#: One image as every HetVQA model reads it.
IMAGE_SHAPE = (3, 32, 32)
#: The datasets images come from (hetpfl dataset names).
SOURCES = ("mnist", "fashion_mnist", "cifar10", "digits")
#: Disjoint subsets per source split: tasks use subsets 0 .. NUM_SUBSETS - 2, pretraining the last.
NUM_SUBSETS = 5
PRETRAIN_SUBSET = NUM_SUBSETS - 1
#: Visual domains: ``clean`` and the shifts that make a task's new-domain variant.
DOMAINS = ("clean", "rotate", "invert", "noise")
_NOISE_STD = 0.25  # of the [0, 1] range: strong enough to be a new domain, weak enough to stay legible


@dataclass(frozen=True)
class SourceImages:
    """One source in HetVQA's format: ``images`` (N, 3, 32, 32) uint8, ``labels`` (N,), and
    ``subsets[k]`` the indices of subset ``k``."""

    name: str
    class_names: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    subsets: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class ImagePool:
    """Every source's train and test images (``train[source]``, ``test[source]``)."""

    train: dict[str, SourceImages]
    test: dict[str, SourceImages]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.train)


def _to_format(x: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """(N, C, H, W) floats of a dataset -> (N, 3, 32, 32) uint8."""
    lo, hi = value_range if value_range is not None else (float(x.min()), float(x.max()))
    t = torch.from_numpy(np.clip((x - lo) / (hi - lo), 0.0, 1.0))
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    side = t.shape[-1]
    if side < 16:
        t = F.interpolate(t, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
    elif side < IMAGE_SHAPE[-1]:
        pad = (IMAGE_SHAPE[-1] - side) // 2
        t = F.pad(t, (pad, IMAGE_SHAPE[-1] - side - pad) * 2)
    return (t * 255).round().to(torch.uint8).numpy()


def _subsets(source: str, split: str, n: int) -> tuple[np.ndarray, ...]:
    order = numpy_rng(0, "hetvqa", source, split, "subsets").permutation(n)  # fixed, not the run seed
    return tuple(np.sort(part) for part in np.array_split(order, NUM_SUBSETS))


def load_image_pool(sources: tuple[str, ...] = SOURCES, data_dir: str | None = None,
                    max_per_split: int | None = 12000) -> ImagePool:
    """Load ``sources`` (a subset of :data:`SOURCES`) in HetVQA's format. ``max_per_split`` keeps a
    fixed stratified-by-chance slice of each split (the same every time) so the pool stays small;
    None keeps everything. Raises ``ValueError`` for an unknown source."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"hetvqa: unknown image source {unknown[0]!r}; sources: {', '.join(SOURCES)}")
    train: dict[str, SourceImages] = {}
    test: dict[str, SourceImages] = {}
    for name in sources:
        data = load_dataset(name, data_dir, download=False)
        for split, arrays, out in (("train", data.train, train), ("test", data.test, test)):
            keep = np.arange(len(arrays))
            if max_per_split is not None and keep.size > max_per_split:
                keep = np.sort(numpy_rng(0, "hetvqa", name, split, "keep").permutation(keep.size)[:max_per_split])
            images = _to_format(arrays.x[keep], data.value_range)
            out[name] = SourceImages(name, tuple(data.class_names), images, arrays.y[keep],
                                     _subsets(name, split, keep.size))
    return ImagePool(train, test)


_NOISE_BANK_SIZE = 97


@functools.cache  # drawn once per process, not on every batch of a noisy task
def _noise_bank() -> torch.Tensor:
    """A fixed bank of noise images: an image's noise is picked by its key, so it never changes."""
    g = torch.Generator().manual_seed(97)
    return torch.randn((_NOISE_BANK_SIZE, *IMAGE_SHAPE), generator=g) * _NOISE_STD


def apply_domain(images: torch.Tensor, domain: str, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Images (N, ..., 3, H, W) in [0, 1] as ``domain`` shows them: ``rotate`` turns them 90 degrees,
    ``invert`` maps v to 1 - v, ``noise`` adds Gaussian noise (std 0.25, clipped) chosen from a fixed
    bank by ``keys`` (N,) (e.g. the images' indices), so a given image always looks the same."""
    if domain == "clean":
        return images
    if domain == "rotate":
        return torch.rot90(images, 1, dims=(-2, -1))
    if domain == "invert":
        return 1.0 - images
    if domain == "noise":
        keys = torch.zeros(images.shape[0], dtype=torch.long) if keys is None else torch.as_tensor(keys)
        noise = _noise_bank()[keys.long() % _NOISE_BANK_SIZE]
        return (images + noise.reshape(noise.shape[0], *([1] * (images.dim() - 4)), *IMAGE_SHAPE)).clamp(0.0, 1.0)
    raise ValueError(f"hetvqa: unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")


def to_model_input(images_u8: np.ndarray, domain: str = "clean", keys: np.ndarray | None = None) -> torch.Tensor:
    """uint8 images (N, ..., 3, 32, 32) -> float32 in [0, 1] in ``domain`` (noise picked by ``keys``)."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).float() / 255.0
    return apply_domain(x, domain, None if keys is None else torch.from_numpy(np.asarray(keys)))
