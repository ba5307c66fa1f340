"""A real Flower deployment on loopback: one SuperLink and three SuperNodes as separate processes,
``hetpfl flwr-run`` (``flwr run``, followed to its end) of two FedMD rounds on digits, the results folder written by the ServerApp, and
every process stopped afterwards. The metrics must equal the in-process simulator's.

The commands are the ones docs/deployment.md gives (insecure on loopback only).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODES = 3

# The repository's default experiment, made small. The ServerApp finds configs/default.yaml in
# the app bundle that `flwr run` uploads (the SuperLink runs in another folder).
OVERRIDES = [
    "name=deploy-test", "seed=0", "rounds=2", "eval_every=2", "data.num_clients=3", "data.dataset=digits",
    "models.clients=[mlp, cnn_small]", "algorithm.pretrain_epochs=2", "algorithm.distill_epochs=1",
    "client.local_epochs=1",
]  # eval_every=2: evaluate after the last round only (each stage costs a process per node)

pytestmark = [
    pytest.mark.flower,
    pytest.mark.slow,
    pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink not installed beside python"),
]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop(procs: list[subprocess.Popen]) -> list[int]:
    """Stop what this test started (each in its own session) and their descendants; return survivors."""
    pids = []
    for proc in procs:
        pids.extend(_descendants(proc.pid))
        pids.append(proc.pid)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in pids:  # descendants that opened their own session (the SuperLink's SuperExec)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    return [pid for pid in pids if _alive(pid)]


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def test_superlink_three_supernodes_and_flwr_run(tmp_path):
    link_port, *node_ports = _free_ports(1 + NODES)
    home, logs, states, out = (tmp_path / d for d in ("flwr-home", "logs", "states", "results"))
    for d in (home, logs, states):
        d.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperNodes start flower-superexec by name
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # start each ClientApp 0.1 s after its message, not 1 s
        "HETPFL_RESULTS_ROOT": str(tmp_path),  # the SuperLink's owner lets runs write under the scratch folder
    }
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    overrides = "; ".join(OVERRIDES)
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = (logs / f"{name}.log").open("w")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    started = time.monotonic()
    try:
        link = start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                     "--disable-runtime-dependency-installation")
        _wait_for_port(link_port, 30, link)
        for i, port in enumerate(node_ports):
            start(f"supernode-{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(port), "--node-config",
                  f'partition-id={i} num-partitions={NODES} torch-threads=1 state-dir="{states}"')
        def flwr_run(run_config: str) -> subprocess.CompletedProcess:
            # `hetpfl flwr-run` is `flwr run` that follows the run and exits with how it ended
            return subprocess.run([str(BIN / "hetpfl"), "flwr-run", str(REPO), "loopback", "--run-config", run_config],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)

        run = flwr_run(f'config="configs/default.yaml" set="{overrides}" out="{out}" node-timeout=60 stage-timeout=120')
        logs_text = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(logs.glob("*.log")))
        assert (out / "summary.json").exists(), f"flwr-run: {run.returncode}\n{run.stdout}\n{run.stderr}\n{logs_text}"
        assert run.returncode == 0 and "finished:completed" in run.stderr, run.stderr
        # a ServerApp that fails (here: a config error) is a non-zero exit, with Flower's details
        failed = flwr_run(f'config="configs/default.yaml" set="{overrides}; rounds=0" out="{tmp_path / "bad"}"')
        assert failed.returncode == 1, (failed.returncode, failed.stderr)
        assert "ended finished:failed" in failed.stderr and "rounds" in failed.stderr, failed.stderr
    finally:
        survivors = _stop(procs)
    elapsed = time.monotonic() - started
    assert not survivors, f"processes still alive after stopping: {survivors}"

    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["runtime"] == "flower-deployment" and summary["name"] == "deploy-test"
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["failures"] == {} for r in rows)
    assert summary["final"]["personalized_acc_mean"] > 0.3  # chance is 0.1
    assert len(set(summary["flower"]["node_for_client"].values())) == NODES
    for name in ("config.yaml", "timings.jsonl", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    # each SuperNode kept its client's personal model on its side, between rounds
    assert sorted(p.name for p in states.glob("run-*/client-*.npz")) == [f"client-{i:06d}.npz" for i in range(NODES)]

    # and the numbers are the in-process simulator's, for the same seed
    from hetpfl.experiment import load_config, run_experiment

    run_experiment(load_config(REPO / "configs" / "default.yaml", OVERRIDES), tmp_path / "simulator")
    assert (out / "metrics.jsonl").read_text() == (tmp_path / "simulator" / "metrics.jsonl").read_text()
    print(f"deployment test: {elapsed:.1f} s end to end; rounds: "
          + ", ".join(f"{json.loads(t)['round_s']:.1f} s" for t in (out / "timings.jsonl").read_text().splitlines()))
