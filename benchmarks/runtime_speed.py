"""Whole-run and steady-state-round wall time of shipped experiments, for each way of running them
(issue #14, benchmark 2).

Each variant runs the config as its own ``hetpfl run`` process (so start-up, imports and Ray count),
interleaved: repeat 1 of every variant, then repeat 2, ..., so a slow spell of the machine hits all
of them alike. Reported per variant: the median whole-process wall time, the median steady-state
round (the median of rounds 1.. of each run, then the median over runs), the final accuracy (the
executors give identical records; the kernels differ in the low bits), and ratios against
``today`` (the sequential simulator with the former kernels) and against Flower's simulation engine.

    .venv/bin/python benchmarks/runtime_speed.py configs/cosmos/mnist/cosmos.yaml --set rounds=4
    .venv/bin/python benchmarks/runtime_speed.py configs/default.yaml --repeats 3

Say what else ran on the machine beside it: the figures mean nothing otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HETPFL = [sys.executable, "-m", "hetpfl.cli"]

#: name -> the --set options that select it
VARIANTS = {
    "today (sequential, reference kernels)": ["runtime.executor=sequential", "runtime.kernels=reference"],
    "sequential, fast kernels": ["runtime.executor=sequential", "runtime.kernels=fast"],
    "batched, fast kernels": ["runtime.executor=batched", "runtime.kernels=fast"],
    "processes, fast kernels": ["runtime.executor=processes", "runtime.kernels=fast"],
    "flower-sim, reference kernels": ["runtime.name=flower-sim", "runtime.kernels=reference"],
    "flower-sim, fast kernels": ["runtime.name=flower-sim", "runtime.kernels=fast"],
}
TODAY = "today (sequential, reference kernels)"


def one_run(config: str, sets: list[str], out: Path) -> dict:
    command = [*HETPFL, "run", config, "-o", str(out), "--overwrite"] + [x for s in sets for x in ("--set", s)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    summary = json.loads((out / "summary.json").read_text())
    accuracy = summary["final"].get("personalized_acc_mean", float("nan"))
    return {"wall": wall, "steady": statistics.median(r["round_s"] for r in steady), "accuracy": accuracy,
            "in_rounds": sum(r["round_s"] for r in rows),
            **{part: statistics.median(r[f"{part}_s"] for r in steady) for part in ("client", "server", "eval")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in args.variants:
                result = one_run(args.config, args.sets + VARIANTS[variant], Path(tmp) / f"{repeat}-{len(results[variant])}")
                results[variant].append(result)
                print(f"repeat {repeat + 1}: {variant}: {result['wall']:.1f} s, steady round {result['steady']:.2f} s",
                      file=sys.stderr, flush=True)
    medians = {v: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for v, runs in results.items()}
    flower = next((v for v in ("flower-sim, fast kernels", "flower-sim, reference kernels") if v in medians), None)
    print(f"{args.config} {' '.join(args.sets)}: medians of {args.repeats} interleaved repeats, {os.cpu_count()} cores")
    print(f"| variant | whole run s | steady round s | final accuracy | whole run vs today | steady vs today |"
          f"{' whole run vs ' + flower + ' |' if flower else ''}")
    print("|---|---|---|---|---|---|" + ("---|" if flower else ""))
    for variant, m in medians.items():
        row = (f"| {variant} | {m['wall']:.1f} | {m['steady']:.2f} | {100 * m['accuracy']:.2f} | "
               f"{medians[TODAY]['wall'] / m['wall']:.2f}× | {medians[TODAY]['steady'] / m['steady']:.2f}× |"
               if TODAY in medians else f"| {variant} | {m['wall']:.1f} | {m['steady']:.2f} | {100 * m['accuracy']:.2f} | | |")
        if flower:
            row += f" {medians[flower]['wall'] / m['wall']:.2f}× |"
        print(row)
    print()
    print("| variant | outside the rounds s (start-up, data, Ray) | steady round: client stages s | server s | "
          "evaluation s |")
    print("|---|---|---|---|---|")
    for variant, m in medians.items():
        print(f"| {variant} | {m['wall'] - m['in_rounds']:.1f} | {m['client']:.2f} | {m['server']:.2f} | {m['eval']:.2f} |")


if __name__ == "__main__":
    main()
