"""The Flower runtime: records, byte accounting, node mapping, failures, and Flower simulation.

Most tests drive the real ClientApp through a :class:`LocalGrid` (a Grid whose SuperNodes are
Contexts in this process), which is fast and exact; the last ones run Flower's simulation
engine (Ray) and compare with the in-process simulator, metric for metric.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

pytest.importorskip("flwr")

from conftest import small_config  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.app import Message as FlowerMessage  # noqa: E402

from hetpfl.algorithms import ALGORITHMS  # noqa: E402
from hetpfl.config import config_yaml  # noqa: E402
from hetpfl.experiment import prepare, run_experiment  # noqa: E402
from hetpfl.messages import Message  # noqa: E402
from hetpfl.runtimes import flower  # noqa: E402
from hetpfl.runtimes.flower import (  # noqa: E402
    FlowerRuntimeError,
    FlowerTransport,
    message_to_recorddict,
    message_to_records,
    recorddict_to_message,
    run_on_grid,
    stage_names,
    wait_for_nodes,
)
from hetpfl.flower_app import client_app, load_run_config  # noqa: E402

pytestmark = pytest.mark.flower


# ------------------------------------------------------------------------------------------
# Records and bytes
# ------------------------------------------------------------------------------------------

ARRAYS_OF_ALL_KINDS = {
    "probs": np.random.default_rng(0).random((7, 10)).astype(np.float32),
    "w.conv.weight": np.random.default_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32),
    "half": np.linspace(0, 1, 33).astype(np.float16),
    "idx": np.arange(100, dtype=np.int64),
    "small": np.array([1, -2, 3], dtype=np.int8),
    "mask": np.array([True, False, True]),
    "f64": np.array([[1.5, 2.5]], dtype=np.float64),
    "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    "scalar_array": np.array(3.25, dtype=np.float32),  # 0-d
    "empty": np.zeros((0, 5), dtype=np.float32),
}
SCALARS_OF_ALL_KINDS = {"count": 3, "big": 2**40, "lr": 0.125, "neg": -1.5e-8, "ok": True, "no": False,
                        "tag": "cluster-3", "unicode": "héllo"}


@pytest.mark.parametrize(
    "message",
    [
        Message(ARRAYS_OF_ALL_KINDS, SCALARS_OF_ALL_KINDS),
        Message(ARRAYS_OF_ALL_KINDS),
        Message(scalars=SCALARS_OF_ALL_KINDS),
        Message({"probs": ARRAYS_OF_ALL_KINDS["probs"]}, {"n": 1}),
        Message(),
    ],
    ids=["everything", "arrays", "scalars", "one-each", "empty"],
)
def test_byte_count_equals_flowers_count_bytes(message):
    arrays, scalars = message_to_records(message)
    flower_count = arrays.count_bytes() + (scalars.count_bytes() if len(scalars) else 0)
    assert message.num_bytes == flower_count
    assert flower.payload_bytes(message_to_recorddict(message, {"stage": "x", "round": 0})) == flower_count


def test_records_round_trip_exactly():
    message = Message(ARRAYS_OF_ALL_KINDS, SCALARS_OF_ALL_KINDS)
    back = recorddict_to_message(message_to_recorddict(message, {"stage": "s"}))
    assert list(back.arrays) == list(message.arrays)
    for key, array in message.arrays.items():
        assert back.arrays[key].dtype == array.dtype, key
        assert back.arrays[key].shape == array.shape, key
        np.testing.assert_array_equal(back.arrays[key], array)
    assert back.scalars == message.scalars
    assert [type(v) for v in back.scalars.values()] == [type(v) for v in message.scalars.values()]
    # and through Flower's wire format (protobuf) too
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    wire = recorddict_from_proto(recorddict_to_proto(message_to_recorddict(message)))
    again = recorddict_to_message(wire)
    assert again.scalars == message.scalars and all(
        np.array_equal(again.arrays[k], a) and again.arrays[k].dtype == a.dtype for k, a in message.arrays.items()
    )


def test_every_stage_of_every_algorithm_is_a_registered_query():
    registered = set(client_app._registered_funcs)  # noqa: SLF001 (Flower keeps them there)
    for spec in ALGORITHMS.values():
        for stage in spec.schemas:
            assert f"query.{stage}" in registered, f"{spec.name}: stage {stage}"
    assert {"query.evaluate", "query.hello"} <= registered
    assert set(stage_names()) >= {"evaluate", "hello"}


# ------------------------------------------------------------------------------------------
# A Grid in this process: the real ClientApp, one Context per SuperNode
# ------------------------------------------------------------------------------------------


class LocalGrid:
    """SuperNodes as Contexts in this process; counts Flower's bytes of every payload."""

    def __init__(self, node_configs, *, fail=None, silent=(), run_id=7):
        from flwr.supercore.task_identity import TaskIdentity

        # what a ServerApp process knows about itself (Flower's runtimes set it before main)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 1
        self.contexts = {
            1_000_003 * (i + 1): Context(run_id=run_id, node_id=1_000_003 * (i + 1), node_config=dict(cfg),
                                         state=RecordDict(), run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self.fail = fail or {}  # {(partition, stage): reason, or (Flower error code, reason)}
        self.silent = set(silent)  # {(partition, stage)}: no reply at all
        self.sent_bytes = {}  # stage -> Flower's count of the payloads sent down
        self.reply_bytes = {}  # stage -> Flower's count of the payloads sent up
        self.inbox = {}  # message id -> reply not pulled yet

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex  # as Flower's grids do
            ids.append(message_id)
            context = self.contexts[msg.metadata.dst_node_id]
            stage = msg.metadata.message_type.split(".", 1)[1]
            key = (context.node_config.get("partition-id"), stage)
            self.sent_bytes[stage] = self.sent_bytes.get(stage, 0) + flower.payload_bytes(msg.content)
            if key in self.silent:
                continue
            if key in self.fail:
                from flwr.app import Error

                code, reason = self.fail[key] if isinstance(self.fail[key], tuple) else (0, self.fail[key])
                self.inbox[message_id] = FlowerMessage(Error(code=code, reason=reason), reply_to=msg)
                continue
            reply = client_app(msg, context)
            if not reply.has_error():
                self.reply_bytes[stage] = self.reply_bytes.get(stage, 0) + flower.payload_bytes(reply.content)
            self.inbox[message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.inbox.pop(i) for i in list(message_ids) if i in self.inbox]


def _nodes(n, state_dir, **extra):
    return [{"partition-id": i, "num-partitions": n, "state-dir": str(state_dir), **extra} for i in range(n)]


def _measures(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_local_grid_reproduces_the_simulator_and_flowers_byte_counts(tmp_path):
    """Deployment's client path (one partition per node, state on disk) gives identical metrics,
    and the engine's traffic equals Flower's count_bytes() of every record that travelled."""
    config = small_config("fedmd", rounds=2)
    reference = run_experiment(config, tmp_path / "simulator")
    grid = LocalGrid(_nodes(config.data.num_clients, tmp_path / "states"))
    summary = run_experiment(config, tmp_path / "grid", runner=lambda prepared, on_round: run_on_grid(
        grid, prepared.run, config_yaml(prepared.config), on_round, node_timeout=5, runtime="flower-test"))
    assert _measures(tmp_path / "grid") == _measures(tmp_path / "simulator")
    assert summary["final"] == reference["final"] and summary["runtime"] == "flower-test"
    assert summary["bytes_down_total"] == sum(v for k, v in grid.sent_bytes.items() if k not in ("evaluate", "hello"))
    assert summary["bytes_up_total"] == sum(v for k, v in grid.reply_bytes.items() if k not in ("evaluate", "hello"))
    assert summary["bytes_eval_total"] == grid.sent_bytes["evaluate"] + grid.reply_bytes["evaluate"]
    assert grid.sent_bytes["hello"] == 0  # the hello carries no payload: only meta and the config
    # each node kept its personal model on its side, and nothing else: no copy of its partition
    states = sorted(p.name for p in (tmp_path / "states").glob("run-7/*"))
    assert states == [f"client-{i:06d}.npz" for i in range(6)]


def test_a_message_flower_could_not_deliver_is_a_failure_and_not_counted_as_sent(tmp_path):
    """Probe 4.1(c): Flower's NODE_UNAVAILABLE (code 5) means the message never reached its node, so
    its bytes are not traffic; a node that got the message and then failed (code 0) cost them."""
    config = small_config("fedmd", rounds=1)
    rows = {}
    for code in (0, 5):
        grid = LocalGrid(_nodes(6, tmp_path / f"states-{code}"), fail={(2, "communicate"): (code, "node gone")})
        run_experiment(config, tmp_path / f"code-{code}", runner=lambda prepared, on_round, grid=grid: run_on_grid(
            grid, prepared.run, config_yaml(prepared.config), on_round, node_timeout=5))
        rows[code] = _measures(tmp_path / f"code-{code}")[0]
        assert rows[code]["failures"]["2"] == f"communicate: node gone (Flower error code {code})"
    delivered, undelivered = rows[0]["bytes_down_by_client"], rows[5]["bytes_down_by_client"]
    assert undelivered[2] < delivered[2] and undelivered[:2] + undelivered[3:] == delivered[:2] + delivered[3:]


def test_failing_and_silent_clients_are_reported_and_the_round_goes_on(tmp_path):
    config = small_config("fedmd", rounds=2)
    grid = LocalGrid(_nodes(6, tmp_path / "states"), fail={(1, "digest_revisit"): "disk full"},
                     silent={(4, "communicate")})
    run_experiment(config, tmp_path / "out", runner=lambda prepared, on_round: run_on_grid(
        grid, prepared.run, config_yaml(prepared.config), on_round, node_timeout=5, stage_timeout=0.1))
    rows = _measures(tmp_path / "out")
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert row["failures"]["1"] == "digest_revisit: disk full (Flower error code 0)"
        assert row["failures"]["4"] == "communicate: no reply within 0.1 s"
        assert row["bytes_up_by_client"][4] == 0 and row["bytes_up_by_client"][1] > 0
        assert all(acc is not None for acc in row["client_acc"])  # everyone is still evaluated


def test_a_client_that_raises_becomes_an_error_reply(tmp_path):
    prepared = prepare(small_config("fedmd", rounds=1))
    grid = LocalGrid(_nodes(6, tmp_path))
    node_for_client = dict(enumerate(grid.get_node_ids()))
    transport = FlowerTransport(grid, node_for_client, experiment=config_yaml(prepared.config))
    result = transport.exchange("evaluate", 0, {0: Message(), 2: Message()})
    assert sorted(result.replies) == [0, 2] and not result.failures
    result = transport.exchange("communicate", 0, {3: Message({"public_idx": np.array([10**9])})})
    assert not result.replies and "IndexError" in result.failures[3]


def test_node_mapping_errors_name_the_problem(tmp_path):
    prepared = prepare(small_config("fedmd", rounds=1))
    text = config_yaml(prepared.config)
    nodes = _nodes(6, tmp_path)
    nodes[4]["partition-id"] = 3  # two nodes claim client 3, nobody hosts client 4
    grid = LocalGrid(nodes)
    with pytest.raises(FlowerRuntimeError, match=r"no SuperNode hosts client\(s\) \[4\].*claim partition-id=3"):
        flower.map_clients_to_nodes(grid, grid.get_node_ids(), prepared.run, text, timeout=5)
    wrong = LocalGrid([{**n, "num-partitions": 5} for n in _nodes(6, tmp_path)])
    with pytest.raises(FlowerRuntimeError, match="num-partitions=5 but the experiment has data.num_clients=6"):
        flower.map_clients_to_nodes(wrong, wrong.get_node_ids(), prepared.run, text, timeout=5)
    unnamed = LocalGrid([{} for _ in range(6)])
    with pytest.raises(FlowerRuntimeError, match="has no partition-id"):
        flower.map_clients_to_nodes(unnamed, unnamed.get_node_ids(), prepared.run, text, timeout=5)
    other_data = LocalGrid(_nodes(6, tmp_path))
    other_text = config_yaml(small_config("fedmd", rounds=1, seed=5))  # another partition
    with pytest.raises(FlowerRuntimeError, match="the node prepares other data"):
        flower.map_clients_to_nodes(other_data, other_data.get_node_ids(), prepared.run, other_text, timeout=5)


def test_a_spare_node_that_does_not_answer_is_not_fatal(tmp_path):
    prepared = prepare(small_config("fedmd", rounds=1))
    nodes = _nodes(6, tmp_path) + [{"partition-id": 99, "state-dir": str(tmp_path)}]
    grid = LocalGrid(nodes, silent={(99, "hello")})
    mapping = flower.map_clients_to_nodes(grid, grid.get_node_ids(), prepared.run, config_yaml(prepared.config),
                                          timeout=0.3)
    assert sorted(mapping) == list(range(6)) and len(set(mapping.values())) == 6


def test_waiting_for_nodes_times_out_with_a_clear_error():
    grid = LocalGrid([{"partition-id": 0}, {"partition-id": 1}])
    assert len(wait_for_nodes(grid, 2, timeout=1)) == 2
    with pytest.raises(FlowerRuntimeError, match=r"waited 0.2 s for 3 SuperNodes .* but 2 connected"):
        wait_for_nodes(grid, 3, timeout=0.2, poll=0.05)


def test_run_config_reads_a_path_inline_yaml_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "x.yaml"
    path.write_text("name: from-file\nrounds: 3\nalgorithm: fedmd\n")
    monkeypatch.setenv("HETPFL_CONFIG_DIRS", str(tmp_path))
    assert load_run_config({"config": str(path)}).rounds == 3
    config = load_run_config({"config": "{name: inline, rounds: 4, data: {num_clients: 3}}", "set": "seed=9; rounds=5"})
    assert (config.name, config.rounds, config.seed, config.data.num_clients) == ("inline", 5, 9, 3)
    assert load_run_config({"config": "configs/default.yaml"}).name == "default"
    from hetpfl.configuration import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        load_run_config({"config": "nowhere/x.yaml"})


def test_run_config_reads_and_writes_only_where_the_superlinks_owner_allows(tmp_path, monkeypatch):
    """reliability-probe.md 5.6, 5.9, 5.10: a submitter cannot read YAML from anywhere (nor see it
    echoed in an error), write results anywhere, or point the SuperLink at another data folder."""
    from hetpfl.configuration import ConfigError
    from hetpfl.flower_app import results_folder

    secret = tmp_path / "secret.yaml"
    secret.write_text("rounds: s3cr3t-token\n")
    monkeypatch.delenv("HETPFL_CONFIG_DIRS", raising=False)
    with pytest.raises(ConfigError, match="is outside the app and HETPFL_CONFIG_DIRS") as refused:
        load_run_config({"config": str(secret)})
    assert "s3cr3t" not in str(refused.value)
    with pytest.raises(ConfigError, match="is outside the app"):
        load_run_config({"config": "../../../../" + str(secret)})
    for run_config in ({"config": "configs/default.yaml", "set": "data.data_dir=/etc"},
                       {"config": "{name: x, data: {data_dir: /etc}}"}):
        with pytest.raises(ConfigError, match="data.data_dir is the SuperLink's own"):
            load_run_config(run_config)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HETPFL_RESULTS_ROOT", raising=False)
    config = load_run_config({"config": "{name: fine, rounds: 1}"})
    assert results_folder({}, config) == tmp_path / "runs" / "fine"
    with pytest.raises(ConfigError, match="is outside the results root"):
        results_folder({"out": "/etc/hetpfl"}, config)
    with pytest.raises(ConfigError, match="is outside the results root"):
        results_folder({"out": "runs/../elsewhere"}, config)
    monkeypatch.setenv("HETPFL_RESULTS_ROOT", str(tmp_path))
    assert results_folder({"out": str(tmp_path / "a" / "b")}, config) == tmp_path / "a" / "b"


# ------------------------------------------------------------------------------------------
# Flower's simulation engine (Ray): every method is compared with the simulator in
# tests/test_contract.py; here, a checkpointed flower-sim run resumes exactly.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_flower_simulation_checkpoints_and_resumes(tmp_path):
    config = small_config("cosmos", rounds=3, **{"runtime.name": "flower-sim", "runtime.checkpoint_every": 1,
                                                 "algorithm.server_arch": "mlp", "algorithm.server_epochs": 1})
    reference = tmp_path / "reference"
    run_experiment(small_config("cosmos", rounds=3, **{"algorithm.server_arch": "mlp", "algorithm.server_epochs": 1}),
                   reference)

    class Crash(RuntimeError):
        pass

    def crash(row):
        if row["round"] == 1:
            raise Crash

    out = tmp_path / "flower"
    with pytest.raises(Crash):
        run_experiment(config, out, on_round=crash)
    summary = run_experiment(config, out, resume=True)
    assert summary["resumed_at_round"] == 1 and summary["runtime"] == "flower-sim"
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    for name in ("config.yaml", "summary.json", "timings.jsonl", "accuracy.png"):
        assert (out / name).stat().st_size > 0
