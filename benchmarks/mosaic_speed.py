"""Where a Mosaic run's time goes, and what one generator epoch costs per client.

Usage:
    .venv/bin/python benchmarks/mosaic_speed.py CONFIG.yaml [--set key=value ...] [-o OUT]
    .venv/bin/python benchmarks/mosaic_speed.py --from RUN_DIR      # a finished run's results folder

Runs the config (a Mosaic config, e.g. configs/mosaic/cifar10/a0.1/homogeneous/mosaic.yaml) unless
``--from`` names a finished run, then prints: the whole run's wall time; the share of it spent in each
part — client generators (the ``generator`` stage, plus the server receiving them), FedAvg rounds
(the ``train`` stage and its aggregation), the meta model, the distillation, evaluation — and the
seconds per generator epoch per client (the generator stage's time / clients / epochs). Read the
figures with what else ran on the machine beside them (say so when you report them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def report(run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    import yaml  # noqa: PLC0415

    cfg = yaml.safe_load(config)
    stages, phases = summary.get("time_by_stage_s", {}), summary.get("time_by_phase_s", {})
    wall = summary["wall_time_s"]
    generators = stages.get("generator", 0.0)
    parts = {
        "client generators (generator stage)": generators,
        "FedAvg rounds (train stage)": stages.get("train", 0.0),
        "server: receiving generators": phases.get("generators", 0.0) - generators,
        "server: meta model": phases.get("meta_model", 0.0),
        "server: distillation": phases.get("distillation", 0.0),
        "evaluation": summary.get("time_eval_s", 0.0),
    }
    other = wall - sum(parts.values())
    lines = [f"run: {run_dir}  ({summary['algorithm']} on {summary['dataset']}, {summary['num_clients']} clients, "
             f"{summary['rounds']} rounds)", f"wall time: {wall:.1f} s", ""]
    lines.append(f"{'part':40s} {'seconds':>9s} {'share':>7s}")
    for name, seconds in [*parts.items(), ("other (server aggregation, bookkeeping)", other)]:
        lines.append(f"{name:40s} {seconds:9.1f} {100 * seconds / wall:6.1f}%")
    epochs = float(cfg["algorithm"].get("generator_epochs", 10.0))
    clients = int(summary["num_clients"])
    if generators and epochs:
        lines.append("")
        lines.append(f"seconds per generator epoch per client (incl. its private classifier): "
                     f"{generators / clients / epochs:.2f}  ({generators:.1f} s / {clients} clients / {epochs:g} epochs)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("-o", "--out", default="runs/mosaic_speed")
    parser.add_argument("--from", dest="run_dir")
    args = parser.parse_args()
    if args.run_dir:
        print(report(Path(args.run_dir)))
        return
    if not args.config:
        parser.error("give a config, or --from RUN_DIR")
    from hetpfl.experiment import load_config, run_experiment  # noqa: PLC0415

    run_experiment(load_config(args.config, args.set), args.out)
    print(report(Path(args.out)))


if __name__ == "__main__":
    main()
