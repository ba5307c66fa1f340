"""The client side's seams: module slots, typed state, groups and batched handlers, an extendable
evaluate stage, per-task accuracy, and the checks a spec passes at registration."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import small_config
from hetpfl.algorithms.base import (
    EVALUATE_SCHEMA,
    AlgorithmSpec,
    Client,
    ClientContext,
    Server,
    evaluation_reply,
)
from hetpfl.clienthost import ClientHost
from hetpfl.engine import run_rounds
from hetpfl.experiment import prepare, run_experiment
from hetpfl.messages import ArrayField, Message, Schema, StageSchema
from hetpfl.models import ModuleSpec
from hetpfl.simulator import InProcessTransport, SequentialExecutor, simulate

# -- a toy method whose clients hold two slots ---------------------------------------------------


@dataclass
class ToyConfig:
    expert_arch: str = "mlp_wide"


def toy_modules(arch: str, config: ToyConfig, data=None) -> dict[str, ModuleSpec]:
    return {"model": ModuleSpec.of(arch), "expert": ModuleSpec.of(config.expert_arch)}


EXPERT = ArrayField(dtype="float32", shape=None)


class ToyServer(Server):
    def round(self, rnd, clients, comm):
        replies = comm.ask("bump", {c: Message() for c in clients})
        return {"bumped": float(len(replies))}


class ToyClient(Client):
    """``bump``: add 1 to the expert's first weight, count calls in the state, reply the weight."""

    def bump(self, message: Message, ctx: ClientContext) -> Message:
        first = next(ctx.modules["expert"].parameters())
        with torch.no_grad():
            first.view(-1)[0] += 1.0
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        return Message({"first": first.detach().numpy().copy()}, {"calls": ctx.state["calls"]})


class BatchedToyClient(ToyClient):
    many_calls: list = []  # a class-level probe for the test, not per-client state

    def bump_many(self, messages, ctxs):
        type(self).many_calls.append(sorted(ctxs))
        return {c: self.bump(messages[c], ctxs[c]) for c in sorted(ctxs)}


def toy_spec(client_cls=ToyClient, **extra) -> AlgorithmSpec:
    return AlgorithmSpec(
        name="toy", config_cls=ToyConfig, server_cls=ToyServer, client_cls=client_cls,
        schemas={"bump": StageSchema(up=Schema(arrays={"first": EXPERT}, scalars={"calls": int}))},
        summary="test", client_modules=toy_modules, **extra,
    )


def toy_run(spec=None, rounds=3):
    run = prepare(small_config("local", rounds=rounds)).run
    return dataclasses.replace(run, algorithm=spec or toy_spec(), algorithm_config=ToyConfig())


def test_slots_are_seeded_per_client_and_slot_kept_between_rounds_and_reused():
    run = toy_run()
    host = ClientHost(run)
    first = {}
    for rnd in range(3):
        for c in range(run.num_clients):
            reply = host.handle(c, "bump", rnd, Message())
            first.setdefault(c, []).append(float(reply.arrays["first"].reshape(-1)[0]))
            assert reply.scalars["calls"] == rnd + 1  # the typed state persists
    for c in range(run.num_clients):
        init = next(run.new_module(ModuleSpec.of("mlp_wide"), "client", c, "expert").parameters()).detach().reshape(-1)[0]
        assert first[c] == pytest.approx([float(init) + 1, float(init) + 2, float(init) + 3], abs=1e-5)
    assert len({round(v[0], 6) for v in first.values()}) == run.num_clients  # each client its own seed
    # the main slot keeps the seed of earlier versions: ("client", id)
    model_0 = {k[len("model/"):]: v for k, v in host.store.get(0).arrays.items() if k.startswith("model/")}
    reference = run.new_model(run.client_archs[0], "client", 0).state_dict()
    assert all(np.array_equal(model_0[k], reference[k].numpy()) for k in reference)  # "bump" never trains it
    # one live instance per (slot, architecture), whatever the number of clients
    assert sorted((slot, spec.arch, len(pool)) for (slot, spec), pool in host._live.items()) == sorted(
        [("expert", "mlp_wide", 1)] + [("model", a, 1) for a in set(run.client_archs)])


def test_groups_follow_slot_architectures():
    run = toy_run()
    host = ClientHost(run)
    groups = host.groups(list(range(run.num_clients)))
    assert sorted(c for g in groups for c in g) == list(range(run.num_clients))
    for group in groups:
        assert len({run.client_archs[c] for c in group}) == 1 and group == sorted(group)


