"""Registered methods. Each lives in its own module and exposes ``SPEC``."""

from __future__ import annotations

from . import comet, cosmos, fedavg, fedct, fedmd, local
from .base import AlgorithmSpec

ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec for spec in (local.SPEC, fedavg.SPEC, fedmd.SPEC, cosmos.SPEC, comet.SPEC, fedct.SPEC)
}


def get_algorithm(name: str) -> AlgorithmSpec:
    """The registered method called ``name`` (a clear error lists the registered ones)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm.name={name!r} is not registered (available: {', '.join(sorted(ALGORITHMS))})") from None
