"""Batch sources for :func:`~hetpfl.learn.loop.optimize`: finite iterables with a length (the step count).

Batches are produced lazily, one per pull, so the random draws of a source (a shuffle, a sample)
interleave with the draws of the losses in step order, and nothing is drawn past the last step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


def steps_for_epochs(n: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for ``epochs`` passes (fractions allowed) over ``n`` samples: the share of
    ``ceil(n / batch_size)`` steps, at least one; 0 when there is nothing to do."""
    if n == 0 or epochs <= 0:
        return 0
    return max(1, int(round(max(1, -(-n // batch_size)) * epochs)))


def index_pass(
    n: int, batch_size: int, generator: torch.Generator | None = None, *, shuffle: bool = True, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """One pass of mini-batches of indices into ``n`` samples, in a fresh order drawn from ``generator``
    when ``shuffle``. ``drop_last`` drops a short final batch (never the first). With ``batch_size`` > 1
    a lone final sample is skipped when n > 1: it breaks BatchNorm in train mode and adds nothing."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < batch_size and drop_last and start > 0:
            return
        if len(idx) < 2 and n > 1 and batch_size > 1:
            return
        yield idx


@dataclass(frozen=True, eq=False)
class IndexBatches:
    """Index batches over a dataset of ``n`` samples: passes of :func:`index_pass` repeated until
    ``steps`` batches are given. ``steps`` defaults to :func:`steps_for_epochs` of ``epochs``."""

    n: int
    batch_size: int
    epochs: float = 1.0
    steps: int | None = None
    generator: torch.Generator | None = None
    shuffle: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.n < 0 or (self.steps is not None and self.steps < 0):
            raise ValueError(f"IndexBatches: n={self.n} and steps={self.steps} must be >= 0")
        steps = steps_for_epochs(self.n, self.batch_size, self.epochs) if self.steps is None else self.steps
        object.__setattr__(self, "steps", steps if self.n > 0 else 0)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        given = 0
        while given < self.steps:
            before = given
            for idx in index_pass(self.n, self.batch_size, self.generator, shuffle=self.shuffle,
                                  drop_last=self.drop_last):
                given += 1
                yield idx
                if given >= self.steps:
                    return
            if given == before:  # cannot happen for n > 0; guards against looping forever
                raise RuntimeError(f"IndexBatches: a pass over n={self.n} gave no batch")


@dataclass(frozen=True, eq=False)
class SampledBatches:
    """Synthetic batches: ``sample(step)`` for step = 0 … ``steps`` − 1, drawn when pulled (e.g.
    noise for a generator network, or its samples)."""

    sample: Callable[[int], Any]
    steps: int

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"SampledBatches: steps={self.steps} must be >= 0")

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        for step in range(self.steps):
            yield self.sample(step)
