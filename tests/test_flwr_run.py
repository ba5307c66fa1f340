"""``hetpfl flwr-run``: ``flwr run`` followed to the run's end, exit code from how it ended.

Against a stand-in ``flwr`` that answers as flwr 1.41's CLI does (JSON of ``run --format json`` and
``ls --format json``); the real SuperLink case is ``tests/test_flower_deploy.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hetpfl import flwr_run
from hetpfl.cli import main

FAKE = '''\
import json, sys
from pathlib import Path
calls = Path(sys.argv[0]).with_name("calls.jsonl")
with calls.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
plan = json.loads(Path(sys.argv[0]).with_name("plan.json").read_text())
command = sys.argv[1]
if command == "run":
    print("Loading project configuration...")  # Flower may print around its JSON
    print(json.dumps(plan["run"]))
    sys.exit(plan.get("run_exit", 0))
if command == "log":
    print("INFO : round 1 done")
    sys.exit(0)
if command == "ls":
    if "ls_exit" in plan:  # the SuperLink is gone: flwr cannot reach it
        print(plan.get("ls_error", ""), file=sys.stderr)
        sys.exit(plan["ls_exit"])
    asked = sum(1 for line in calls.read_text().splitlines() if json.loads(line)[0] == "ls")
    status = plan["statuses"][min(asked, len(plan["statuses"])) - 1]
    print(json.dumps({"success": True, "runs": [{"run-id": "42", "status": status[0], "status-details": status[1]}]}))
'''


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    script = tmp_path / "flwr"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    monkeypatch.setattr(flwr_run, "flwr_binary", lambda: str(script))

    def plan(**what) -> Path:
        (tmp_path / "plan.json").write_text(json.dumps(what))
        return tmp_path / "calls.jsonl"

    return plan


def _calls(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_arguments_are_flwr_runs_with_its_format_and_our_flags_taken_out():
    passed, superlink, stream = flwr_run.split_arguments(
        [".", "loopback", "--stream", "--run-config", "config='x.yaml' out='o'", "--format", "default"])
    assert passed == [".", "loopback", "--run-config", "config='x.yaml' out='o'"]
    assert superlink == "loopback" and stream
    assert flwr_run.split_arguments(["-c", "a=1", ".", "--no-stream"]) == (["-c", "a=1", "."], None, False)


def test_a_completed_run_exits_zero_after_following_its_log(fake_flwr, capsys):
    calls = fake_flwr(run={"success": True, "run-id": "42"},
                      statuses=[["running", ""], ["running", ""], ["finished:completed", ""]])
    assert main(["flwr-run", ".", "loopback", "--run-config", "out='o'"]) == 0
    made = _calls(calls)
    assert made[0] == ["run", ".", "loopback", "--run-config", "out='o'", "--format", "json"]
    assert made[1] == ["log", "42", "loopback", "--stream"]
    assert [c[0] for c in made[2:]] == ["ls", "ls", "ls"] and made[2] == ["ls", "loopback", "--run-id", "42", "--format", "json"]
    assert "Flower run 42 finished:completed" in capsys.readouterr().err


def test_a_failed_or_stopped_run_exits_one_with_flowers_details(fake_flwr, capsys):
    fake_flwr(run={"success": True, "run-id": "42"},
              statuses=[["finished:failed", "ServerApp failed with exception: rounds=0: must be >= 1"]])
    assert main(["flwr-run", ".", "--no-stream"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "hetpfl: Flower run 42 ended finished:failed: ServerApp failed with exception: rounds=0: must be >= 1")
    calls = fake_flwr(run={"success": True, "run-id": "42"}, statuses=[["finished:stopped", ""]])
    assert main(["flwr-run", "."]) == 1
    assert "ended finished:stopped" in capsys.readouterr().err
    assert ["log", "42", "--stream"] in _calls(calls)


def test_a_run_flower_would_not_start_is_its_exit_and_its_message(fake_flwr, capsys):
    fake_flwr(run={"success": False, "error-message": "cannot reach the SuperLink"}, run_exit=1, statuses=[])
    assert main(["flwr-run", ".", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert "flwr run started no run (exit 1)" in err and "cannot reach the SuperLink" in err


def test_a_superlink_that_vanishes_mid_run_exits_one_with_one_line(fake_flwr, capsys):
    """Probe 4.4: the SuperLink stopped during the run, its log ends, then ``flwr ls`` fails."""
    calls = fake_flwr(run={"success": True, "run-id": "42"}, statuses=[], ls_exit=1,
                      ls_error="Connection refused: the SuperLink at 127.0.0.1:9093 is unavailable")
    assert main(["flwr-run", ".", "loopback"]) == 1
    assert [c[0] for c in _calls(calls)] == ["run", "log", "ls"]
    assert capsys.readouterr().err.splitlines()[-1] == (
        "hetpfl: flwr-run: flwr ls --run-id 42 exited 1: "
        "Connection refused: the SuperLink at 127.0.0.1:9093 is unavailable")


def test_a_run_stuck_running_past_the_timeout_exits_one_saying_so(fake_flwr, capsys):
    calls = fake_flwr(run={"success": True, "run-id": "42"}, statuses=[["running", ""]])
    assert flwr_run.flwr_run([".", "loopback", "--no-stream"], timeout_s=0.2, poll_s=0.01) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "hetpfl: Flower run 42 is still running after 0.2 s"
    assert [c[0] for c in _calls(calls)].count("ls") >= 2  # asked again until the deadline
