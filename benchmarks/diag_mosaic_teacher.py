"""Is Mosaic's teacher better than the global model it is distilled into? After 8 FedAvg rounds
(prototypes from the last 3): each class expert, their plain average and the EMA meta model (trained
150 and 600 steps) against the global model, on 2,000 test images. MNIST alpha 0.1, 3,000 private
images; generators are skipped (the meta model does not read them). A few minutes on 1 core.

Usage: .venv/bin/python benchmarks/diag_mosaic_teacher.py [--rounds N] [key=value ...]
       (e.g. client.optimizer=sgd client.lr=0.05 client.momentum=0.9)
The code's client schedule (I = 10 plain SGD steps at lr 0.01, batch 64, weight decay 1e-4) from a
converged model: ``--rounds 200 client.optimizer=sgd client.lr=0.01 client.momentum=0
client.weight_decay=0.0001 client.local_steps=10 client.batch_size=64``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from hetpfl.clienthost import ClientHost
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare
from hetpfl.learn import LogitEnsemble, evaluate
from hetpfl.simulator import InProcessTransport



def main(rounds: int, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    config = load_config("configs/mosaic/mnist/a0.1/homogeneous/mosaic.yaml", [
        "data.max_train_samples=3000", f"rounds={rounds + 1}", f"algorithm.warmup_rounds={rounds + 1}",
        "algorithm.generator_epochs=0.01", "algorithm.generator_min_steps=0", "algorithm.classifier_epochs=0",
        f"algorithm.prototype_rounds={max(4, rounds // 5)}", *overrides])
    run = prepare(config).run
    server, host = run.make_server(), ClientHost(run)
    x, y = run.data.global_test.x[:2000], run.data.global_test.y[:2000]

    def acc(model: torch.nn.Module) -> float:
        return evaluate(model, x, y)["accuracy"]

    for rnd in range(rounds):  # warm-up ends after the last round: no distillation happens here
        server.round(rnd, list(range(run.num_clients)), RoundComm(run, InProcessTransport(host), rnd,
                                                                  Ledger(run.num_clients)))
        if rnd % max(1, rounds // 10) == 0 or rnd == rounds - 1:
            print(f"round {rnd}: global {acc(server.global_model):.3f}, prototypes {len(server.prototype_labels)}",
                  flush=True)
    experts = server.expert_models()
    print("experts:", " ".join(f"{acc(e):.3f}" for e in experts))
    print(f"plain average of the experts: {acc(LogitEnsemble(experts).eval()):.3f}")
    for steps in (150, 600):
        server.config = dataclasses.replace(server.config, meta_steps=steps)
        teacher, loss = server.teacher(experts, [])
        print(f"meta model, {steps} steps: train loss {loss:.3f}, EMA teacher {acc(teacher):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="FedAvg rounds before the teacher is built")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    main(args.rounds, args.overrides)
