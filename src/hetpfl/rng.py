"""Random streams derived from (seed, *keys): one place for every random choice.

Every random decision in hetpfl draws from a stream named by the run seed and a path of keys
(for example ``("client", 3, "round", 7, "train")``), never from global state. Two runs with one
seed therefore make identical choices, whatever order clients execute in.
"""

from __future__ import annotations

import hashlib
from typing import Union

import numpy as np

Key = Union[int, str]


def derive_seed(seed: int, *keys: Key) -> int:
    """A 63-bit seed for the stream named by ``seed`` and ``keys`` (stable across platforms)."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def numpy_rng(seed: int, *keys: Key) -> np.random.Generator:
    """A NumPy generator for the stream ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: Key):
    """A ``torch.Generator`` for the stream ``(seed, *keys)``."""
    import torch

    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
