"""How FedMD and COSMOS scale with the number of clients on MNIST (issue #14, benchmark 3).

For N = 10, 100 and 1,000 clients (a tenth of them sampled each round at 1,000: ``--participation``),
each method runs ``--rounds`` rounds as its own ``hetpfl run`` process on MNIST's 60,000 training
images split Dirichlet(0.5) over the clients, a public set of ``--public`` images and MLP clients.
Reported: seconds per round without the server's clustering phase (median
over rounds 1..), seconds per participating client, the clustering's seconds, and the process's peak
resident memory of the run's process (``wait4``; with the sequential executor, the default, that
is the whole run).

    HETPFL_DATA_DIR=../shared/data .venv/bin/python benchmarks/scale.py
    HETPFL_DATA_DIR=../shared/data .venv/bin/python benchmarks/scale.py --clients 1000 --methods cosmos
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(method: str, clients: int, participation: float, args: argparse.Namespace, out: Path) -> dict:
    sets = {
        "name": f"scale-{method}-{clients}", "rounds": args.rounds, "participation": participation,
        "algorithm.name": method, "data.dataset": "mnist", "data.num_clients": clients,
        "data.partition": "dirichlet", "data.dirichlet_alpha": 0.5, "data.public_size": args.public,
        "models.clients": "[mlp]", "client.local_epochs": 1, "runtime.executor": args.executor,
        "runtime.client_state": args.client_state,
    }
    if method == "cosmos":
        sets.update({"algorithm.server_arch": "mlp", "algorithm.server_epochs": 1})
    command = [sys.executable, "-m", "hetpfl.cli", "run", "configs/default.yaml", "-o", str(out), "--overwrite"]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)  # this child's (and its waited-for children's) peak RSS
    err = child.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"scale run failed: {' '.join(command)}\n{err[-2000:]}")
    rows = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    clustering = [r.get("phase_s", {}).get("clustering", 0.0) for r in rows]
    rounds = [r["round_s"] - c for r, c in zip(rows, clustering)]
    steady = statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]
    sampled = max(1, round(participation * clients))
    return {"round_s": steady, "per_client_s": steady / sampled, "clustering_s": statistics.median(clustering),
            "peak_rss_mib": usage.ru_maxrss / 1024, "sampled": sampled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["fedmd", "cosmos"])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--participation", type=float, default=0.1, help="fraction sampled per round at 1,000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--public", type=int, default=1000, help="public images")
    parser.add_argument("--executor", default="sequential", help="sequential: the peak RSS is the whole run's")
    parser.add_argument("--client-state", default="memory")
    args = parser.parse_args()
    print("| method | clients | sampled per round | s per round (clustering apart) | s per sampled client | "
          "clustering s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for n in args.clients:
                participation = args.participation if n >= 1000 else 1.0
                r = one_run(method, n, participation, args, Path(tmp) / f"{method}-{n}")
                print(f"| {method} | {n} | {r['sampled']} | {r['round_s']:.2f} | {r['per_client_s']:.3f} | "
                      f"{r['clustering_s']:.2f} | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
