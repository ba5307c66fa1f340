"""Federated view of a dataset: per-client private train/test data and an unlabeled public set.

:func:`build_federated_data` turns a :class:`~hetpfl.data.sources.DatasetSource` into a
:class:`FederatedData`, in this order (every random choice from a ``numpy_rng(seed, "data", ...)``
stream):

1. optional stratified subsample of the train split (``max_train_samples``);
2. class-balanced public carve-out (``public_fraction`` of every class, or exactly
   ``public_size`` samples spread evenly over the classes), taken BEFORE partitioning;
3. the remaining train samples are partitioned among the clients (``hetpfl.data.partition``);
4. every test sample of class ``c`` is given to client ``i`` with probability proportional to
   client ``i``'s private train count of ``c``, so each client's test set follows its own label
   distribution, and the client test sets are disjoint. (A test sample whose class no client holds
   goes to no client; it stays in ``global_test``, which is the whole test split.)

The public set's labels are kept apart: :class:`PublicSet` exposes only ``inputs``; the labels are
reachable through :meth:`PublicSet.labels_for_evaluation`, which algorithm code must never call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hetpfl.data.partition import partition_labels
from hetpfl.data.sources import ArrayDataset, DatasetSource
from hetpfl.rng import numpy_rng

__all__ = ["FederatedData", "PublicSet", "build_federated_data"]


class PublicSet:
    """Unlabeled public inputs shared by all parties (e.g. for distillation).

    ``inputs`` is a read-only array. The true labels are held apart, only for evaluation and
    audits (for example, measuring pseudo-label accuracy): :meth:`labels_for_evaluation`.
    """

    __slots__ = ("__labels", "inputs")

    def __init__(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        inputs = np.array(inputs, dtype=np.float32, copy=True)
        labels = np.array(labels, dtype=np.int64, copy=True)
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"public set: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        inputs.flags.writeable = False
        labels.flags.writeable = False
        self.inputs = inputs
        self.__labels = labels

    def labels_for_evaluation(self) -> np.ndarray:
        """The true labels of the public inputs (read-only).

        For evaluation and audit code only. NEVER call this from algorithm code: the public set is
        unlabeled by assumption, and using these labels would leak information no client has.
        """
        return self.__labels

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __repr__(self) -> str:
        return f"PublicSet(n={len(self)}, input_shape={tuple(self.inputs.shape[1:])})"

    def __getstate__(self) -> dict[str, Any]:
        return {"inputs": np.array(self.inputs), "labels": np.array(self.__labels)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        PublicSet.__init__(self, state["inputs"], state["labels"])


@dataclass(eq=False)
class FederatedData:
    """Per-client private train and test data, the public set and the global test split."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    client_train: list[ArrayDataset]
    client_test: list[ArrayDataset]
    public: PublicSet
    global_test: ArrayDataset
    client_groups: np.ndarray | None
    train_indices: list[np.ndarray]  # indices into source.train of each client's private data
    public_indices: np.ndarray  # indices into source.train
    test_indices: list[np.ndarray] = field(default_factory=list)  # indices into source.test
    scheme: str = ""
    seed: int | None = None

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def label_counts(self) -> np.ndarray:
        """``(num_clients, num_classes)`` counts of every client's private train labels."""
        return np.stack(
            [
                np.bincount(d.y, minlength=self.num_classes)[: self.num_classes]
                for d in self.client_train
            ]
        ).astype(np.int64)

    def describe(self) -> str:
        """One short paragraph summarizing clients, sizes, label skew, public and test sets."""
        sizes = np.array([len(d) for d in self.client_train])
        tsizes = np.array([len(d) for d in self.client_test])
        counts = self.label_counts()
        present = (counts > 0).sum(axis=1)
        top_share = counts.max(axis=1) / np.maximum(sizes, 1)
        text = (
            f"{self.name}: {self.num_clients} clients, scheme {self.scheme or '?'!s}"
            f"{'' if self.seed is None else f' (seed {self.seed})'}; private train samples per "
            f"client min {sizes.min()} / median {int(np.median(sizes))} / max {sizes.max()} "
            f"(total {sizes.sum()}); classes present per client {present.mean():.1f} of "
            f"{self.num_classes} on average, largest class {100 * top_share.mean():.0f}% of a "
            f"client's data on average; public set {len(self.public)} unlabeled samples; client "
            f"test sets min {tsizes.min()} / median {int(np.median(tsizes))} / max {tsizes.max()} "
            f"(total {tsizes.sum()}), global test {len(self.global_test)}"
        )
        if self.client_groups is not None:
            ng = int(self.client_groups.max()) + 1 if self.client_groups.size else 0
            per = np.bincount(self.client_groups, minlength=ng)
            text += f"; {ng} true client groups of sizes {per.tolist()}"
        return text + "."


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _balanced_counts(available: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts summing to ``total``, as equal as the class sizes allow (water-filling);
    the last few units go to random classes."""
    available = np.asarray(available, dtype=np.int64)
    counts = np.zeros_like(available)
    remaining = int(total)
    while remaining > 0:
        room = available - counts
        active = np.flatnonzero(room > 0)
        share = remaining // active.size
        if share == 0:
            counts[rng.choice(active, size=remaining, replace=False)] += 1
            break
        add = np.minimum(room[active], share)
        counts[active] += add
        remaining -= int(add.sum())
    return counts


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * total
    out = np.floor(raw).astype(np.int64)
    rest = total - int(out.sum())
    if rest > 0:
        out[np.argsort(-(raw - out), kind="stable")[:rest]] += 1
    return out


def _check_int(name: str, value: Any, minimum: int) -> int:
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(f"invalid {name}={value!r}: an integer >= {minimum} is allowed")
    return int(value)


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------


def build_federated_data(
    source: DatasetSource,
    *,
    num_clients: int,
    scheme: str,
    seed: int,
    public_fraction: float = 0.0,
    public_size: int | None = None,
    max_train_samples: int | None = None,
    partition_params: dict | None = None,
) -> FederatedData:
    """Split ``source`` into ``num_clients`` clients with partition ``scheme``.

    ``public_fraction``: share of every class of the train split set aside (class-balanced) as the
    unlabeled public set, in [0, 1). ``public_size``: instead, exactly this many public samples,
    spread evenly over the classes. ``max_train_samples``: first subsample the train split to this
    many samples, stratified by class. ``partition_params``: keyword parameters of the scheme.
    Everything is deterministic given ``seed``.
    """
    if not isinstance(source, DatasetSource):
        raise TypeError(f"source must be a DatasetSource, got {type(source).__name__}")
    k = _check_int("num_clients", num_clients, 1)
    seed = _check_int("seed", seed, -(2**63))
    if (
        isinstance(public_fraction, bool)
        or not isinstance(public_fraction, (int, float, np.floating))
        or not (0.0 <= float(public_fraction) < 1.0)
    ):
        raise ValueError(
            f"invalid public_fraction={public_fraction!r}: a number in [0, 1) is allowed"
        )
    if public_size is not None:
        public_size = _check_int("public_size", public_size, 0)
        if public_fraction > 0:
            raise ValueError(
                f"give either public_fraction ({public_fraction!r}) or public_size "
                f"({public_size!r}), not both"
            )
    if max_train_samples is not None:
        max_train_samples = _check_int("max_train_samples", max_train_samples, 1)
    params = dict(partition_params or {})

    y_all = source.train.y
    num_classes = int(source.num_classes)
    if y_all.size and (y_all.min() < 0 or y_all.max() >= num_classes):
        raise ValueError(f"{source.name}: train labels outside 0..{num_classes - 1}")

    # 1. optional stratified subsample of the train split
    pool = np.arange(y_all.size, dtype=np.int64)
    if max_train_samples is not None and max_train_samples < pool.size:
        rng = numpy_rng(seed, "data", "subsample")
        class_sizes = np.bincount(y_all, minlength=num_classes)
        take = _apportion(max_train_samples, class_sizes)
        pool = np.sort(
            np.concatenate(
                [
                    rng.choice(np.flatnonzero(y_all == c), size=int(take[c]), replace=False)
                    for c in range(num_classes)
                    if take[c] > 0
                ]
            )
        )

    # 2. class-balanced public carve-out
    y_pool = y_all[pool]
    class_sizes = np.bincount(y_pool, minlength=num_classes)
    rng = numpy_rng(seed, "data", "public")
    if public_size is not None:
        if public_size > pool.size:
            raise ValueError(
                f"invalid public_size={public_size!r}: at most the number of train samples "
                f"({pool.size}) is allowed"
            )
        pub_counts = _balanced_counts(class_sizes, public_size, rng)
    else:
        pub_counts = np.floor(class_sizes * float(public_fraction) + 0.5).astype(np.int64)
    public_parts = [
        rng.choice(pool[y_pool == c], size=int(pub_counts[c]), replace=False)
        for c in range(num_classes)
        if pub_counts[c] > 0
    ]
    public_indices = (
        np.sort(np.concatenate(public_parts)) if public_parts else np.empty(0, np.int64)
    )
    private_pool = np.setdiff1d(pool, public_indices, assume_unique=True)
    if private_pool.size < k:
        raise ValueError(
            f"only {private_pool.size} train samples remain after the public carve-out "
            f"({public_indices.size}), fewer than num_clients={k}"
        )

    # 3. partition the rest
    part = partition_labels(
        scheme, y_all[private_pool], k, numpy_rng(seed, "data", "partition", scheme), **params
    )
    train_indices = [private_pool[ix] for ix in part.client_indices]

    # Always-on audit (not an `assert`, which `python -O` would strip).
    used = np.concatenate(train_indices + [public_indices])
    if np.unique(used).size != used.size or used.size != pool.size:
        raise AssertionError(
            "data split audit failed: public and client train indices overlap or do not cover the "
            "train pool"
        )
    if np.intersect1d(public_indices, np.concatenate(train_indices)).size:
        raise AssertionError("data split audit failed: public indices overlap client indices")

    # 4. client test sets that follow each client's train label distribution
    counts = np.stack([np.bincount(y_all[ix], minlength=num_classes) for ix in train_indices])
    y_test = source.test.y
    rng = numpy_rng(seed, "data", "client_test")
    test_parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in range(num_classes):
        idx = np.flatnonzero(y_test == c)
        total = counts[:, c].sum()
        if idx.size == 0 or total == 0:
            continue
        owner = rng.choice(k, size=idx.size, p=counts[:, c] / total)
        for i in np.unique(owner):
            test_parts[i].append(idx[owner == i])
    test_indices = [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64)
        for p in test_parts
    ]

    return FederatedData(
        name=source.name,
        input_shape=tuple(source.input_shape),
        num_classes=num_classes,
        client_train=[source.train.subset(ix) for ix in train_indices],
        client_test=[source.test.subset(ix) for ix in test_indices],
        public=PublicSet(source.train.x[public_indices], y_all[public_indices]),
        global_test=source.test,
        client_groups=None if part.groups is None else np.array(part.groups),
        train_indices=train_indices,
        public_indices=public_indices,
        test_indices=test_indices,
        scheme=scheme,
        seed=seed,
    )
