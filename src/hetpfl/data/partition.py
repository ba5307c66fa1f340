"""Label-based partitions of a dataset among federated clients.

Every partitioner takes the label array, the number of clients and a ``np.random.Generator`` and
returns a :class:`Partition`: one sorted int64 index array per client, pairwise disjoint, whose
union is every position ``0 .. len(labels)-1``. All randomness comes from the generator, so one
generator state gives one partition.

Schemes (``PARTITIONERS``):

* ``iid``: a random equal split (sizes differ by at most one).
* ``dirichlet(alpha=0.5, min_size=None, max_retries=100)``: for every class, a Dirichlet(alpha)
  draw over the clients decides how that class's samples are split (Hsu et al. 2019). Draws are
  repeated (at most ``max_retries`` times) until every client holds ``min_size`` samples; if that
  never happens, samples are moved one by one from the currently largest client to the clients
  still below ``min_size`` (so the guarantee always holds and the loop always ends).
  ``min_size=None`` means ``min(10, n // num_clients)``.
* ``shards(classes_per_client=2)``: the pathological split of McMahan et al.: sort by label, cut
  into ``num_clients * classes_per_client`` shards, give every client ``classes_per_client``
  random shards (so a client sees about that many classes).
* ``cosmos(num_groups=5, alpha=5.0, mix_fraction=0.1)``: the COSMOS scheme (methods.md, 1.4):
  consecutive class ids form ``num_groups`` groups, clients are assigned to groups round-robin
  (client ``i`` is in group ``i % num_groups``), every class of a group is split among that
  group's clients by Dirichlet(alpha) over them; then ``mix_fraction`` of every client's samples
  go into a pool that is shuffled and dealt back evenly to all clients. ``Partition.groups``
  holds each client's group.
* ``quantity_skew(alpha=1.0, min_size=None)``: client sizes proportional to a Dirichlet(alpha)
  draw (on top of ``min_size`` each), labels IID.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetpfl.configuration import check_keys
from hetpfl.data._common import apportion, check_fraction, check_int, check_positive

__all__ = ["PARTITIONERS", "Partition", "partition_labels"]


@dataclass(frozen=True, eq=False)
class Partition:
    """Client index arrays (sorted int64, disjoint, covering every position) and optional groups."""

    client_indices: list[np.ndarray]
    groups: np.ndarray | None = None  # true group id per client (COSMOS scheme), else None

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    def sizes(self) -> np.ndarray:
        """Number of samples of every client."""
        return np.array([len(ix) for ix in self.client_indices], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels is empty: there is nothing to partition")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def _check_common(labels: Any, num_clients: Any, rng: Any) -> tuple[np.ndarray, int]:
    y = _check_labels(labels)
    k = check_int("num_clients", num_clients, 1)
    if k > y.size:
        raise ValueError(
            f"invalid num_clients={num_clients!r}: at most the number of samples ({y.size}) is allowed"
        )
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return y, k


def _resolve_min_size(min_size: Any, n: int, k: int) -> int:
    if min_size is None:
        return min(10, n // k)
    m = check_int("min_size", min_size, 0)
    if m * k > n:
        raise ValueError(
            f"invalid min_size={min_size!r}: num_clients * min_size = {k} * {m} = {m * k} exceeds "
            f"the number of samples ({n}); at most {n // k} is allowed"
        )
    return m


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _finish(
    parts: list[np.ndarray] | list[list[int]], groups: np.ndarray | None = None
) -> Partition:
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    return Partition(
        client_indices=out, groups=None if groups is None else np.asarray(groups, dtype=np.int64)
    )


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """A Dirichlet(alpha * 1_k) draw that is never NaN (tiny alpha can underflow every gamma)."""
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p


def _split(idx: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(idx, np.cumsum(counts)[:-1])


# --------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------


def iid_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> Partition:
    """A random equal split of all samples (client sizes differ by at most one)."""
    y, k = _check_common(labels, num_clients, rng)
    return _finish(np.array_split(rng.permutation(y.size), k))


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    min_size: int | None = None,
    max_retries: int = 100,
) -> Partition:
    """Per class, split its samples among clients by a Dirichlet(alpha) draw; every client gets
    at least ``min_size`` samples (redraws, then deterministic moves from the largest clients)."""
    y, k = _check_common(labels, num_clients, rng)
    alpha = check_positive("alpha", alpha)
    m = _resolve_min_size(min_size, y.size, k)
    retries = check_int("max_retries", max_retries, 0)
    classes = np.unique(y)
    class_idx = [np.flatnonzero(y == c) for c in classes]

    counts = np.zeros((classes.size, k), dtype=np.int64)
    for _attempt in range(retries + 1):
        for ci, idx in enumerate(class_idx):
            counts[ci] = apportion(idx.size, _dirichlet(rng, alpha, k))
        if counts.sum(axis=0).min() >= m:
            break
    else:
        # Repair: move samples one at a time from the currently largest client (lowest id on ties)
        # to each client below m. Since n >= k * m, the largest client always holds more than m
        # while another client holds fewer, so it stays >= m and every move lowers the deficit.
        sizes = counts.sum(axis=0)
        for j in range(k):
            while sizes[j] < m:
                d = int(np.argmax(sizes))
                c = int(rng.choice(classes.size, p=counts[:, d] / sizes[d]))
                counts[c, d] -= 1
                counts[c, j] += 1
                sizes[d] -= 1
                sizes[j] += 1

    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for ci, idx in enumerate(class_idx):
        for i, chunk in enumerate(_split(rng.permutation(idx), counts[ci])):
            parts[i].append(chunk)
    return _finish([np.concatenate(p) if p else np.empty(0, np.int64) for p in parts])


def shards_partition(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    classes_per_client: int = 2,
) -> Partition:
    """Sort by label, cut into ``num_clients * classes_per_client`` shards, deal
    ``classes_per_client`` random shards to every client."""
    y, k = _check_common(labels, num_clients, rng)
    s = check_int("classes_per_client", classes_per_client, 1)
    num_shards = k * s
    if num_shards > y.size:
        raise ValueError(
            f"invalid classes_per_client={classes_per_client!r}: num_clients * classes_per_client = "
            f"{num_shards} shards exceeds the number of samples ({y.size}); at most "
            f"{y.size // k} is allowed"
        )
    order = rng.permutation(y.size)
    order = order[np.argsort(y[order], kind="stable")]  # sorted by label, random within a label
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards)
    return _finish(
        [np.concatenate([shards[j] for j in deal[i * s : (i + 1) * s]]) for i in range(k)]
    )


def cosmos_partition(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    num_groups: int = 5,
    alpha: float = 5.0,
    mix_fraction: float = 0.1,
) -> Partition:
    """The COSMOS partition: class groups of consecutive ids, clients round-robin over groups,
    Dirichlet(alpha) split of each group's classes among its clients, then ``mix_fraction`` of
    every client's samples pooled, shuffled and dealt back evenly to all clients."""
    y, k = _check_common(labels, num_clients, rng)
    g = check_int("num_groups", num_groups, 1)
    alpha = check_positive("alpha", alpha)
    mix = check_fraction("mix_fraction", mix_fraction)
    classes = np.unique(y)
    if g > classes.size:
        raise ValueError(
            f"invalid num_groups={num_groups!r}: at most the number of classes present "
            f"({classes.size}) is allowed"
        )
    if k < g:
        raise ValueError(
            f"invalid num_clients={num_clients!r} for num_groups={g}: at least num_groups "
            f"clients are needed (one group per client at least)"
        )
    class_groups = np.array_split(classes, g)
    groups = np.arange(k, dtype=np.int64) % g

    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for gi in range(g):
        members = np.flatnonzero(groups == gi)
        for c in class_groups[gi]:
            idx = rng.permutation(np.flatnonzero(y == c))
            counts = apportion(idx.size, _dirichlet(rng, alpha, members.size))
            for i, chunk in zip(members, _split(idx, counts)):
                parts[i].append(chunk)
    owned = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]

    if mix > 0:
        kept, pooled = [], []
        for own in owned:
            own = rng.permutation(own)
            take = math.floor(mix * own.size + 0.5)
            pooled.append(own[:take])
            kept.append(own[take:])
        pool = rng.permutation(np.concatenate(pooled))
        chunks = np.array_split(pool, k)
        receivers = rng.permutation(k)
        for chunk, i in zip(chunks, receivers):
            kept[i] = np.concatenate([kept[i], chunk])
        owned = kept
    return _finish(owned, groups)


