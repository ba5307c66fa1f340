"""Seconds each clustering rule of the project takes at 10, 100 and 1,000 clients (issue #14).

Inputs are synthetic and grouped the way a label-skewed federation is: every client's public
predictions (``--public`` rows, 10 classes) are its group's prediction matrix plus noise, so the
distance matrices have real structure. Each rule runs on the inputs its method gives it:

* COSMOS: the Frobenius distance matrix, then ``auto_threshold`` (our ε search) and
  ``oracle_threshold`` (the official code's);
* CFL, PACFL, DisUE: ``agglomerative`` (complete linkage) on a cosine / subspace distance matrix,
  cut at 2 clusters (CFL), at a threshold (PACFL), and DisUE's ``best_by_silhouette`` over K;
* PACFL: ``subspace_distance_matrix`` of every client's data signature (``--signature`` vectors);
* COMET, FeSEM: ``kmeans`` of the flattened predictions.

Prints one row per (rule, clients) with the median of ``--repeats`` runs.

    .venv/bin/python benchmarks/clustering_scale.py                 # 10, 100, 1000 clients
    .venv/bin/python benchmarks/clustering_scale.py --clients 1000 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from hetpfl.algorithms.clustering import (
    agglomerative,
    auto_threshold,
    best_by_silhouette,
    cosine_similarity,
    kmeans,
    oracle_threshold,
    pairwise_distances,
    subspace_distance_matrix,
)


def grouped_predictions(n: int, public: int, groups: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.dirichlet(np.full(10, 0.3), size=(groups, public))
    owner = np.arange(n) % groups
    noisy = centres[owner] + rng.normal(0, 0.05, size=(n, public, 10))
    noisy = np.clip(noisy, 1e-6, None)
    return (noisy / noisy.sum(axis=2, keepdims=True)).astype(np.float32)


def signatures(n: int, dim: int, vectors: int, groups: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    bases = [np.linalg.qr(rng.normal(size=(dim, vectors)))[0] for _ in range(groups)]
    return [np.linalg.qr(bases[i % groups] + rng.normal(0, 0.1, size=(dim, vectors)))[0] for i in range(n)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--public", type=int, default=100, help="public inputs per prediction matrix")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--signature", type=int, default=5, help="PACFL signature vectors per client")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'rule':<44} {'clients':>7} {'seconds':>9}")
    for n in args.clients:
        for name, fn in rules(n, args).items():
            print(f"{name:<44} {n:>7} {timed(fn, args.repeats):>9.3f}", flush=True)


def rules(n: int, args: argparse.Namespace) -> dict:
    """Each rule on ``n`` clients' inputs, as a call to time."""
    probs = grouped_predictions(n, args.public, args.groups)
    frob = pairwise_distances(probs)
    cos = 1.0 - cosine_similarity(probs.reshape(n, -1))
    sigs = signatures(n, 64, args.signature, args.groups)
    sub = subspace_distance_matrix(sigs)
    cut = float(np.median(sub))
    return {
        "pairwise_distances (frobenius)": lambda: pairwise_distances(probs),
        "auto_threshold (COSMOS)": lambda: auto_threshold(frob),
        "oracle_threshold (COSMOS, official)": lambda: oracle_threshold(frob, args.groups + 2),
        "agglomerative complete, 2 clusters (CFL)": lambda: agglomerative(cos, "complete", num_clusters=2),
        "agglomerative complete, median cut (PACFL)": lambda: agglomerative(sub, "complete", threshold=cut),
        "subspace_distance_matrix (PACFL)": lambda: subspace_distance_matrix(sigs),
        "best_by_silhouette K<=8 (DisUE)": lambda: best_by_silhouette(
            cos, lambda k: agglomerative(cos, "average", num_clusters=k), 8),
        "kmeans k=4 (COMET, FeSEM)": lambda: kmeans(probs.reshape(n, -1), 4, np.random.default_rng(0)),
    }


if __name__ == "__main__":
    main()
