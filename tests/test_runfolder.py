"""Results folders that can be trusted (issue #13): one run per folder, an honest status, resume
from the CLI, readable errors, and config values that would crash or ruin a run refused up front."""

from __future__ import annotations

import json
import warnings

import pytest

from hetpfl.cli import main
from hetpfl.configuration import ConfigError
from hetpfl.experiment import load_config, run_experiment
from hetpfl.report import find_runs, report
from hetpfl.runfolder import ResultsFolderError, read_status

TINY = ["data.num_clients=3", "rounds=3", "algorithm.pretrain_epochs=1", "algorithm.distill_epochs=1",
        "client.local_epochs=1", "models.clients=[mlp]"]


def tiny(*extra: str):
    return load_config("configs/default.yaml", [*TINY, *extra])


class Crash(RuntimeError):
    pass


def crash_in_round(n):
    def on_round(row):
        if row["round"] == n:
            raise Crash(f"crashed in round {n}")
    return on_round


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_complete_run_says_so_and_records_its_files_hashes(tmp_path):
    summary = run_experiment(tiny(), tmp_path)
    status = read_status(tmp_path)
    assert status["status"] == "complete" and status["rounds_done"] == 3
    assert status["run_id"] == summary["run_id"]
    assert set(status["sha256"]) == {"config.yaml", "metrics.jsonl", "summary.json"}
    assert find_runs([tmp_path]) == [tmp_path]


def test_a_folder_holding_a_run_is_refused_and_left_intact(tmp_path):
    run_experiment(tiny(), tmp_path)
    before = files(tmp_path)
    with pytest.raises(ResultsFolderError, match="already holds a run \\(complete\\); pass --overwrite"):
        run_experiment(tiny("seed=7"), tmp_path)
    assert files(tmp_path) == before


def test_an_overwriting_run_that_fails_leaves_a_failed_folder_report_will_not_read(tmp_path):
    run_experiment(tiny(), tmp_path)
    with pytest.raises(Crash):
        run_experiment(tiny("seed=7"), tmp_path, overwrite=True, on_round=crash_in_round(1))
    status = read_status(tmp_path)
    assert status["status"] == "failed" and status["rounds_done"] == 2
    assert status["error"] == "Crash: crashed in round 1"
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "accuracy.png").exists()  # A's are gone
    assert "seed: 7" in (tmp_path / "config.yaml").read_text()
    skipped = []
    with pytest.raises(FileNotFoundError, match="no finished run folders"):
        find_runs([tmp_path], skipped)
    assert skipped == [(tmp_path, "failed after 2 rounds: Crash: crashed in round 1")]


def test_report_leaves_out_a_folder_whose_files_were_replaced(tmp_path):
    good, altered = tmp_path / "good", tmp_path / "altered"
    run_experiment(tiny(), good)
    run_experiment(tiny(), altered)
    with (altered / "metrics.jsonl").open("a") as fh:
        fh.write("{}\n")
    skipped = []
    assert find_runs([tmp_path], skipped) == [good]
    assert skipped == [(altered, "metrics.jsonl is not the file its run wrote (changed or replaced afterwards)")]


