"""``hetpfl flwr-run``: Flower's ``flwr run`` that waits for the run and exits with how it ended.

``flwr run`` (flwr 1.41) returns once the run is submitted, or once its log stream ends, with exit
code 0 whatever the ServerApp then did, so a script cannot tell a failed run from a finished one.
This command submits the run with ``flwr run ARGS --format json``, streams its log with
``flwr log RUN_ID --stream`` (``--no-stream``: it does not), asks ``flwr ls --run-id RUN_ID --format
json`` until the run has finished, and exits 0 only when Flower says ``finished:completed`` (1 when
the run failed or was stopped, with Flower's details on one line). ARGS are ``flwr run``'s own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# ``flwr run`` options that take a value (so that the positionals APP and SUPERLINK can be found)
_VALUE_OPTIONS = {"--run-config", "-c", "--federation", "--federation-config", "--format"}
_OWN_FLAGS = {"--stream", "--no-stream"}
COMPLETED = "finished:completed"


class FlowerCliError(RuntimeError):
    """Flower's CLI did not do what was asked (its own message included)."""


def flwr_binary() -> str:
    """The ``flwr`` beside this Python (the project's environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    return str(beside) if beside.exists() else (shutil.which("flwr") or "flwr")


def split_arguments(args: Sequence[str]) -> tuple[list[str], str | None, bool]:
    """(``flwr run``'s arguments without ``--format`` and this command's flags, the SUPERLINK
    positional or None, whether to stream the log)."""
    passed: list[str] = []
    positionals: list[str] = []
    stream = "--no-stream" not in args
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _OWN_FLAGS or arg.startswith("--format="):
            i += 1
            continue
        if arg == "--format":
            i += 2
            continue
        passed.append(arg)
        if arg in _VALUE_OPTIONS and i + 1 < len(args):
            passed.append(args[i + 1])
            i += 2
            continue
        if not arg.startswith("-"):
            positionals.append(arg)
        i += 1
    return passed, (positionals[1] if len(positionals) > 1 else None), stream


def _json_object(text: str, key: str) -> dict[str, Any]:
    """The first JSON object in ``text`` that has ``key`` (Flower may print other lines around it)."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict) and key in value:
            return value
    raise FlowerCliError(" ".join(text.split())[:500] or "no output")


def run_status(flwr: str, run_id: str, superlink: list[str]) -> tuple[str, str]:
    """Flower's status text of the run (``running``, ``finished:failed``, ...) and its details."""
    done = subprocess.run([flwr, "ls", *superlink, "--run-id", run_id, "--format", "json"],
                          capture_output=True, text=True, check=False)
    runs = _json_object(done.stdout + done.stderr, "runs")["runs"] if done.returncode == 0 else None
    if not runs:
        raise FlowerCliError(f"flwr ls --run-id {run_id} exited {done.returncode}: "
                             f"{' '.join((done.stderr or done.stdout).split())[:300]}")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details") or "")


def flwr_run(args: Sequence[str], *, poll_s: float = 1.0, timeout_s: float | None = None) -> int:
    """Submit, follow and judge one Flower run (module docstring); returns the exit code."""
    flwr = flwr_binary()
    passed, superlink, stream = split_arguments(args)
    link = [superlink] if superlink else []
    started = subprocess.run([flwr, "run", *passed, "--format", "json"], capture_output=True, text=True, check=False)
    try:
        run_id = str(_json_object(started.stdout, "run-id")["run-id"] or "")
    except FlowerCliError as exc:
        run_id, why = "", str(exc)
    else:
        why = "no run id"
    if started.returncode != 0 or not run_id:
        print(f"hetpfl: flwr run started no run (exit {started.returncode}): {why}", file=sys.stderr)
        return started.returncode or 1
    print(f"hetpfl: Flower run {run_id} started; following it until it ends", file=sys.stderr, flush=True)
    if stream:
        subprocess.run([flwr, "log", run_id, *link, "--stream"], check=False)  # ends with the run's log
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status, details = run_status(flwr, run_id, link)
        if status.startswith("finished"):
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"hetpfl: Flower run {run_id} is still {status} after {timeout_s:g} s", file=sys.stderr)
            return 1
        time.sleep(poll_s)
    if status == COMPLETED:
        print(f"hetpfl: Flower run {run_id} {status}", file=sys.stderr)
        return 0
    print(f"hetpfl: Flower run {run_id} ended {status}" + (f": {' '.join(details.split())[:500]}" if details else ""),
          file=sys.stderr)
    return 1


__all__ = ["COMPLETED", "FlowerCliError", "flwr_binary", "flwr_run", "run_status", "split_arguments"]
