"""Registered methods: every module of this package that defines ``SPEC`` (an AlgorithmSpec).

Adding a method is adding its file; helper modules (``base``, ``clustering``...) define no ``SPEC``.
Modules are imported in name order, so the registry's order is stable.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import AlgorithmSpec


def _discover() -> dict[str, AlgorithmSpec]:
    found: dict[str, AlgorithmSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, AlgorithmSpec):
            if spec.name in found:
                raise ValueError(f"two methods are registered as '{spec.name}' (modules {info.name} and another)")
            found[spec.name] = spec
    return found


ALGORITHMS: dict[str, AlgorithmSpec] = _discover()


def get_algorithm(name: str) -> AlgorithmSpec:
    """The registered method called ``name`` (a clear error lists the registered ones)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm.name={name!r} is not registered (available: {', '.join(sorted(ALGORITHMS))})") from None
