"""Experiments: a config → a prepared run → a runtime → a results folder.

The config lives in :mod:`hetpfl.config`, the preparation in :mod:`hetpfl.prepare`; this module
runs a prepared experiment on its configured runtime (:data:`hetpfl.runtimes.RUNTIMES`) and
writes the results folder. A run with ``runtime.checkpoint_every > 0`` saves itself under
``<out>/checkpoints/`` and can go on from the newest checkpoint with ``resume=True``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, runfolder
from .config import ExperimentConfig, config_yaml, load_config
from .configuration import ConfigError
from .engine import HEATMAPS, VISUALS, CheckpointPolicy, latest_checkpoint
from .executors import worker_count
from .numerics import portable_numerics_active
from .prepare import Prepared, prepare, run_from_yaml
from .runfolder import CHECKPOINTS
from .runtimes import RUNTIMES, Launch



def execute(prepared: Prepared, on_round: Callable[[dict[str, Any]], None] | None = None, *,
            checkpoint: CheckpointPolicy | None = None, resume: Path | None = None) -> dict[str, Any]:
    """Run a prepared experiment on its configured runtime and return the summary."""
    runtime = prepared.config.runtime
    import torch  # noqa: PLC0415

    torch.set_num_threads(runtime.torch_threads)
    launch = Launch(run=prepared.run, experiment_yaml=config_yaml(prepared.config), build_run=run_from_yaml,
                    client_state=runtime.client_state, executor=runtime.executor, workers=runtime.workers,
                    on_round=on_round,
                    checkpoint=checkpoint, resume=resume)
    return RUNTIMES[runtime.name](launch)


def _keep_rounds_before(path: Path, next_round: int) -> None:
    """Drop the lines of rounds a resumed run will write again (a crash may have left some, the
    last one possibly cut short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["round"] < next_round:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_prepared: Callable[[Prepared], None] | None = None,
    runner: Callable[..., dict[str, Any]] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare, run, and write ``config.yaml``, ``metrics.jsonl``, ``summary.json``, plots and
    ``status.json`` (:mod:`hetpfl.runfolder`: ``running``, then ``complete`` or ``failed``).

    ``runner(prepared, on_round=...)`` runs the rounds (default :func:`execute`); the Flower
    deployment ServerApp passes its own, so a deployment writes the very same folder.
    ``resume``: go on from the newest checkpoint in ``out_dir/checkpoints`` (the records of the
    rounds it holds are kept, later ones are written again), ending with the same records as an
    uninterrupted run. A folder holding another run is refused unless ``overwrite`` or ``resume``.
    """
    out = Path(out_dir)
    runfolder.check(out, overwrite=overwrite, resume=resume)
    if resume and config.runtime.checkpoint_every == 0:
        raise ConfigError(f"cannot resume {out}: its run keeps no checkpoints (run with runtime.checkpoint_every > 0)")
    # killed before its first checkpoint (none yet): the run starts again from round 0, in its own folder
    start = latest_checkpoint(out / CHECKPOINTS) if resume else None
    started = time.perf_counter()
    prepared = prepare(config)  # config errors found here leave no file behind
    if on_prepared is not None:
        on_prepared(prepared)
    run_id = runfolder.start(out, overwrite=overwrite, resume=resume)
    try:
        summary = _run_into(out, prepared, run_id, started, on_round, runner, start)
    except BaseException as exc:
        ended = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        runfolder.update(out, status=ended, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    runfolder.update(out, status="complete")
    return summary


def _run_into(out: Path, prepared: Prepared, run_id: str, started: float,
              on_round: Callable[[dict[str, Any]], None] | None, runner: Callable[..., dict[str, Any]] | None,
              start: Path | None) -> dict[str, Any]:
    from .plots import plot_run, save_heatmap, save_image_grid  # noqa: PLC0415

    config = prepared.config
    runtime = config.runtime
    checkpoint = (CheckpointPolicy(out / CHECKPOINTS, runtime.checkpoint_every, runtime.keep_checkpoints)
                  if runtime.checkpoint_every > 0 else None)
    resume = start is not None
    if resume:
        next_round = int(json.loads((start / "run.json").read_text())["state"]["next_round"])
        for name in ("metrics.jsonl", "timings.jsonl"):
            _keep_rounds_before(out / name, next_round)
    (out / "config.yaml").write_text(config_yaml(config))
    data_facts = _data_facts(prepared)  # before the run: an isolated run's process withholds the clients' data
    setup_s = time.perf_counter() - started
    mode = "a" if resume else "w"
    with (out / "metrics.jsonl").open(mode) as metrics, (out / "timings.jsonl").open(mode) as timings:

        def record(row: dict[str, Any]) -> None:
            measures = {k: v for k, v in row.items() if k != "timing"}
            metrics.write(json.dumps(measures) + "\n")
            timings.write(json.dumps({"round": row["round"], **row.get("timing", {})}) + "\n")
            metrics.flush()
            timings.flush()
            runfolder.update(out, rounds_done=row["round"] + 1)
            if on_round is not None:
                on_round(row)

        if runner is not None:
            summary = runner(prepared, on_round=record)
        else:
            summary = execute(prepared, on_round=record, checkpoint=checkpoint, resume=start)
    runtime_name = summary.pop("runtime", runtime.name)
    visuals = summary.pop(VISUALS, {})
    heatmaps = summary.pop(HEATMAPS, {})
    scenario = getattr(prepared.run.data, "scenario", None)
    truth = scenario.relatedness() if heatmaps and scenario is not None else None  # only beside a heatmap
    summary = {
        "name": config.name,
        "run_id": run_id,
        **summary,
        "runtime": runtime_name,
        "executor": runtime.executor,
        "kernels": runtime.kernels,
        **({"workers": worker_count(runtime.workers)} if runtime.executor in ("processes", "isolated") else {}),
        "setup_time_s": setup_s,
        "clients": prepared.clients,
        **({"setup": prepared.setup} if prepared.setup else {}),
        **data_facts,
        **({"client_matrices": {name: {"values": np.asarray(matrix).tolist(),
                                       "truth_correlation": off_diagonal_correlation(matrix, truth)}
                                for name, (matrix, _title) in heatmaps.items()}} if heatmaps else {}),
        "environment": {"hetpfl": __version__, "python": platform.python_version(), "numpy": np.__version__,
                        "torch": _torch_version(), "processor": platform.machine(),
                        "portable_numerics": portable_numerics_active()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run(out)
    for name, (images, labels) in visuals.items():
        save_image_grid(out / f"{name}.png", images, prepared.run.data.value_range, labels, title=name.replace("_", " "))
    for name, (matrix, title) in heatmaps.items():
        save_heatmap(out / f"{name}.png", matrix, title,
                     None if truth is None else (truth, "true task relatedness (shared task types)"))
    return summary


def off_diagonal_correlation(matrix: np.ndarray, truth: np.ndarray | None) -> float | None:
    """Pearson's r between a client × client matrix and the true relatedness over the pairs i ≠ j
    (the diagonal is a client with itself: RELA leaves it out); None without a truth, or when either
    side is constant there."""
    if truth is None:
        return None
    matrix, truth = np.asarray(matrix, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    pairs = ~np.eye(len(truth), dtype=bool)
    a, b = matrix[pairs], truth[pairs]
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _torch_version() -> str:
    import torch  # noqa: PLC0415  (torch loads lazily: `hetpfl list` and config checks do not need it)

    return torch.__version__


def _data_facts(prepared: Prepared) -> dict[str, Any]:
    """The summary's record of the data: a HetVQA scenario (tasks per client, task switches), else
    the partition (client × class counts)."""
    data, config = prepared.run.data, prepared.config
    scenario = getattr(data, "scenario", None)
    if scenario is not None:
        switches = [k * scenario.rounds_per_task for k in range(1, scenario.tasks_per_client)] if scenario.mode == "dynamic" else []
        return {"scenario": {"name": scenario.name, "mode": scenario.mode, "rounds_per_task": scenario.rounds_per_task,
                             "task_switches": [r for r in switches if r < config.rounds],
                             "tasks": [list(c.tasks) for c in scenario.clients],
                             "unseen": {k: list(v) for k, v in scenario.unseen.items()}}}
    return {"partition": {"scheme": config.data.partition, "label_counts": data.label_counts().tolist(),
                          "public_size": len(data.public)}}


__all__ = ["CHECKPOINTS", "ExperimentConfig", "Prepared", "execute", "load_config", "prepare", "run_experiment"]
