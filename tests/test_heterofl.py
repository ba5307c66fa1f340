"""HeteroFL and FedRolex: with every client at width 1 they write FedAvg's records byte for byte;
each client receives its own window of the full model; the server averages each entry over the
clients that held it (FedAvg's arithmetic when all hold everything); bad federations fail early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hetpfl.algorithms.submodels import average_submodels, scaled_hidden_outputs
from hetpfl.algorithms.weights import weighted_average
from hetpfl.configuration import ConfigError
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.learn import state_to_arrays
from hetpfl.messages import Message
from hetpfl.models import ModuleSpec, build_model, build_module

CONFIGS = Path(__file__).parent / "configs" / "alg"
METHODS = ["heterofl", "fedrolex"]


def config(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


# --- width 1 is FedAvg ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fedavg_runs(tmp_path_factory):
    cache = {}

    def get(arch: str, rounds: int) -> str:
        if (arch, rounds) not in cache:
            out = tmp_path_factory.mktemp(f"fedavg-{arch}")
            run_experiment(config("fedavg", f"models.clients=[{arch}]", f"rounds={rounds}"), out)
            cache[arch, rounds] = (out / "metrics.jsonl").read_text()
        return cache[arch, rounds]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,rounds", [("cnn_small", 4), ("resnet_small", 2)])  # resnet: BN buffers
def test_every_client_at_width_one_writes_fedavgs_records(method, arch, rounds, fedavg_runs, tmp_path):
    run_experiment(config("fedavg", f"algorithm={method}", f"models.clients=[{arch}]", f"rounds={rounds}"), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == fedavg_runs(arch, rounds)  # byte-identical


# --- what each client receives ------------------------------------------------------------------

class Replies:
    """A Comm that records what was sent and answers every client with its arrays + 1."""

    def __init__(self, answer: bool = True) -> None:
        self.sent: dict[int, Message] = {}
        self.answer = answer

    def ask(self, stage, messages):
        assert stage == "train"
        self.sent = dict(messages)
        if not self.answer:
            return {}
        return {c: Message({k: v + 1 if k.startswith("w.") else v for k, v in m.arrays.items()},
                           {"num_examples": 10 * (c + 1)}) for c, m in sorted(messages.items())}


def _server(method: str):
    run = prepare(config(method)).run
    return run, run.make_server()


@pytest.mark.parametrize("method", METHODS)
def test_each_client_receives_its_window(method):
    run, server = _server(method)
    full = state_to_arrays(server.global_model)
    clients = list(range(run.num_clients))
    for rnd in (0, 1, 5, 17):
        comm = Replies(answer=False)
        server.round(rnd, clients, comm)
        for c in clients:
            spec = ModuleSpec.parse(run.client_archs[c])
            k = {"cnn_small": 16, "cnn_small@0.5": 8, "cnn_small@0.25": 4}[run.client_archs[c]]
            rows = np.arange(k) if method == "heterofl" or k == 16 else (np.arange(k) - rnd) % 16
            arrays = comm.sent[c].arrays
            assert list(arrays) == list(full)
            assert np.array_equal(arrays["w.body.0.weight"], full["w.body.0.weight"][rows])
            assert np.array_equal(arrays["w.body.0.bias"], full["w.body.0.bias"][rows])
            narrow = build_module(spec, run.data.input_shape, run.data.num_classes)
            assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in state_to_arrays(narrow).items()}


@pytest.mark.parametrize("method", METHODS)
def test_server_updates_exactly_the_entries_clients_held(method):
    run, server = _server(method)
    narrow = [c for c in range(run.num_clients) if run.client_archs[c] == "cnn_small@0.25"]
    assert narrow
    before = state_to_arrays(server.global_model)
    rnd = 3
    server.round(rnd, narrow, Replies())
    after = state_to_arrays(server.global_model)
    rows = np.arange(4) if method == "heterofl" else (np.arange(4) - rnd) % 16
    changed = after["w.body.0.bias"] != before["w.body.0.bias"]
    assert np.flatnonzero(changed).tolist() == sorted(rows.tolist())
    np.testing.assert_allclose(after["w.body.0.bias"][rows], before["w.body.0.bias"][rows] + 1, rtol=1e-6)
    np.testing.assert_allclose(after["w.head.bias"], before["w.head.bias"] + 1, rtol=1e-6)  # classes: all hold it


# --- the per-entry average ------------------------------------------------------------------------

def test_average_by_hand():
    full = {"w.a": np.array([10, 20, 30, 40], np.float32), "w.m": np.zeros((2, 2), np.float32),
            "b.n": np.array(5, np.int64)}
    idx_a = {"w.a": (np.array([0, 1]),), "w.m": (np.array([0]), np.array([0, 1])), "b.n": ()}
    idx_b = {"w.a": (np.array([3, 0]),), "w.m": (np.array([1]), np.array([0, 1])), "b.n": ()}
    sub_a = {"w.a": np.array([1, 2], np.float32), "w.m": np.array([[1, 2]], np.float32), "b.n": np.array(7)}
    sub_b = {"w.a": np.array([4, 5], np.float32), "w.m": np.array([[3, 4]], np.float32), "b.n": np.array(2)}
    out = average_submodels(full, [sub_a, sub_b], [idx_a, idx_b], [1.0, 3.0])
    # a[0]: both hold it, (1*1 + 3*5) / 4 = 4; a[1]: only A, 2; a[2]: nobody, stays 30; a[3]: only B, 4
    assert out["w.a"].tolist() == [4.0, 2.0, 30.0, 4.0] and out["w.a"].dtype == np.float32
    assert out["w.m"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert out["b.n"].dtype == np.int64 and int(out["b.n"]) == 7
    assert full["w.a"].tolist() == [10, 20, 30, 40]  # the input is not modified


def test_average_when_all_hold_everything_is_fedavgs_bytes():
    rng = np.random.default_rng(0)
    model = build_model("resnet_small", (1, 8, 8), 10)
    full = state_to_arrays(model)
    states = [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) if k.startswith("w.") else v + i
               for k, v in full.items()} for i in range(4)]
    sizes = [13.0, 7.0, 29.0, 1.0]
    index = {k: tuple(np.arange(n) for n in v.shape) for k, v in full.items()}
    ours = average_submodels(full, states, [index] * 4, sizes)
    theirs = weighted_average(states, sizes)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].tobytes() == theirs[key].tobytes(), key


# --- the scaler ---------------------------------------------------------------------------------

def test_scaler_divides_hidden_outputs_and_leaves_no_hooks():
    torch.manual_seed(0)
    model = build_model("cnn_small", (1, 8, 8), 10, width=0.5)
    x, f = torch.randn(3, 1, 8, 8), torch.ones(1, 64)
    with torch.no_grad():
        plain = model.body[0](x)
        with scaled_hidden_outputs(model, 0.5):
            for mode in (True, False):  # training and evaluation alike
                model.train(mode)
                assert torch.equal(model.body[0](x), plain / 0.5)
                assert torch.equal(model.head(f), model.head.forward(f))  # the head is not scaled
        assert torch.equal(model.body[0](x), plain)
        with scaled_hidden_outputs(model, 1.0):
            assert not model.body[0]._forward_hooks  # nothing at width 1
    assert all(not m._forward_hooks for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


# --- bad federations fail before training ---------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("clients,message", [
    ("[mlp]", "architecture 'mlp' has no width support"),
    ("[mlp@0.5]", "architecture 'mlp' has no width support"),
    ("[vgg_small, vgg_small@0.5]", "architecture 'vgg_small' has no width support"),
    ("[cnn_small, resnet_small@0.5]", "all clients must share one architecture"),
    ("[cnn_small, cnn_small@1.5]", r"width=1.5 must be a number in \(0, 1\]"),
    ("[cnn_small@0]", r"width=0.0 must be a number in \(0, 1\]"),
])
def test_bad_federations_name_models_clients(method, clients, message):
    with pytest.raises(ConfigError, match=message) as err:
        prepare(config(method, f"models.clients={clients}"))
    assert str(err.value).startswith("models.clients")
