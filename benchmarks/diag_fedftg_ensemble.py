"""Is FedFTG's teacher better than the model it fine-tunes? Per round: the FedAvg aggregate, the
round's client ensemble (plain and class-level weights) and the aggregate after FedFTG's fine-tuning,
all on 2,000 test images. MNIST alpha 0.1, 3,000 private images, 8 rounds (a few minutes on 1 core).

Usage: .venv/bin/python benchmarks/diag_fedftg_ensemble.py [key=value ...]   (e.g. algorithm.steps=0)
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

from hetpfl.algorithms.datafree import frozen_copies
from hetpfl.algorithms.fedftg import class_shares
from hetpfl.clienthost import ClientHost
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare
from hetpfl.learn import LogitEnsemble, evaluate
from hetpfl.simulator import InProcessTransport

ROUNDS = 8


class Keep:
    """A round's Comm that keeps the replies (the fine-tuning reads them)."""

    def __init__(self, comm: RoundComm) -> None:
        self.comm, self.replies = comm, {}

    def ask(self, stage, messages):
        self.replies.update(self.comm.ask(stage, messages))
        return self.replies


def main(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    config = load_config("configs/mosaic/mnist/a0.1/homogeneous/fedftg.yaml",
                         ["data.max_train_samples=3000", f"rounds={ROUNDS}", *overrides])
    run = prepare(config).run
    server, host = run.make_server(), ClientHost(run)
    x, y = run.data.global_test.x[:2000], run.data.global_test.y[:2000]

    def acc(model: torch.nn.Module) -> float:
        return evaluate(model, x, y)["accuracy"]

    steps = server.config.steps
    for rnd in range(ROUNDS):
        keep = Keep(RoundComm(run, InProcessTransport(host), rnd, Ledger(run.num_clients)))
        server.config = dataclasses.replace(server.config, steps=0)  # FedAvg's part only
        server.round(rnd, list(range(run.num_clients)), keep)
        replies = keep.replies
        server.config = dataclasses.replace(server.config, steps=steps)
        order = sorted(replies)
        counts = np.stack([replies[k].arrays["class_counts"] for k in order])
        models = frozen_copies(server.global_model, [dict(replies[k].arrays) for k in order])
        plain, by_class = acc(LogitEnsemble(models).eval()), acc(LogitEnsemble(models, class_shares(counts)).eval())
        before = acc(server.global_model)
        if steps:
            server.fine_tune(rnd, replies)
        print(f"round {rnd}: aggregate {before:.3f}  ensemble {plain:.3f}  class-level ensemble {by_class:.3f}  "
              f"after fine-tuning {acc(server.global_model):.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
