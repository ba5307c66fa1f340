"""The executors: worker processes fail, record and raise exactly as the sequential reference does.

(Agreement of records for every registered method is a contract test:
``tests/test_contract.py::test_disk_store_and_worker_processes_give_the_reference_records``.)
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import small_config
from hetpfl.algorithms.cosmos import distill_cluster as _distill_cluster
from hetpfl.algorithms.fedmd import FedMDClient
from hetpfl.configuration import ConfigError
from hetpfl.executors import ClientProcessError
from hetpfl.experiment import load_config, run_experiment
from hetpfl.workerpool import WorkerEnded

_communicate = FedMDClient.communicate


def _fails_for_client_2_in_round_1(self, message, ctx):
    if ctx.client_id == 2 and ctx.round == 1:
        raise OSError("disk full")
    return _communicate(self, message, ctx)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_client_raising_in_a_worker_is_recorded_as_the_sequential_executor_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(FedMDClient, "communicate", _fails_for_client_2_in_round_1)  # forked workers inherit it
    # the batched executor's groups decline and run client by client (a raise inside a stacked stage
    # is tests/test_stacked.py's): its records are then the sequential executor's exactly
    monkeypatch.setattr(FedMDClient, "communicate_many", lambda self, messages, ctxs: None)
    for executor in ("sequential", "processes", "batched", "isolated"):
        run_experiment(small_config("fedmd", **{"runtime.executor": executor, "runtime.dropout": 0.2}),
                       tmp_path / executor)
    rows = _rows(tmp_path / "processes")
    assert rows == _rows(tmp_path / "sequential") == _rows(tmp_path / "isolated")
    batched = _rows(tmp_path / "batched")  # digest_revisit still stacks: the same up to float order
    assert [row["failures"] for row in batched] == [row["failures"] for row in rows]
    assert rows[1]["failures"]["2"] == "communicate: raised OSError: disk full"
    assert all("dropout" in text for c, text in rows[0]["failures"].items())  # simulated dropouts alike


@pytest.mark.parametrize("executor", ["processes", "isolated"])
def test_a_client_raising_in_a_worker_stops_a_run_that_says_raise_with_its_traceback(tmp_path, monkeypatch, executor):
    monkeypatch.setattr(FedMDClient, "communicate", _fails_for_client_2_in_round_1)
    config = small_config("fedmd", **{"runtime.executor": executor, "runtime.on_client_error": "raise"})
    with pytest.raises(ClientProcessError, match=r"(?s)client 2, stage communicate, round 1: OSError: disk full.*Traceback"):
        run_experiment(config, tmp_path / "out")


def test_workers_default_to_one_per_core_and_the_executor_is_the_simulators(tmp_path):
    summary = run_experiment(small_config("fedmd", rounds=1, **{"runtime.executor": "processes"}), tmp_path)
    assert summary["workers"] == os.cpu_count() and summary["executor"] == "processes"
    with pytest.raises(ConfigError, match="runtime.executor.*processes.*simulator"):
        load_config(base={"runtime": {"name": "flower-sim", "executor": "processes"}})


def _dies_in_round_1(self, message, ctx):
    if ctx.client_id == 2 and ctx.round == 1:
        os._exit(3)  # the client's process ends without a word (a crash, a kill)
    return _communicate(self, message, ctx)


def test_an_isolated_client_whose_process_dies_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(FedMDClient, "communicate", _dies_in_round_1)
    summary = run_experiment(small_config("fedmd", rounds=3, **{"runtime.executor": "isolated"}), tmp_path)
    rows = _rows(tmp_path)
    assert rows[1]["failures"]["2"].startswith("communicate: raised ClientProcessEnded")
    assert "2" in rows[2]["failures"] and len(rows[2]["failures"]) == 1  # gone for good; the others go on
    assert summary["final"]["client_acc"][2] is None and summary["final"]["client_acc"][0] is not None


def test_a_worker_process_that_dies_ends_a_processes_run_with_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(FedMDClient, "communicate", _dies_in_round_1)
    with pytest.raises(WorkerEnded, match="worker process ended \\(exit code 3\\)"):
        run_experiment(small_config("fedmd", rounds=3, **{"runtime.executor": "processes"}), tmp_path)


def test_hetvqa_cannot_run_isolated():
    from hetpfl.experiment import prepare

    with pytest.raises(ConfigError, match="runtime.executor.*isolated.*example store"):
        prepare(load_config(base={"algorithm": {"name": "fedmosaic"}, "data": {"dataset": "hetvqa"},
                                  "runtime": {"executor": "isolated"}}))


def test_an_isolated_run_killed_mid_way_resumes_to_the_uninterrupted_records(tmp_path):
    class Crash(RuntimeError):
        pass

    def crash_in_round_1(row):
        if row["round"] == 1:
            raise Crash

    config = small_config("cosmos", rounds=3, **{"runtime.executor": "isolated", "runtime.checkpoint_every": 1})
    with pytest.raises(Crash):
        run_experiment(config, tmp_path / "isolated", on_round=crash_in_round_1)
    summary = run_experiment(config, tmp_path / "isolated", resume=True)  # fresh client processes, records from the checkpoint
    assert summary["resumed_at_round"] == 1
    run_experiment(small_config("cosmos", rounds=3), tmp_path / "sequential")
    assert _rows(tmp_path / "isolated") == _rows(tmp_path / "sequential")


def test_an_isolated_client_that_answers_garbage_is_stopped_and_recorded(tmp_path, monkeypatch):
    from hetpfl import executors

    send, serve = executors._send_frames, executors._serve_isolated_client
    mine = {"client": None, "answers": 0}  # each client's process has its own copy

    def serve_as(host, client, *rest):
        mine["client"] = client
        return serve(host, client, *rest)

    def garbled(end, header, first, second):  # client 2's second answer (round 0's digest) is junk
        if mine["client"] == 2 and "failure" in header:
            mine["answers"] += 1
            if mine["answers"] == 2:
                first = b"not a hetpfl message"
        return send(end, header, first, second)

    monkeypatch.setattr(executors, "_serve_isolated_client", serve_as)
    monkeypatch.setattr(executors, "_send_frames", garbled)
    run_experiment(small_config("fedmd", rounds=2, **{"runtime.executor": "isolated"}), tmp_path)
    rows = _rows(tmp_path)
    assert list(rows[0]["failures"]) == ["2"] and "its answer was unreadable" in rows[0]["failures"]["2"]
    assert "its process is stopped" in rows[0]["failures"]["2"]
    assert list(rows[1]["failures"]) == ["2"] and "ended in an earlier stage" in rows[1]["failures"]["2"]


def test_a_reply_over_the_cap_is_recorded_by_the_isolated_executor_as_by_the_sequential_one(tmp_path):
    for executor in ("sequential", "isolated"):
        run_experiment(small_config("fedmd", rounds=1, **{"runtime.executor": executor, "runtime.max_reply_mb": 0.01}),
                       tmp_path / executor)
    rows = _rows(tmp_path / "isolated")
    assert rows == _rows(tmp_path / "sequential") and "over runtime.max_reply_mb" in rows[0]["failures"]["0"]


def _distill_cluster_noting_the_process(*task):
    with open(os.environ["PIDS_FILE"], "a") as log:
        log.write(f"{os.getpid()}\n")
    return _distill_cluster(*task)


def test_the_servers_mapped_work_runs_on_the_workers_and_gives_the_sequential_records(tmp_path, monkeypatch):
    from hetpfl.algorithms import cosmos

    monkeypatch.setenv("PIDS_FILE", str(tmp_path / "pids"))
    monkeypatch.setattr(cosmos, "distill_cluster", _distill_cluster_noting_the_process)  # sent to workers by name
    for executor in ("sequential", "processes"):
        run_experiment(small_config("cosmos", rounds=2, **{"runtime.executor": executor}), tmp_path / executor)
    assert _rows(tmp_path / "processes") == _rows(tmp_path / "sequential")
    pids = (tmp_path / "pids").read_text().split()
    assert pids.count(str(os.getpid())) < len(pids)  # the processes run's cluster models were trained elsewhere