class BatchedExecutor(SequentialExecutor):
    batched = True


def test_a_batched_executor_calls_the_batched_handler_with_whole_groups():
    BatchedToyClient.many_calls = []
    run = toy_run(toy_spec(BatchedToyClient))
    host = ClientHost(run)
    transport = InProcessTransport(host, BatchedExecutor())
    batched = run_rounds(run, transport)
    groups = host.groups(list(range(run.num_clients)))
    assert BatchedToyClient.many_calls[: len(groups)] == groups and len(BatchedToyClient.many_calls) == 3 * len(groups)
    assert max(len(pool) for pool in host._live.values()) == max(len(g) for g in groups)  # one instance per member
    one_by_one = simulate(toy_run(toy_spec(BatchedToyClient)))  # sequential never calls bump_many
    assert len(BatchedToyClient.many_calls) == 3 * len(groups)
    assert batched["final"] == one_by_one["final"]


def test_the_sequential_group_executor_visits_clients_in_any_group_order_with_the_same_results(tmp_path):
    """Clients are independent (keyed streams, weights reloaded per call): running the groups in
    reverse order gives the same records."""

    class Reversed(SequentialExecutor):
        def run(self, host, stage, rnd, groups, messages):
            return super().run(host, stage, rnd, list(reversed(groups)), messages)

    config = small_config("fedmd", rounds=2)
    records = {}
    for name, executor in (("forward", SequentialExecutor()), ("reverse", Reversed())):
        rows = []
        simulate(prepare(config).run, executor=executor, on_round=lambda r, rows=rows: rows.append(
            json.dumps({k: v for k, v in r.items() if k != "timing"})))
        records[name] = rows
    assert records["forward"] == records["reverse"]


# -- an extended evaluate stage and per-task accuracy ----------------------------------------------


class MarginClient(ToyClient):
    def evaluate(self, message, ctx):
        reply = evaluation_reply(ctx.model, ctx.test, ctx.num_tasks)
        reply.scalars["margin"] = float(ctx.client_id) / 10
        return reply


def test_a_method_may_extend_the_evaluate_schema_and_the_engine_reports_it():
    schemas = dict(toy_spec().schemas)
    schemas["evaluate"] = StageSchema(up=Schema(scalars={**EVALUATE_SCHEMA.up.scalars, "margin": float}))
    spec = dataclasses.replace(toy_spec(MarginClient), schemas=schemas)
    rows = []
    simulate(toy_run(spec, rounds=1), on_round=rows.append)
    n = len(rows[0]["client_acc"])
    assert rows[0]["margin_client"] == pytest.approx([c / 10 for c in range(n)])
    assert rows[0]["margin_mean"] == pytest.approx(np.mean([c / 10 for c in range(n)]))


def test_class_incremental_drift_reports_accuracy_per_task_seen(tmp_path):
    config = small_config("local", rounds=3, **{"data.drift.scheme": "class_incremental", "data.drift.tasks": 5,
                                                "data.drift.rounds_per_task": 1})
    summary = run_experiment(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["acc_by_task"]) for r in rows] == [["task_0"], ["task_0", "task_1"], ["task_0", "task_1", "task_2"]]
    assert rows[0]["acc_by_task"]["task_0"] > 0.6  # two classes
    # local training on the current task only: the first task is forgotten (class-incremental drift)
    assert rows[2]["acc_by_task"]["task_0"] < 0.5 * rows[0]["acc_by_task"]["task_0"]
    assert summary["final"]["acc_by_task"] == rows[-1]["acc_by_task"]


# -- what a spec must satisfy to be registered -----------------------------------------------------


def test_a_spec_is_checked_when_registered():
    with pytest.raises(ValueError, match="stage 'train' is declared but ToyClient has no method 'train'"):
        dataclasses.replace(toy_spec(), schemas={"train": StageSchema()})
    with pytest.raises(ValueError, match="must be a Python identifier"):
        dataclasses.replace(toy_spec(), schemas={"two words": StageSchema()})
    with pytest.raises(ValueError, match=r"evaluate schema must keep \['accuracy'"):
        dataclasses.replace(toy_spec(), schemas={**toy_spec().schemas, "evaluate": StageSchema()})
    spec = dataclasses.replace(toy_spec(), client_modules=lambda arch, config, data: {"state": ModuleSpec.of(arch)})
    with pytest.raises(ValueError, match="other than 'state'"):
        spec.modules_for("mlp", ToyConfig())