def quantity_skew_partition(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 1.0,
    min_size: int | None = None,
) -> Partition:
    """Client sizes = ``min_size`` + a share of the rest proportional to a Dirichlet(alpha) draw;
    which samples a client gets is uniformly random (labels IID)."""
    y, k = _check_common(labels, num_clients, rng)
    alpha = check_positive("alpha", alpha)
    m = _resolve_min_size(min_size, y.size, k)
    sizes = m + apportion(y.size - m * k, _dirichlet(rng, alpha, k))
    return _finish(_split(rng.permutation(y.size), sizes))


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "shards": shards_partition,
    "cosmos": cosmos_partition,
    "quantity_skew": quantity_skew_partition,
}


def _params_of(fn: Callable[..., Partition]) -> list[str]:
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def partition_labels(
    scheme: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    **params: Any,
) -> Partition:
    """Partition the positions of ``labels`` among ``num_clients`` clients with ``scheme``.

    ``scheme`` is a key of :data:`PARTITIONERS`; ``params`` are that scheme's parameters (see the
    module docstring). Raises ``ValueError`` naming the offending value for an unknown scheme or
    parameter name (a :class:`~hetpfl.configuration.ConfigError` naming the scheme, the parameter
    and the allowed ones), or an invalid parameter value.
    """
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(PARTITIONERS)}")
    fn = PARTITIONERS[scheme]
    check_keys(f"partitions.{scheme}", params, _params_of(fn), what="parameter")
    return fn(labels, num_clients, rng, **params)
