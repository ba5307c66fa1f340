"""Feature-shift client groups: the standard clustered-FL benchmark (rotated / inverted images).

A feature shift is a partitioning option (``build_federated_data(..., feature_shift=...)``). The
clients are split into ``G`` groups, client ``i`` in group ``i % G``, and every image of a client
(its private train AND test split) goes through its group's transform. Which samples a client
owns is decided by the label partition alone (same seed, same indices, with or without a shift);
only the pixels of the shifted groups change. The public set and the global test set are left
untransformed. The true group of every client is ``FederatedData.client_groups`` (evaluation
only: the engine scores clusterings against it, no algorithm sees it).

Shifts (:data:`FEATURE_SHIFTS`):

* ``none``: no shift.
* ``rotate``: group ``g`` is turned by ``90·g`` degrees counter-clockwise (``np.rot90(x, g,
  axes=(-2, -1))``), ``G <= 4``; needs square images (``H == W``).
* ``invert``: group 0 as is, group 1 colour-inverted, ``G <= 2``: every value ``v`` becomes
  ``lo + hi - v``, with ``lo``/``hi`` the smallest and largest input values of the dataset's
  training split (0 and 1 for pixels / 255 or / 16, -1 and 1 for CIFAR-10's normalized pixels),
  so inverted images stay in the range of the originals. Needs image inputs.

Groups are deterministic (no random draw), so a run's data depends on the seed exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetpfl.configuration import FieldError

__all__ = ["FEATURE_SHIFTS", "FeatureShift", "check_feature_shift", "make_feature_shift", "max_shift_groups"]

FEATURE_SHIFTS: tuple[str, ...] = ("none", "rotate", "invert")
_MAX_GROUPS = {"rotate": 4, "invert": 2}  # distinct transforms each shift has
_WHAT = {"rotate": "0, 90, 180, 270 degrees", "invert": "identity, inverted"}
# partitions that define client groups of their own (a shift would give clients a second group)
_GROUPED_PARTITIONS = ("cosmos",)


def max_shift_groups(kind: str) -> int:
    """The most groups shift ``kind`` can make (its number of distinct transforms)."""
    return _MAX_GROUPS.get(kind, 1)


@dataclass(frozen=True)
class FeatureShift:
    """``kind`` over ``num_groups`` groups; ``lo``/``hi``: the input range (inversion only)."""

    kind: str
    num_groups: int
    lo: float = 0.0
    hi: float = 1.0

    def groups(self, num_clients: int) -> np.ndarray:
        """The group of every client: ``i % num_groups``."""
        return np.arange(num_clients, dtype=np.int64) % self.num_groups

    def apply(self, x: np.ndarray, group: int) -> np.ndarray:
        """Inputs ``x`` (``(N, C, H, W)``) as group ``group`` sees them (group 0: ``x`` itself)."""
        if group == 0:
            return x
        if self.kind == "rotate":
            return np.ascontiguousarray(np.rot90(x, int(group), axes=(-2, -1)))
        if self.kind == "invert":
            return (np.float32(self.lo + self.hi) - x).astype(x.dtype, copy=False)
        raise ValueError(f"feature shift {self.kind!r} has no group {group}")

    def describe(self) -> str:
        return f"feature shift '{self.kind}' over {self.num_groups} client groups (client i in group i % {self.num_groups})"


def check_feature_shift(kind: str, num_groups: int | None = None, *, partition: str | None = None,
                        input_kind: str | None = None, input_shape: tuple[int, ...] | None = None) -> int:
    """The number of groups of shift ``kind`` (``num_groups``, or every transform when None).

    A combination that cannot work raises :class:`~hetpfl.configuration.FieldError` naming the key
    (``feature_shift`` or ``feature_shift_groups``). Checks only what it is given: the config
    checks its keys with it, the data builder also the inputs."""
    if kind not in FEATURE_SHIFTS:
        raise FieldError("feature_shift", kind, f"expected one of {', '.join(FEATURE_SHIFTS)}")
    if kind == "none":
        return 1
    top = _MAX_GROUPS[kind]
    groups = top if num_groups is None else num_groups
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or not 1 <= groups <= top:
        raise FieldError("feature_shift_groups", num_groups,
                         f"feature_shift={kind!r} makes 1 to {top} groups ({_WHAT[kind]})")
    if partition in _GROUPED_PARTITIONS:
        raise FieldError("feature_shift", kind, f"partition {partition!r} has client groups of its own; use a "
                         f"label partition without groups (iid, dirichlet, ...) or feature_shift='none'")
    if input_kind is not None and input_kind != "image":
        raise FieldError("feature_shift", kind, f"needs image inputs, the dataset has {input_kind} inputs of "
                         f"shape {tuple(input_shape or ())}")
    if kind == "rotate" and input_shape is not None and (len(input_shape) < 2 or input_shape[-1] != input_shape[-2]):
        raise FieldError("feature_shift", kind, f"needs square images (H == W), the inputs have shape "
                         f"{tuple(input_shape)}")
    return int(groups)


def make_feature_shift(kind: str, num_groups: int | None, *, partition: str, input_kind: str,
                       input_shape: tuple[int, ...], train_x: np.ndarray) -> FeatureShift | None:
    """The shift the options describe, checked against the data (None for ``none``)."""
    groups = check_feature_shift(kind, num_groups, partition=partition, input_kind=input_kind, input_shape=input_shape)
    if kind == "none":
        return None
    lo, hi = (float(train_x.min()), float(train_x.max())) if kind == "invert" and train_x.size else (0.0, 1.0)
    return FeatureShift(kind, groups, lo, hi)
