"""The processes executor's round trips: hetpfl's worker pool against ``multiprocessing.Pool``.

Both pools (two forked workers) map a task that does nothing but return a 20 kB reply (the size of a
small client's message) over 25, 100 and 1,000 tasks in the executor's chunks (up to 16 per worker),
interleaved, the median of ``--repeats`` maps printed. What it measures is the pools' own overhead,
not training: :mod:`hetpfl.workerpool` replaced ``multiprocessing.Pool`` because the latter hung
when stopped mid-map, and this shows the replacement costs no time.

    .venv/bin/python benchmarks/worker_pool.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import time

from hetpfl.workerpool import WorkerPool


def _no_setup() -> None:
    pass


def _reply(_: int) -> bytes:
    return b"x" * 20_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print("| tasks | chunk | hetpfl WorkerPool ms | multiprocessing.Pool imap ms | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for count in (25, 100, 1000):
        tasks, chunk = list(range(count)), max(1, math.ceil(count / 32))
        ours, stdlib = WorkerPool(2, _no_setup), multiprocessing.get_context("fork").Pool(2)
        ours_s, stdlib_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours.map(_reply, tasks, chunk)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            list(stdlib.imap(_reply, tasks, chunksize=chunk))
            stdlib_s.append(time.perf_counter() - start)
        ours.close()
        stdlib.close()
        stdlib.join()
        a, b = 1000 * statistics.median(ours_s), 1000 * statistics.median(stdlib_s)
        print(f"| {count} | {chunk} | {a:.2f} | {b:.2f} | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