def test_report_tables_kept_records_that_hold_only_a_summary_and_a_config(tmp_path):
    """benchmarks/keep_records.sh keeps summary.json and config.yaml; report tables them (no curve)."""
    run, record = tmp_path / "runs" / "one", tmp_path / "records" / "one"
    run_experiment(tiny(), run)
    record.mkdir(parents=True)
    for name in ("summary.json", "config.yaml"):
        (record / name).write_bytes((run / name).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no curve to draw is said in the picture, not warned about by matplotlib
        table = report([tmp_path / "records"], tmp_path / "out")
    assert report([tmp_path / "runs"]) == table and (tmp_path / "out" / "comparison.png").exists()


def test_cli_resumes_a_crashed_run_to_the_uninterrupted_records(tmp_path, capsys):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run_experiment(tiny(), reference)
    with pytest.raises(Crash):
        run_experiment(tiny("runtime.checkpoint_every=1"), crashed, on_round=crash_in_round(2))
    assert main(["run", "-o", str(crashed), "configs/default.yaml"]) == 2
    assert "already holds a run (failed)" in capsys.readouterr().err
    assert main(["run", "--resume", str(crashed)]) == 0
    assert (crashed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    status = read_status(crashed)
    assert status["status"] == "complete" and status["resumed"] == 1
    assert main(["run", "--resume", str(crashed)]) == 2
    assert "its run is complete" in capsys.readouterr().err


def test_resume_of_a_run_without_checkpoints_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(Crash):
        run_experiment(tiny(), tmp_path, on_round=crash_in_round(0))
    before = files(tmp_path)
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "keeps no checkpoints (run with runtime.checkpoint_every > 0)" in capsys.readouterr().err
    assert files(tmp_path) == before


def test_a_run_killed_before_its_first_checkpoint_resumes_from_round_0(tmp_path):
    reference = tmp_path / "reference"
    run_experiment(tiny(), reference)
    with pytest.raises(Crash):  # round 0's record is written, its checkpoint is not
        run_experiment(tiny("runtime.checkpoint_every=1"), tmp_path / "killed", on_round=crash_in_round(0))
    assert not list((tmp_path / "killed").glob("checkpoints/round-*"))
    run_experiment(tiny("runtime.checkpoint_every=1"), tmp_path / "killed", resume=True)
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


@pytest.mark.parametrize("make_target, message", [
    (lambda root: root / "a-file", "is a file; choose another -o"),
    (lambda root: root / "a-file" / "below", "is not a writable folder"),
])
def test_an_unusable_results_path_is_one_line(tmp_path, capsys, make_target, message):
    (tmp_path / "a-file").write_text("x")
    target = make_target(tmp_path)
    assert main(["run", "configs/default.yaml", "-o", str(target), *sum((["--set", s] for s in TINY), [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_a_results_folder_whose_creation_is_refused_is_one_line(tmp_path, capsys, monkeypatch):
    """Probe 1.36 (``-o /sys/kernel/x``): mkdir refused with EPERM inside ``runfolder.start``."""
    import errno
    from pathlib import Path

    target = tmp_path / "refused" / "out"
    mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if self == target or target in self.parents:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    assert main(["run", "configs/default.yaml", "-o", str(target), *sum((["--set", s] for s in TINY), [])]) == 2
    err = capsys.readouterr().err  # after the run's header (mkdir comes once the data are prepared)
    assert err.endswith(f"\nhetpfl: results folder {target} cannot be written (Operation not permitted); "
                        "choose another -o\n")
    assert "Traceback" not in err and "PermissionError" not in err
    assert not target.exists()


def test_a_results_folder_that_is_not_writable_is_refused_before_the_data_are_prepared(tmp_path, capsys, monkeypatch):
    """Probe 1.37 (an existing folder the user cannot write): one line, and no data loaded first."""
    import os

    import hetpfl.experiment

    target = tmp_path / "read-only"
    target.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(target)
                        else access(path, mode, **kw))
    prepared = []

    def prepare(config):
        prepared.append(config)
        raise AssertionError("the data were prepared before the results folder was checked")

    monkeypatch.setattr(hetpfl.experiment, "prepare", prepare)
    assert main(["run", "configs/default.yaml", "-o", str(target), *sum((["--set", s] for s in TINY), [])]) == 2
    err = capsys.readouterr().err
    assert err == (f"hetpfl: results folder {target} cannot be written ({target} is not a writable folder); "
                   "choose another -o\n")
    assert prepared == [] and list(target.iterdir()) == []


def test_an_unexpected_error_is_one_line_and_its_traceback_is_behind_debug(tmp_path, capsys, monkeypatch):
    import hetpfl.experiment

    def broken(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/mnist")

    monkeypatch.setattr(hetpfl.experiment, "run_experiment", broken)
    argv = ["run", "configs/default.yaml", "-o", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "hetpfl: PermissionError: [Errno 13] Permission denied: '/data/mnist' (hetpfl --debug ... shows the traceback)\n"
    with pytest.raises(PermissionError):
        main(["--debug", *argv])


@pytest.mark.parametrize("override, message", [
    ("rounds=2000000000", "rounds=2000000000: must be in [1, 100000]"),
    ("runtime.torch_threads=100000", "runtime.torch_threads=100000: must be in [1, 256]"),
    ("name=../../escape", "name='../../escape': expected one plain folder name"),
    ("client.lr=.inf", "client.lr=inf: must be finite"),
    ("client.max_grad_norm=0", "client.max_grad_norm=0.0: must be > 0"),
    ("client.weight_decay=-1", "client.weight_decay=-1.0: must be >= 0"),  # probe 1.13 (torch raised in round 0)
    ("client.optimizer=sgd client.momentum=-5", "client.momentum=-5.0: must be in [0, 1)"),  # probe 1.14
    ("client.local_epochs=.inf", "client.local_epochs=inf: must be finite"),  # probe 1.15 (OverflowError in round 0)
])
def test_values_that_would_hang_crash_or_escape_fail_before_any_file(tmp_path, capsys, override, message):
    sets = [arg for one in override.split() for arg in ("--set", one)]  # several overrides: space-separated
    assert main(["run", "configs/default.yaml", "-o", str(tmp_path / "out"), *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hetpfl: config error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_yaml_reads_exponent_floats_and_refuses_repeated_keys_and_empty_files(tmp_path):
    assert load_config(text="name: a\nclient: {lr: 1e-3}\n").client.lr == 0.001
    assert load_config(text="name: a", overrides=["client.lr=5E-4"]).client.lr == 0.0005
    with pytest.raises(ConfigError, match="key 'rounds' is given twice \\(line 1 and line 3\\)"):
        load_config(text="rounds: 1\nseed: 0\nrounds: 2\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the config is empty"):
        load_config(empty)


def test_summary_and_status_carry_one_run_id(tmp_path):
    run_experiment(tiny(), tmp_path)
    run_id = json.loads((tmp_path / "summary.json").read_text())["run_id"]
    assert len(run_id) == 16 and read_status(tmp_path)["run_id"] == run_id


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "fedmd", "cosmos"])
def test_kill_9_at_a_random_round_then_resume_gives_the_uninterrupted_records(method, tmp_path):
    """The issue's test: a real ``kill -9`` of ``hetpfl run`` (no chance to write a status or
    close a file) at a round drawn at random, then ``hetpfl run --resume``."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    overrides = ["rounds=6", "runtime.checkpoint_every=1", "client.local_epochs=3"]
    config = f"tests/configs/alg/{method}.yaml"
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_experiment(load_config(config, overrides), reference)
    kill_after = random.Random().randint(1, 3)  # rounds done when the kill is sent; printed on failure
    command = [sys.executable, "-m", "hetpfl.cli", "run", config, "-o", str(killed)]
    process = subprocess.Popen([*command, *sum((["--set", o] for o in overrides), [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while (read_status(killed) or {}).get("rounds_done", 0) < kill_after:
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended before round {kill_after}"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    status = read_status(killed)
    assert status["status"] == "running" and status["rounds_done"] < 6, (kill_after, status)  # it says so
    with pytest.raises(FileNotFoundError):
        find_runs([killed])  # report will not read it
    resumed = subprocess.run([sys.executable, "-m", "hetpfl.cli", "run", "--resume", str(killed)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (killed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text(), kill_after
    assert read_status(killed)["status"] == "complete"


def test_hetpfl_status_exits_zero_only_for_complete_runs(tmp_path, capsys):
    """What a deployment script checks after ``flwr run``, whose exit code does not follow the run."""
    from hetpfl.cli import main

    run_experiment(tiny(), tmp_path / "ok")
    with pytest.raises(Crash):
        run_experiment(tiny(), tmp_path / "crashed", on_round=crash_in_round(1))
    capsys.readouterr()
    assert main(["status", str(tmp_path / "ok")]) == 0
    assert "ok: complete after" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "ok"), str(tmp_path / "crashed"), str(tmp_path / "missing")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "crashed: failed after 2 rounds: Crash: crashed in round 1" in lines[1]
    assert lines[2].endswith("missing: no such results folder")
    (tmp_path / "ok" / "metrics.jsonl").write_text("{}\n")  # tampered afterwards
    assert main(["status", str(tmp_path / "ok")]) == 1
    assert "metrics.jsonl is not the file its run wrote" in capsys.readouterr().out
