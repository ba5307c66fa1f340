"""Ditto, FedRep and FedBABU: personalized models next to a shared one.

* Ditto with λ = 0 gives every client exactly Local's model (same records for the personalized
  measures), and its personal model moves towards the received global model as λ grows;
* FedRep's head never travels (every upload is exactly the body's arrays), its head and body
  phases each train only their part, and the evaluate stage scores the latest global body under
  each client's own head;
* FedBABU's head never changes during federation and never travels up; personalization
  fine-tunes the part it is told to;
* bad hyperparameters fail before training, naming the key; stateful methods refuse stateless
  clients.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hetpfl.algorithms.parts import is_body, is_head
from hetpfl.algorithms.weights import shared_arrays
from hetpfl.clienthost import ClientHost
from hetpfl.configuration import ConfigError
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.messages import Message
from hetpfl.simulator import InProcessTransport

CONFIGS = Path(__file__).parent / "configs" / "alg"


def config(name: str, **overrides):
    return load_config(CONFIGS / f"{name}.yaml", [f"{k}={v}" for k, v in overrides.items()])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def slot(host: ClientHost, client: int, name: str = "model") -> dict[str, np.ndarray]:
    """A client's saved slot as ``{state-dict name: array}``."""
    prefix = f"{name}/"
    return {k[len(prefix):]: v for k, v in host.store.get(client).arrays.items() if k.startswith(prefix)}


def unprefixed(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[2:]: v for k, v in arrays.items()}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in keys)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys) -> float:
    return float(np.sqrt(sum(((a[k].astype(np.float64) - b[k]) ** 2).sum() for k in keys)))


def run_rounds_by_hand(run, rounds: int):
    """Every client in every round; returns the server, the host and the byte ledger."""
    host = ClientHost(run)
    transport = InProcessTransport(host)
    server = run.make_server()
    ledger = Ledger(run.num_clients)
    for rnd in range(rounds):
        server.round(rnd, list(range(run.num_clients)), RoundComm(run, transport, rnd, ledger))
    return server, host, ledger


# -- Ditto ---------------------------------------------------------------------------------------------


def test_ditto_with_lambda_zero_gives_every_client_locals_model(tmp_path):
    run_experiment(config("ditto", algorithm="{name: ditto, lam: 0}"), tmp_path / "ditto")
    run_experiment(config("ditto", algorithm="{name: local}"), tmp_path / "local")
    ditto, local = rows(tmp_path / "ditto"), rows(tmp_path / "local")
    fields = ["client_acc", "acc_by_arch"] + sorted(k for k in local[0] if k.startswith("personalized_acc_"))
    assert len(fields) == 5 and len(ditto) == len(local) == 4
    for d, loc in zip(ditto, local):
        assert {f: d[f] for f in fields} == {f: loc[f] for f in fields}
    assert "global_acc_mean" in ditto[-1] and "global_test_acc" in ditto[-1]  # Ditto reports its global model too


def test_ditto_personal_model_moves_towards_the_global_one_as_lambda_grows():
    personal, uploaded = {}, {}
    for lam in (0.0, 1.0, 10.0):
        run = prepare(config("ditto", algorithm=f"{{name: ditto, lam: {lam}}}")).run  # v^0: the client's own init
        server = run.make_server()
        sent = shared_arrays(server.global_model)
        host = ClientHost(run)
        reply = host.handle(0, "train", 0, Message(sent))
        personal[lam] = distance(slot(host, 0), unprefixed(sent), [k for k in unprefixed(sent) if "running" not in k])
        uploaded[lam] = reply.arrays
    assert personal[0.0] > personal[1.0] > personal[10.0]
    # the uploaded global copy does not depend on λ (its own stream, its own slot)
    assert same(uploaded[0.0], uploaded[1.0], uploaded[0.0]) and same(uploaded[0.0], uploaded[10.0], uploaded[0.0])


# -- FedRep --------------------------------------------------------------------------------------------


def test_fedrep_uploads_exactly_the_body_and_keeps_each_head_local():
    run = prepare(config("fedrep")).run
    server, host, ledger = run_rounds_by_hand(run, rounds=2)
    body = shared_arrays(server.global_model, is_body)
    assert body and not any(is_head(k[2:]) for k in body)
    for c in range(run.num_clients):
        upload = Message(body, {"num_examples": len(run.data.client_train[c])})
        assert ledger.up[c] == 2 * upload.num_bytes  # the body's arrays and the sample count, nothing more
        assert ledger.down[c] == 2 * Message(body).num_bytes
    heads = [slot(host, c)["head.weight"] for c in range(run.num_clients)]
    assert all(not np.allclose(heads[0], h) for h in heads[1:])  # personal heads
    fresh = run.make_server().global_model.state_dict()  # the server's head is never touched
    assert all(np.array_equal(server.global_model.state_dict()[k].numpy(), fresh[k].numpy()) for k in fresh if is_head(k))


