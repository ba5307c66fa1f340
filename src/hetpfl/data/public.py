"""The public set: unlabeled inputs shared by all parties, with the true labels held apart.

Algorithm code sees only :attr:`PublicSet.inputs`; :meth:`PublicSet.labels_for_evaluation` is for
evaluation and audit code. A prepared run holds its public set :meth:`~PublicSet.without_labels`, so
no code of a run (algorithm, frame walk or ``gc``) can reach the labels: they are not in the process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PublicLabelsWithheld", "PublicSet"]


class PublicLabelsWithheld(LookupError):
    """The labels of a public set whose labels were dropped (:meth:`PublicSet.without_labels`)."""


class PublicSet:
    """Unlabeled public inputs shared by all parties (e.g. for distillation).

    ``inputs`` is a read-only array (float32, or int64 token ids for integer inputs, as in
    :class:`~hetpfl.data.sources.ArrayDataset`). The true labels are held apart, only for evaluation and
    audits (for example, measuring pseudo-label accuracy): :meth:`labels_for_evaluation`.
    """

    __slots__ = ("__labels", "inputs")

    def __init__(self, inputs: np.ndarray, labels: np.ndarray | None) -> None:
        inputs = np.asarray(inputs)
        dtype = np.int64 if np.issubdtype(inputs.dtype, np.integer) else np.float32
        inputs = np.array(inputs, dtype=dtype, copy=True)
        if labels is not None:
            labels = np.array(labels, dtype=np.int64, copy=True)
            if inputs.shape[0] != labels.shape[0]:
                raise ValueError(f"public set: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
            labels.flags.writeable = False
        inputs.flags.writeable = False
        self.inputs = inputs
        self.__labels = labels

    def without_labels(self) -> PublicSet:
        """The same inputs (shared, not copied) with no labels at all: what a run holds."""
        bare = PublicSet.__new__(PublicSet)
        bare.inputs = self.inputs
        bare.__labels = None
        return bare

    @property
    def has_labels(self) -> bool:
        return self.__labels is not None

    def labels_for_evaluation(self) -> np.ndarray:
        """The true labels of the public inputs (read-only).

        For evaluation and audit code only. NEVER call this from algorithm code: the public set is
        unlabeled by assumption, and using these labels would leak information no client has.
        Raises :class:`PublicLabelsWithheld` for a set :meth:`without_labels` (every prepared run's).
        """
        if self.__labels is None:
            raise PublicLabelsWithheld(
                "this public set holds no labels: a prepared run drops them before any algorithm code runs"
            )
        return self.__labels

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __repr__(self) -> str:
        return f"PublicSet(n={len(self)}, input_shape={tuple(self.inputs.shape[1:])})"

    def __getstate__(self) -> dict[str, Any]:
        return {"inputs": np.array(self.inputs), "labels": None if self.__labels is None else np.array(self.__labels)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        PublicSet.__init__(self, state["inputs"], state["labels"])
