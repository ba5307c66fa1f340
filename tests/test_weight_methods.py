"""FedProx, FedBN and FedRS: FedAvg with one step changed, and FedAvg exactly when that step is off.

* FedProx with μ = 0, FedBN on a model without BatchNorm and FedRS with α = 1 write FedAvg's
  ``metrics.jsonl`` byte for byte (same config, same seed);
* FedProx's term pulls the local model towards the weights it received;
* FedBN keeps every BatchNorm tensor on its client and shares everything else;
* FedRS's restriction changes training only for a client that lacks classes;
* bad hyperparameters, and FedBN with stateless clients, fail before training, naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from conftest import small_config

from hetpfl.algorithms.fedbn import batchnorm_keys
from hetpfl.clienthost import ClientHost
from hetpfl.configuration import ConfigError
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.messages import Message
from hetpfl.simulator import InProcessTransport
from hetpfl.algorithms.weights import shared_arrays

CONFIGS = Path(__file__).parent / "configs" / "alg"


def config(name: str, **overrides):
    return load_config(CONFIGS / f"{name}.yaml", [f"{k}={v}" for k, v in overrides.items()])


def metrics(cfg, out: Path) -> str:
    run_experiment(cfg, out)
    return (out / "metrics.jsonl").read_text()


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((a[k].astype(np.float64) - b[k]) ** 2).sum() for k in a if k.startswith("w."))))


def first_update(cfg, client: int = 0) -> tuple[Message, Message]:
    """One client's round-0 train stage from the server's initial model: (sent, reply)."""
    run = prepare(cfg).run
    server = run.make_server()
    sent = Message(shared_arrays(server.global_model, server.shared(server.global_model)))
    return sent, ClientHost(run).handle(client, "train", 0, sent)


# -- the invariants: FedAvg exactly when the change is switched off -----------------------------------


@pytest.fixture(scope="module")
def fedavg_metrics(tmp_path_factory):
    return metrics(config("fedavg"), tmp_path_factory.mktemp("fedavg"))


def test_fedprox_with_mu_zero_is_fedavg_byte_for_byte(fedavg_metrics, tmp_path):
    assert metrics(config("fedavg", algorithm="{name: fedprox, mu: 0}"), tmp_path) == fedavg_metrics


def test_fedbn_on_a_model_without_batchnorm_is_fedavg_byte_for_byte(fedavg_metrics, tmp_path):
    assert config("fedavg").models.clients == ["cnn_small"]  # a plain conv net: no BatchNorm
    assert metrics(config("fedavg", algorithm="{name: fedbn}"), tmp_path) == fedavg_metrics


def test_fedrs_with_alpha_one_is_fedavg_byte_for_byte_on_clients_that_lack_classes(tmp_path):
    no_mixing = {"data.mix_fraction": 0.0}  # each client holds only its group's classes
    data = prepare(config("fedavg", **no_mixing)).run.data
    assert all(np.bincount(data.client_train[c].y, minlength=10).min() == 0 for c in range(data.num_clients))
    fedavg = metrics(config("fedavg", **no_mixing), tmp_path / "fedavg")
    assert metrics(config("fedavg", algorithm="{name: fedrs, alpha: 1.0}", **no_mixing), tmp_path / "fedrs") == fedavg


# -- each change does what it says ---------------------------------------------------------------------


def test_fedprox_term_pulls_the_local_model_towards_the_received_weights():
    sent, free = first_update(config("fedprox", **{"algorithm.mu": 0.0}))
    _, pulled = first_update(config("fedprox", **{"algorithm.mu": 10.0}))
    assert 0 < distance(pulled.arrays, sent.arrays) < 0.5 * distance(free.arrays, sent.arrays)


def test_fedrs_restriction_changes_training_only_where_classes_are_missing():
    no_mixing = {"data.mix_fraction": 0.0}  # client 0 holds half of the classes
    _, fedavg = first_update(config("fedavg", **no_mixing))
    _, restricted = first_update(config("fedavg", algorithm="{name: fedrs, alpha: 0.0}", **no_mixing))
    assert distance(restricted.arrays, fedavg.arrays) > 0
    # a client that holds every class trains exactly as under FedAvg, whatever α
    mixed = {"data.mix_fraction": 0.5}
    data = prepare(config("fedavg", **mixed)).run.data
    full = [c for c in range(data.num_clients) if np.bincount(data.client_train[c].y, minlength=10).min() > 0]
    assert full, "the mixed partition should leave some client with every class"
    _, same = first_update(config("fedavg", **mixed), client=full[0])
    _, unrestricted = first_update(config("fedavg", algorithm="{name: fedrs, alpha: 0.0}", **mixed), client=full[0])
    assert all(np.array_equal(unrestricted.arrays[k], same.arrays[k]) for k in same.arrays)


def test_fedbn_keeps_batchnorm_on_each_client_and_shares_the_rest():
    run = prepare(config("fedbn")).run
    host = ClientHost(run)
    transport = InProcessTransport(host)
    server = run.make_server()
    everyone = list(range(run.num_clients))
    bn = batchnorm_keys(server.global_model)
    assert any(k.endswith("running_mean") for k in bn) and any(k.endswith("num_batches_tracked") for k in bn)
    initial_bn = {k: v.clone() for k, v in server.global_model.state_dict().items() if k in bn}

    server.round(0, everyone, RoundComm(run, transport, 0, Ledger(run.num_clients)))  # local training
    sent = {k[2:]: v for k, v in shared_arrays(server.global_model, server.shared(server.global_model)).items()}
    assert sent and not (set(sent) & bn)  # BatchNorm never travels
    # a round without local training: each client loads the global shared part next to its own BN
    host.run = dataclasses.replace(run, training=dataclasses.replace(run.training, local_epochs=0))
    server.round(1, everyone, RoundComm(host.run, transport, 1, Ledger(run.num_clients)))

    def model_of(client):
        return {k[len("model/"):]: v for k, v in host.store.get(client).arrays.items() if k.startswith("model/")}

    first, second = model_of(0), model_of(1)
    for name, value in sent.items():  # conv and linear weights: exactly the global ones
        assert np.array_equal(first[name], value) and np.array_equal(second[name], value), name
    means = sorted(k for k in bn if k.endswith("running_mean"))
    assert all(not np.allclose(first[k], second[k]) for k in means)  # each client its own statistics
    assert all(not np.allclose(first[k], initial_bn[k].numpy()) for k in means)  # trained locally
    for name, value in server.global_model.state_dict().items():  # the server's BN never moved
        if name in bn:
            assert np.array_equal(value.numpy(), initial_bn[name].numpy()), name
    assert server.extra_models() == {} and server.test_models() == {}  # no complete global model


def test_fedbn_refuses_stateless_clients_before_training():
    with pytest.raises(ConfigError, match=r"runtime\.client_state='none'.*fedbn"):
        prepare(config("fedbn", **{"runtime.client_state": "none"}))


@pytest.mark.parametrize("override, key", [
    ({"algorithm.mu": -0.1}, "algorithm.mu"),
    ({"algorithm.alpha": 1.5}, "algorithm.alpha"),
    ({"algorithm.alpha": -0.1}, "algorithm.alpha"),
    ({"algorithm.min_count": 0}, "algorithm.min_count"),
])
def test_bad_hyperparameters_fail_before_training_naming_the_key(override, key):
    name = "fedprox" if key == "algorithm.mu" else "fedrs"
    with pytest.raises(ConfigError, match=rf"^{key}="):
        config(name, **override)


def test_local_steps_give_every_client_the_same_number_of_steps_whatever_its_size(monkeypatch, tmp_path):
    """``client.local_steps`` (Mosaic's and DFRD's I = 10) fixes the steps per round; without it a
    client's steps follow its data size (``local_epochs`` passes)."""
    import hetpfl.learn as learn

    taken: list[int] = []
    real_fit = learn.fit

    def counting_fit(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        taken.append(int(result["steps"]))
        return result

    monkeypatch.setattr(learn, "fit", counting_fit)
    overrides = {"models.clients": ["mlp"], "rounds": 1, "data.dirichlet_alpha": 0.1}
    run_experiment(small_config("fedavg", **overrides, **{"client.local_steps": 3}), tmp_path / "steps")
    assert taken == [3] * 6
    taken.clear()
    run_experiment(small_config("fedavg", **overrides), tmp_path / "epochs")
    assert len(taken) == 6 and len(set(taken)) > 1
