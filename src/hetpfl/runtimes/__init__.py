"""Runtimes: what carries an experiment's messages. The names in :data:`RUNTIMES` are the values
of ``runtime.name``; each runner takes a :class:`Launch` and returns the run's summary.

* ``simulator``: the in-process simulator (:mod:`hetpfl.simulator`).
* ``flower-sim``: Flower's simulation engine (:mod:`hetpfl.runtimes.flower`; Flower is imported
  only when this runtime is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..engine import CheckpointPolicy, RunSpec
from ..simulator import simulate

RunBuilder = Callable[[str, "str | None"], RunSpec]  # (experiment YAML, data dir) -> the run


@dataclass
class Launch:
    """Everything a runtime needs to run an experiment.

    ``experiment_yaml`` is the resolved config; ``build_run`` rebuilds the run from it on the
    client side of a real federation (a Flower ClientApp receives only the YAML)."""

    run: RunSpec
    experiment_yaml: str = ""
    build_run: RunBuilder | None = None
    client_state: str = "memory"
    executor: str = "sequential"
    workers: int = 0  # executor processes: worker processes (0: one per core)
    on_round: Callable[[dict[str, Any]], None] | None = None
    checkpoint: CheckpointPolicy | None = None
    resume: Path | None = None


def run_in_process(launch: Launch) -> dict[str, Any]:
    return simulate(launch.run, client_state=launch.client_state, executor=launch.executor, workers=launch.workers,
                    on_round=launch.on_round, checkpoint=launch.checkpoint, resume=launch.resume)


def run_on_flower_simulation(launch: Launch) -> dict[str, Any]:
    from .flower import simulate_on_flower  # noqa: PLC0415 (Flower and Ray load only when used)

    return simulate_on_flower(launch)


RUNTIMES: dict[str, Callable[[Launch], dict[str, Any]]] = {
    "simulator": run_in_process,
    "flower-sim": run_on_flower_simulation,
}

__all__ = ["Launch", "RUNTIMES", "RunBuilder", "run_in_process", "run_on_flower_simulation"]
