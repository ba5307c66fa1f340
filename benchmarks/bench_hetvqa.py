"""HetVQA speed and size: backbone pretraining seconds per model, LoRA local-training seconds per step,
scoring seconds, seconds per round of the 10-client scenarios, and peak memory.

    .venv/bin/python benchmarks/bench_hetvqa.py [--archs vlm_llama_s vlm_llama_m] [--steps 1500]
        [--lora-steps 30] [--batch 8] [--threads 2] [--rounds 2] [--round-configs CONFIG...]

Pretraining runs for real (``use_cache=False``: the time is measured, nothing is read or written in
the cache) with the default recipe unless ``--steps`` changes it; its test exact match on the
pretraining mix is printed too. LoRA steps (rank 8, every language-model linear) are timed on the
pretrained model over a mixed batch of HetVQA examples. "client-round" is a projection:
``local steps x seconds per step + scoring 4 tasks x 50 examples``. Then the first ``--rounds``
rounds of each ``--round-configs`` run for real (the table's configs, FedIT by default; fast
adaptation off; the backbones from the cache, pretrained on first use) and their mean seconds per
round are printed: training (all ten clients), evaluation, and the whole round. Evaluation grows
with the tasks met, so later rounds cost more than the first two. ``--archs`` with no name skips
the pretraining part. Needs HETPFL_DATA_DIR (the Makefile's default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hetpfl.backbones import PretrainRecipe, mean_score, pretrained_backbone
from hetpfl.data import hetvqa as hv
from hetpfl.learn.loop import Objective, optimize
from hetpfl.learn.options import OptimOptions
from hetpfl.learn.vlm import answer_loss, example_batches, score_answers
from hetpfl.models import add_lora, count_flops, count_parameters, trainable_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=["vlm_llama_s", "vlm_gpt_s", "vlm_llama_m", "vlm_gpt_m"])
    parser.add_argument("--steps", type=int, default=PretrainRecipe().steps)
    parser.add_argument("--lora-steps", type=int, default=30)
    parser.add_argument("--local-steps", type=int, default=50, help="local steps per round, for the projection")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each --round-configs run (0: none)")
    parser.add_argument("--round-configs", nargs="*", default=["configs/hetvqa_runs/homo_dynamic/fedit.yaml",
                                                               "configs/hetvqa_runs/sizes_dynamic/fedit.yaml"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if not args.archs:
        for path in args.round_configs if args.rounds else ():
            time_rounds(path, args.rounds, args.threads)
        return
    pool = hv.load_image_pool()
    vocab = hv.vocabulary()
    print(f"image pool: {time.perf_counter() - started:.1f}s ({', '.join(pool.sources)}); torch threads {args.threads}")
    tasks = ["recognize_mnist/0", "same_fashion_mnist/0", "odd_cifar10/0", "sum_digits/0"]
    sets = hv.build_task_sets(pool, vocab, tasks, n_train=200, n_test=50)
    recipe = PretrainRecipe(steps=args.steps)
    print(f"{'arch':12s} {'params':>9s} {'MFLOPs':>7s} {'pretrain s':>10s} {'mix EM':>6s} "
          f"{'LoRA params':>11s} {'s/step':>7s} {'score s':>7s} {'client-round s':>14s}")
    for arch in args.archs:
        t0 = time.perf_counter()
        model = pretrained_backbone(arch, recipe, pool=pool, use_cache=False)
        pretrain_s = time.perf_counter() - t0
        params, flops = count_parameters(model), count_flops(model, hv.IMAGE_SHAPE)
        add_lora(model, rank=8, alpha=16)
        batches = example_batches(pool, [s.train for s in sets.values()], args.batch, np.random.default_rng(0))
        objective = Objective(lambda b, m=model: answer_loss(m, b), trainable_parameters(model), OptimOptions(lr=5e-4),
                              train=(model,))
        optimize(objective, batches, steps=3)  # warm-up
        t0 = time.perf_counter()
        optimize(objective, batches, steps=args.lora_steps)
        per_step = (time.perf_counter() - t0) / args.lora_steps
        t0 = time.perf_counter()
        for s in sets.values():
            score_answers(model, pool, s.test, vocab)
        score_s = time.perf_counter() - t0
        lora = sum(p.numel() for p in trainable_parameters(model))
        print(f"{arch:12s} {params:9,d} {flops / 1e6:7.1f} {pretrain_s:10.1f} {100 * mean_score(model.pretraining):5.1f}% "
              f"{lora:11,d} {per_step:7.3f} {score_s:7.2f} {args.local_steps * per_step + score_s:14.1f}", flush=True)
    for path in args.round_configs if args.rounds else ():
        time_rounds(path, args.rounds, args.threads)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB; total {time.perf_counter() - started:.0f}s")


def time_rounds(path: str, rounds: int, threads: int) -> None:
    """Run the first ``rounds`` rounds of a scenario config and print its mean seconds per round."""
    from hetpfl.experiment import load_config, run_experiment  # noqa: PLC0415

    config = load_config(path, [f"rounds={rounds}", "data.options.adaptation_steps=0", f"runtime.torch_threads={threads}"])
    with tempfile.TemporaryDirectory() as out:
        run_experiment(config, out)
        rows = [json.loads(line) for line in (Path(out) / "timings.jsonl").read_text().splitlines()]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("client_s", "eval_s", "round_s")}
    print(f"{path}: {config.data.num_clients} clients, {rounds} rounds: {mean['round_s']:.1f}s a round "
          f"(training {mean['client_s']:.1f}s, evaluation {mean['eval_s']:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
