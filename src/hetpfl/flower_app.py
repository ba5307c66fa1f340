"""The Flower app of hetpfl: the components ``pyproject.toml`` names under ``[tool.flwr.app]``.

An entry point, like the CLI: it wires the experiment layer (config, preparation, results
folder) to the Flower runtime (:mod:`hetpfl.runtimes.flower`), which sits below it.

* ``client_app`` answers ``query.<stage>`` for every stage of every registered algorithm, plus
  ``query.evaluate`` and ``query.hello``, by running it through a ClientHost
  (:func:`hetpfl.runtimes.flower.handle_query`); it rebuilds the run from the experiment's YAML
  with :func:`hetpfl.prepare.run_from_yaml`.
* ``server_app`` is the deployment entry point (``flwr run``): it reads the experiment from the
  run config, waits for one SuperNode per client, runs every round and writes the same results
  folder as ``hetpfl run``. Run config keys (``[tool.flwr.app.config]``, ``--run-config``):

  ``config``         a YAML file (relative to the SuperLink's working directory or to the app,
                     e.g. ``configs/default.yaml``, or inside a folder of ``HETPFL_CONFIG_DIRS``)
                     or inline YAML text; ``data.data_dir`` is the SuperLink's, not a run's
  ``set``            ``;``-separated ``key=value`` overrides, as ``hetpfl run --set``
  ``out``            results folder on the SuperLink's machine (default ``runs/<name>``), under
                     ``HETPFL_RESULTS_ROOT`` (default ``./runs``); one that holds a run is
                     refused unless ``overwrite`` is true
  ``overwrite``      replace the run ``out`` holds (default false)
  ``node-timeout``   seconds to wait for the SuperNodes and their first answer
  ``stage-timeout``  seconds to wait for a stage's replies (0: no limit); late clients fail
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .config import ExperimentConfig, config_yaml, load_config
from .configuration import ConfigError
from .experiment import run_experiment
from .prepare import run_from_yaml
from .runtimes.flower import make_client_app, quiet_environment, run_on_grid

quiet_environment()
log = logging.getLogger("flwr.hetpfl")  # a child of Flower's logger: shown in its log stream

client_app = make_client_app(run_from_yaml)


# ------------------------------------------------------------------------------------------
# Deployment ServerApp
# ------------------------------------------------------------------------------------------


def _app_dirs() -> list[Path]:
    """Folders a relative config path may be relative to: here, then the installed app (FAB)."""
    dirs = [Path.cwd()]
    for entry in sys.path:
        path = Path(entry or ".")
        if (path / "pyproject.toml").is_file() and path not in dirs:
            dirs.append(path)
    return dirs


# The SuperLink's owner, not whoever submits a run, decides what a run may read and write:
CONFIG_DIRS_ENV = "HETPFL_CONFIG_DIRS"  # folders (os.pathsep-separated) config files may come from, beside the app
RESULTS_ROOT_ENV = "HETPFL_RESULTS_ROOT"  # the folder results are written under (default ./runs)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def load_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The ExperimentConfig a ``flwr run`` asks for (see the module docstring for the keys). A
    config file is read only from the app or a folder of ``HETPFL_CONFIG_DIRS`` (a file elsewhere
    is refused unread, so no error can echo its contents), and the data folder is the
    SuperLink's own: a run config may not set ``data.data_dir``."""
    source = str(run_config.get("config", "") or "").strip()
    overrides = [item.strip() for item in str(run_config.get("set", "") or "").split(";") if item.strip()]
    if not source:
        raise ConfigError("run config 'config' is empty: give a YAML file or inline YAML")
    if any(item.split("=", 1)[0].strip() == "data.data_dir" for item in overrides):
        raise ConfigError("run config 'set': data.data_dir is the SuperLink's own (HETPFL_DATA_DIR), not a run's")
    looks_like_path = "\n" not in source and source.endswith((".yaml", ".yml"))
    if not looks_like_path:
        config = load_config(text=source, overrides=overrides)
        if config.data.data_dir is not None:
            raise ConfigError("run config 'config': data.data_dir is the SuperLink's own (HETPFL_DATA_DIR), not a run's")
        return config
    allowed = _app_dirs() + [Path(d) for d in os.environ.get(CONFIG_DIRS_ENV, "").split(os.pathsep) if d]
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in _app_dirs()]
    for candidate in candidates:
        if not any(_inside(candidate, folder) for folder in allowed):
            raise ConfigError(f"run config 'config': {source!r} is outside the app and {CONFIG_DIRS_ENV} "
                              "(the SuperLink's owner can add its folder there)")
        if candidate.is_file():
            return load_config(candidate, overrides)
    raise ConfigError(f"config file {source!r} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def results_folder(run_config: Mapping[str, Any], config: ExperimentConfig) -> Path:
    """Where the run's results go: ``out`` (default ``runs/<name>``), which must lie under the
    results root (``HETPFL_RESULTS_ROOT``, default ``./runs`` of the SuperLink)."""
    root = Path(os.environ.get(RESULTS_ROOT_ENV) or Path.cwd() / "runs")
    out = Path(str(run_config.get("out", "") or "") or Path("runs") / config.name).expanduser()
    out = out if out.is_absolute() else Path.cwd() / out
    if not _inside(out, root):
        raise ConfigError(f"run config 'out': {out} is outside the results root {root} "
                          f"(the SuperLink's owner sets {RESULTS_ROOT_ENV})")
    return out


def _seconds(run_config: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = run_config.get(key, default)
    if value is None:
        return None
    value = float(value)
    return value if value > 0 else None


server_app = ServerApp()


@server_app.main()
def deployment_main(grid: Grid, context: Context) -> None:
    """``flwr run``: run the configured experiment across the SuperNodes; write its results folder."""
    run_config = context.run_config
    config = load_run_config(run_config)
    out = results_folder(run_config, config)
    node_timeout = _seconds(run_config, "node-timeout", 120.0) or 120.0
    stage_timeout = _seconds(run_config, "stage-timeout", None)

    def runner(prepared: Any, on_round: Any) -> dict[str, Any]:
        return run_on_grid(grid, prepared.run, config_yaml(prepared.config), on_round, node_timeout=node_timeout,
                           stage_timeout=stage_timeout, runtime="flower-deployment")

    def on_round(row: dict[str, Any]) -> None:
        acc = row.get("personalized_acc_mean")
        log.info("round %d done in %.1f s%s; failures: %s", row["round"], row.get("timing", {}).get("round_s", float("nan")),
                    "" if acc is None else f", own-model accuracy {100 * acc:.2f}%", row.get("failures") or "none")

    log.info("hetpfl: %s (%s on %s, %d clients, %d rounds) -> %s", config.name, config.algorithm["name"],
                config.data.dataset, config.data.num_clients, config.rounds, out.resolve())
    overwrite = str(run_config.get("overwrite", False)).strip().lower() in ("true", "1", "yes")
    summary = run_experiment(config, out, on_round=on_round, runner=runner, overwrite=overwrite)
    final = summary["final"].get("personalized_acc_mean")
    log.info("hetpfl: done in %.1f s, own-model accuracy %s; results in %s", summary["wall_time_s"],
                "n/a" if final is None else f"{100 * final:.2f}%", out.resolve())


__all__ = ["client_app", "load_run_config", "server_app"]
