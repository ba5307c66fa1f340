"""Local-training throughput of the simulator: samples/s and GFLOP/s per model, dataset, client count
and executor (issue #14, benchmark 1).

For each (model, dataset, N clients) a FedAvg run of two rounds trains every client for one epoch
on its own ``--per-client`` samples (IID, batch 32, Adam); the second round's training stage is
timed (the first warms up). Three ways of running it:

* ``sequential/reference``: the simulator as it was (one client after another, the former kernels);
* ``sequential/fast``: the default kernels (fused optimizer updates, channels-last conv nets);
* ``processes/fast``: the clients spread over one worker process per core;
* ``batched/fast``: each group of same-architecture clients trained as one stacked model
  (``mlp`` and the plain ``cnn_*`` nets; others run as ``sequential/fast``).

GFLOP/s counts a training sample as 3× its forward FLOPs (forward + two backward products) and is
set against the fp32 and bf16 matrix-product peaks measured here (one thread, and all cores).

    .venv/bin/python benchmarks/speed.py                               # the full table (~10 min)
    .venv/bin/python benchmarks/speed.py --models mlp --datasets digits --clients 1 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hetpfl.experiment import load_config, run_experiment
from hetpfl.models import ModuleSpec, build_module, count_flops

VARIANTS = {"sequential/reference": ("sequential", "reference"), "sequential/fast": ("sequential", "fast"),
            "processes/fast": ("processes", "fast"), "batched/fast": ("batched", "fast")}
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28)}


def matmul_peak(dtype: torch.dtype, threads: int, size: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s of ``size``² matrix products in ``dtype`` on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        done += 1
    elapsed = time.perf_counter() - started
    torch.set_num_threads(before)
    return 2 * size**3 * done / elapsed / 1e9


def training_seconds(model: str, dataset: str, clients: int, per_client: int, executor: str,
                     kernels: str) -> tuple[float, int]:
    """Seconds of the second round's training stage of an N-client FedAvg run, and its samples."""
    total = clients * per_client
    config = load_config(base={
        "name": "speed", "seed": 0, "rounds": 2, "eval_every": 100,
        "algorithm": {"name": "fedavg"},
        "data": {"dataset": dataset, "num_clients": clients, "partition": "iid", "public_fraction": 0.0,
                 "max_train_samples": total},
        "models": {"clients": [model]},
        "client": {"local_epochs": 1, "batch_size": 32, "lr": 0.001},
        "runtime": {"executor": executor, "kernels": kernels},
    })
    with tempfile.TemporaryDirectory() as out:
        summary = run_experiment(config, Path(out) / "run")
        rows = [json.loads(line) for line in (Path(out) / "run" / "timings.jsonl").read_text().splitlines()]
    stages = rows[-1]["stage_s"]
    return sum(v for k, v in stages.items() if k != "evaluate"), sum(c["n_train"] for c in summary["clients"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn_small", "resnet_small"])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=sorted(SHAPES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 25, 100])
    parser.add_argument("--per-client", type=int, default=64, help="training samples per client")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats per setting (the median is shown)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    peaks = {(name, t): matmul_peak(dtype, t) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
             for t in (1, cores)}
    print("matrix-product peaks (GFLOP/s, 1024²): " + ", ".join(f"{n} {t} thread{'s' * (t > 1)} {v:.1f}"
                                                             for (n, t), v in peaks.items()))
    print("(digits has 1,797 images: at 25 and 100 clients each client holds fewer than --per-client)")
    print(f"{'model':<13} {'data':<7} {'N':>4} {'variant':<21} {'samples/s':>10} {'GFLOP/s':>8} "
          f"{'%fp32 all':>9} {'%bf16 all':>9} {'vs first':>8}")
    for model in args.models:
        for dataset in args.datasets:
            shape = SHAPES[dataset]
            flops = count_flops(build_module(ModuleSpec.parse(model), shape, 10, "image"), shape)
            for n in args.clients:
                first = None
                variants = [v for v in args.variants if n > 1 or VARIANTS[v][0] == "sequential"]  # 1 client: nothing to spread
                timings: dict[str, list[float]] = {v: [] for v in variants}
                for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
                    for variant in variants:
                        seconds, samples = training_seconds(model, dataset, n, args.per_client, *VARIANTS[variant])
                        timings[variant].append(seconds)
                for variant in variants:
                    seconds = statistics.median(timings[variant])
                    rate = samples / seconds
                    gflops = 3 * flops * rate / 1e9
                    first = first or rate
                    print(f"{model:<13} {dataset:<7} {n:>4} {variant:<21} {rate:>10.0f} {gflops:>8.2f} "
                          f"{100 * gflops / peaks['fp32', cores]:>8.1f}% {100 * gflops / peaks['bf16', cores]:>8.1f}% "
                          f"{rate / first:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
