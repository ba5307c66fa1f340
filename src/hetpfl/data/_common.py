"""Validation and counting helpers shared by the partitioners, the federated split and the drift
schedules (one message format: ``invalid <name>=<value>: <what is allowed>``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["apportion", "check_fraction", "check_int", "check_positive", "check_real"]


def check_int(name: str, value: Any, minimum: int, extra: str = "") -> int:
    """``value`` as an int; it must be an integer (not a bool) ``>= minimum``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or value < minimum:
        raise ValueError(f"invalid {name}={value!r}: an integer >= {minimum} is allowed{extra}")
    return int(value)


def check_real(name: str, value: Any) -> float:
    """``value`` as a finite float (ints accepted, bools not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"invalid {name}={value!r}: a number is required")  # noqa: TRY004
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"invalid {name}={value!r}: a finite number is required")
    return v


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite float ``> 0``."""
    v = check_real(name, value)
    if v <= 0:
        raise ValueError(f"invalid {name}={value!r}: a number > 0 is allowed")
    return v


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1]``."""
    v = check_real(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"invalid {name}={value!r}: a number in [0, 1] is allowed")
    return v


def apportion(total: int, p: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``p`` (largest remainder, ties by index)."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    raw = p * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts
