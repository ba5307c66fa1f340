"""Diagnostic: is DisUE's teacher better than the plain average it is distilled into?

Replays the first rounds of a DisUE config (default: configs/disue/fmnist_a0.1/disue.yaml) with the
server's own sampling rule replaced by a fixed seeded draw, and prints per round, on the first 3,000
global test images:
  - the FedAvg average of the round's uploads (the universal expert before distillation);
  - the ensembles of the round's cluster experts in logit and probability space, weighted uniformly,
    by cluster size and per logit class (``class``), the share of images the plain logit mean gives its
    most common class, and the best single expert;
  - after the configured distillation: how far it moved the weights (‖distilled − average‖, against
    ‖average − start‖ of the round's federated update) and the universal expert's accuracy.

Usage: HETPFL_DATA_DIR=../shared/data .venv/bin/python benchmarks/diag_disue_teacher.py [CONFIG] [--rounds 5]
       [--set algorithm.expert_weights=uniform ...]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from hetpfl.algorithms.datafree import class_shares
from hetpfl.algorithms.weights import flat_weights, shared_arrays
from hetpfl.clienthost import ClientHost
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare
from hetpfl.simulator import InProcessTransport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/disue/fmnist_a0.1/disue.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    run = prepare(load_config(args.config, args.set)).run
    server, host = run.make_server(), ClientHost(run)
    x, y = torch.as_tensor(run.data.global_test.x[:3000]), run.data.global_test.y[:3000]
    per_round = max(1, round(run.participation * run.num_clients))
    rng = np.random.default_rng(0)
    distill, steps = server.distill, server.config.distill_steps

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(-1).numpy() == y).mean())

    def report(rnd, replies, labels, states, sizes):
        arch = run.client_archs[0]
        start = flat_weights(shared_arrays(server.universal[arch]))
        server.config = dataclasses.replace(server.config, distill_steps=0)
        distill(rnd, replies, labels, states, sizes)  # the average alone
        average = flat_weights(shared_arrays(server.universal[arch]))
        experts = sorted(set(labels.values()))
        counts = np.stack([sum(replies[i].arrays["class_counts"].astype(np.float64) for i in labels if labels[i] == k)
                           for k in experts])
        with torch.no_grad():
            avg_acc = accuracy(server.universal[arch].eval()(x))
            logits = torch.stack([server.models[k].eval()(x) for k in experts])
            probs = logits.softmax(-1)
            by_size = torch.tensor(counts.sum(1) / counts.sum(), dtype=torch.float32)[:, None, None]
            by_class = torch.tensor(class_shares(counts))[:, None, :]
            ensembles = {f"{space} {name}": accuracy((w * t).sum(0) if w is not None else t.mean(0))
                         for space, t in (("logits", logits), ("probs", probs))
                         for name, w in (("uniform", None), ("size", by_size), ("class", by_class))}
            best = max(accuracy(t) for t in logits)
            top_share = float(np.bincount(logits.mean(0).argmax(-1).numpy()).max() / len(y))
        server.config = dataclasses.replace(server.config, distill_steps=steps)
        measures = distill(rnd, replies, labels, states, sizes)  # average again, then distill as configured
        after = flat_weights(shared_arrays(server.universal[arch]))
        with torch.no_grad():
            distilled_acc = accuracy(server.universal[arch].eval()(x))
        print(f"round {rnd}: K={len(experts)}  average {avg_acc:.3f}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in ensembles.items())
              + f"  (logit mean: {top_share:.0%} one class)  best expert {best:.3f}  |average-start| {np.linalg.norm(average - start):.2f}"
              f"  |distilled-average| {np.linalg.norm(after - average):.2f}  distilled {distilled_acc:.3f}", flush=True)
        return measures

    server.distill = report
    for rnd in range(args.rounds):
        clients = sorted(rng.choice(run.num_clients, per_round, replace=False).tolist())
        server.round(rnd, clients, RoundComm(run, InProcessTransport(host), rnd, Ledger(run.num_clients)))


if __name__ == "__main__":
    main()