def test_fedrep_head_and_body_phases_train_only_their_part():
    for phase in ("head", "body"):
        frozen = {"head": "body_epochs", "body": "head_epochs"}[phase]
        run = prepare(config("fedrep", **{f"algorithm.{frozen}": 0})).run
        host = ClientHost(run)
        sent = shared_arrays(run.make_server().global_model, is_body)
        before = {k: v.copy() for k, v in host.initial_record(0).arrays.items()}
        reply = host.handle(0, "train", 0, Message(sent))
        after = slot(host, 0)
        heads = [k for k in after if is_head(k)]
        if phase == "head":  # body frozen: the upload is exactly what was received
            assert same(unprefixed(reply.arrays), unprefixed(sent), unprefixed(sent))
            assert not same(after, {k[len("model/"):]: v for k, v in before.items()}, heads)
        else:  # head frozen: the client's head is its initial head
            assert same(after, {k[len("model/"):]: v for k, v in before.items()}, heads)
            assert not same(unprefixed(reply.arrays), unprefixed(sent), [k for k in unprefixed(sent) if "weight" in k])


def test_fedrep_evaluates_the_latest_global_body_under_the_clients_own_head(tmp_path):
    summary = run_experiment(config("fedrep"), tmp_path)
    records = rows(tmp_path)
    assert all("global_acc_mean" not in r and "global_test_acc" not in r for r in records)  # a body has no accuracy
    run = prepare(config("fedrep")).run
    body_bytes = Message(shared_arrays(run.make_server().global_model, is_body)).num_bytes
    assert summary["bytes_eval_total"] > 4 * run.num_clients * body_bytes  # the body goes to everyone, each round
    server, host, _ = run_rounds_by_hand(run, rounds=1)
    head_before = slot(host, 0)["head.weight"].copy()
    host.handle(0, "evaluate", 1, server.evaluation_messages([0])[0])
    evaluated = slot(host, 0)
    body = unprefixed(shared_arrays(server.global_model, is_body))
    assert same(evaluated, body, body) and np.array_equal(evaluated["head.weight"], head_before)


# -- FedBABU -------------------------------------------------------------------------------------------


def test_fedbabu_head_never_changes_nor_travels_up():
    run = prepare(config("fedbabu")).run
    server, host, ledger = run_rounds_by_hand(run, rounds=2)
    state = {k: v.numpy() for k, v in server.global_model.state_dict().items()}
    fresh = {k: v.numpy() for k, v in run.make_server().global_model.state_dict().items()}
    heads = [k for k in state if is_head(k)]
    bodies = [k for k in state if is_body(k) and "weight" in k]
    assert heads and same(state, fresh, heads)  # the random head, as initialized
    assert not same(state, fresh, bodies)  # the body did learn
    for c in range(run.num_clients):
        assert same(slot(host, c), state, heads)  # trained with the global head, frozen
        body = {k: v for k, v in shared_arrays(server.global_model).items() if is_body(k[2:])}
        assert ledger.up[c] == 2 * Message(body, {"num_examples": len(run.data.client_train[c])}).num_bytes


@pytest.mark.parametrize("finetune", ["head", "full"])
def test_fedbabu_personalization_fine_tunes_what_it_is_told(finetune):
    run = prepare(config("fedbabu", **{"algorithm.finetune": finetune})).run
    server, host, _ = run_rounds_by_hand(run, rounds=1)
    reply = host.handle(0, "evaluate", 0, server.evaluation_messages([0])[0])
    tuned = slot(host, 0)
    state = {k: v.numpy() for k, v in server.global_model.state_dict().items()}
    heads = [k for k in state if is_head(k)]
    bodies = [k for k in state if is_body(k) and "weight" in k]
    assert not same(tuned, state, heads)
    assert same(tuned, state, bodies) == (finetune == "head")
    assert 0 <= reply.scalars["accuracy"] <= 1


def test_fedbabu_reports_its_global_model(tmp_path):
    run_experiment(config("fedbabu"), tmp_path)
    last = rows(tmp_path)[-1]
    assert {"personalized_acc_mean", "global_acc_mean", "global_test_acc"} <= set(last)


# -- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, override, key", [
    ("ditto", {"algorithm.lam": -0.5}, "algorithm.lam"),
    ("ditto", {"algorithm.personal_epochs": -1}, "algorithm.personal_epochs"),
    ("ditto", {"algorithm.personal_init": "zeros"}, "algorithm.personal_init"),
    ("fedrep", {"algorithm.head_epochs": -1}, "algorithm.head_epochs"),
    ("fedrep", {"algorithm.body_epochs": -1}, "algorithm.body_epochs"),
    ("fedbabu", {"algorithm.finetune_epochs": -1}, "algorithm.finetune_epochs"),
    ("fedbabu", {"algorithm.finetune": "body"}, "algorithm.finetune"),
])
def test_bad_hyperparameters_fail_before_training_naming_the_key(name, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        config(name, **override)


@pytest.mark.parametrize("name", ["ditto", "fedrep"])
def test_personal_models_refuse_stateless_clients(name):
    with pytest.raises(ConfigError, match=rf"runtime\.client_state='none'.*{name}"):
        prepare(config(name, **{"runtime.client_state": "none"}))
