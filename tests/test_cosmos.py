"""COSMOS and its model-agnostic baselines (COMET, FedCT): what travels, label-blindness, the
clustering found, both measures reported, and the server's behaviour round to round."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hetpfl.algorithms import get_algorithm
from hetpfl.algorithms.base import ServerSetup
from hetpfl.algorithms import cosmos as cosmos_module
from hetpfl.algorithms.cosmos import CosmosConfig, CosmosServer, collapsed
from hetpfl.algorithms.pseudo_label_client import PseudoLabelClientConfig, sample_weights
from hetpfl.configuration import ConfigError
from hetpfl.data import PublicSet
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.messages import Message, array_nbytes
from hetpfl.models import build_model


def cosmos_config(algorithm: str = "cosmos", **overrides):
    """Seconds-long: digits, 15 clients in the paper's 5 label groups, two model families."""
    algo = {"name": algorithm, "distill_epochs": 1}
    if algorithm == "cosmos":
        algo.update(server_arch="mlp", server_epochs=2, server_lr=0.001)
    base = {
        "name": f"test-{algorithm}",
        "seed": 0,
        "rounds": 2,
        "algorithm": algo,
        "data": {"dataset": "digits", "num_clients": 15, "partition": "cosmos", "groups": 5,
                 "dirichlet_alpha": 5.0, "mix_fraction": 0.1, "public_fraction": 0.2},
        "models": {"clients": ["mlp", "cnn_small"]},
        "client": {"local_epochs": 5, "batch_size": 32, "lr": 0.003},
    }
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in overrides.items()])


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One default COSMOS run shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("cosmos-reference")
    return out, run_experiment(cosmos_config(), out)


def test_cosmos_reports_both_measures_and_finds_the_true_groups(reference_run):
    out, summary = reference_run
    for row in _rows(out):
        assert row["server"]["num_clusters"] == 5
        assert row["cluster_ari"] == 1.0  # label-free choice of K recovers the 5 groups
        assert 0.1 < row["personalized_acc_mean"] <= 1 and 0.1 < row["server_acc_mean"] <= 1
        assert row["server"]["collapse_retries"] >= 0 and "silhouette" in row["server"]
        assert all(a is not None for a in row["server_client_acc"])
    final = summary["final"]
    assert final["personalized_acc_mean"] > 0.6 and final["server_acc_mean"] > 0.5  # chance: 0.1
    assert final["cluster_ari"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_automatic_k_recovers_25_clients_in_5_groups(tmp_path, seed):
    config = cosmos_config(rounds=1, seed=seed, **{"data.num_clients": 25, "algorithm.server_epochs": 1})
    summary = run_experiment(config, tmp_path)
    assert summary["final"]["cluster_ari"] == 1.0 and summary["server"]["num_clusters"] == 5


def test_only_predictions_up_and_pseudo_labels_down(reference_run):
    out, _ = reference_run
    prepared = prepare(cosmos_config())
    n_public, n_classes = len(prepared.run.data.public), prepared.run.data.num_classes
    matrix = array_nbytes(np.zeros((n_public, n_classes), np.float32))
    assert matrix == n_public * n_classes * 4 + 128  # the float32 payload plus the .npy header
    rows = _rows(out)
    for row in rows:
        assert row["bytes_up_by_client"] == [matrix + len("probs")] * 15  # no weights, no gradients
    assert rows[0]["bytes_down_by_client"] == [0] * 15  # nothing to distill in the first round
    assert rows[1]["bytes_down_by_client"] == [matrix + len("targets")] * 15


def _garbage_labels(n):
    return np.random.default_rng(123).integers(0, 10, n)


def test_default_is_label_blind(reference_run, tmp_path, monkeypatch):
    """Identical numbers when the public labels are garbage; in fact they are never even read."""

    def forbidden(self):
        raise AssertionError("the public labels were read")

    def garbage(prepared):
        data = prepared.run.data
        data.public = PublicSet(np.array(data.public.inputs), _garbage_labels(len(data.public)))

    monkeypatch.setattr(PublicSet, "labels_for_evaluation", forbidden)
    run_experiment(cosmos_config(), tmp_path, on_prepared=garbage)
    assert (tmp_path / "metrics.jsonl").read_text() == (reference_run[0] / "metrics.jsonl").read_text()


def test_public_label_weighting_is_an_explicit_leak(tmp_path, monkeypatch):
    """The official code's weighting reads the true public labels: opt-in, and it really does."""
    leak = {"algorithm.client_weighting": "public_labels"}
    assert prepare(cosmos_config(**leak)).run.leaked_public_labels is not None
    assert prepare(cosmos_config()).run.leaked_public_labels is None
    run_experiment(cosmos_config(**leak), tmp_path / "true")
    monkeypatch.setattr(PublicSet, "labels_for_evaluation", lambda self: _garbage_labels(len(self)))
    run_experiment(cosmos_config(**leak), tmp_path / "garbage")
    assert _rows(tmp_path / "true")[0] == _rows(tmp_path / "garbage")[0]  # round 0: no distillation yet
    assert _rows(tmp_path / "true")[1] != _rows(tmp_path / "garbage")[1]


def test_comet_clusters_and_averages_soft_labels(tmp_path):
    summary = run_experiment(cosmos_config("comet"), tmp_path)
    rows = _rows(tmp_path)
    matrix = array_nbytes(np.zeros((len(prepare(cosmos_config("comet")).run.data.public), 10), np.float32))
    assert rows[0]["bytes_down"] == 0 and rows[1]["bytes_down_by_client"] == [matrix + len("targets")] * 15
    assert rows[0]["bytes_up_by_client"] == [matrix + len("probs")] * 15
    assert rows[-1]["server"]["num_clusters"] == 5 and "cluster_ari" in rows[-1]
    assert "server_acc_mean" not in summary["final"]  # no server model
    assert summary["final"]["personalized_acc_mean"] > 0.6


def test_fedct_sends_hard_labels_both_ways(tmp_path):
    config = cosmos_config("fedct")
    n_public = len(prepare(config).run.data.public)
    summary = run_experiment(config, tmp_path)
    rows = _rows(tmp_path)
    labels = array_nbytes(np.zeros(n_public, np.int64)) + len("labels")
    assert rows[0]["bytes_up_by_client"] == [labels] * 15 and rows[0]["bytes_down"] == 0
    assert rows[1]["bytes_down_by_client"] == [labels] * 15
    assert 0 < rows[1]["server"]["agreement"] <= 1
    assert summary["final"]["personalized_acc_mean"] > 0.6


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="oracle_clusters"):
        cosmos_config(**{"algorithm.cluster_selection": "oracle"})
    with pytest.raises(ConfigError, match="aggregation"):
        cosmos_config(**{"algorithm.aggregation": "mode"})
    with pytest.raises(ConfigError, match="client_weighting"):
        cosmos_config(**{"algorithm.client_weighting": "labels"})
    with pytest.raises(ConfigError, match="_public_labels|unknown key"):
        cosmos_config(**{"algorithm._public_labels": "[1, 2]"})  # never settable from a config
    assert get_algorithm("cosmos").uses_public and get_algorithm("fedct").uses_public


# -- the client's loss weights -------------------------------------------------------------------

def test_client_weights():
    targets = np.eye(3, dtype=np.float32)[[0, 2, 2, 1]]
    counts = np.array([10, 0, 4])
    cfg = PseudoLabelClientConfig()
    np.testing.assert_allclose(sample_weights(cfg, targets, counts), np.array([10, 4, 4, 0]) / 4)
    assert sample_weights(PseudoLabelClientConfig(client_weighting="none"), targets, counts) is None
    leak = PseudoLabelClientConfig(client_weighting="public_labels")
    with pytest.raises(ValueError, match="experiment layer"):
        sample_weights(leak, targets, counts)
    np.testing.assert_allclose(sample_weights(leak, targets, counts, np.array([1, 1, 0, 2])), np.array([0, 0, 10, 4]) / 4)
    assert not cfg.uses_public_labels and leak.uses_public_labels


# -- the server, driven directly -----------------------------------------------------------------

class ScriptedComm:
    """Replies with given predictions and records what went down."""

    workers = 1  # Comm.map runs in turn

    def __init__(self, probs_by_round):
        self.probs_by_round, self.sent, self.rnd, self.mapped = probs_by_round, [], 0, []

    def ask(self, stage, messages):
        assert stage == "round"
        self.sent.append(messages)
        return {c: Message({"probs": self.probs_by_round[self.rnd][c]}) for c in sorted(messages)}

    def map(self, work, tasks):
        self.mapped.append(len(tasks))
        return [work(*task) for task in tasks]


class CopyingComm(ScriptedComm):
    """Runs ``Comm.map``'s work on copies, two at a time, as the processes executor's workers do."""

    workers = 2

    def map(self, work, tasks):
        self.mapped.append(len(tasks))
        return [work(*copy.deepcopy(task)) for task in tasks]


def _setup(num_clients, n_public=64, dim=6, seed=0):
    x = np.random.default_rng(seed).normal(size=(n_public, dim)).astype(np.float32)

    def build(arch, key):
        torch.manual_seed(abs(hash(key)) % 2**31)
        return build_model(arch, (dim,), 4)

    return ServerSetup(num_clients=num_clients, num_classes=4, input_shape=(dim,), client_archs=["mlp"] * num_clients,
                       public_inputs=x, training=None, seed=seed, build_model=build)  # a ModuleFactory


def _two_groups(n_public=64, permute=False, seed=0):
    """Clients 0-2 (and 3-5) predict classes 0-1 (2-3): two obvious groups."""
    rng = np.random.default_rng(seed)
    probs = {}
    for c in range(6):
        g = (c >= 3) if not permute else (c % 2 == 1)
        p = rng.dirichlet(np.ones(4), size=n_public) * 0.1
        p[:, [2 * g, 2 * g + 1]] += rng.dirichlet(np.ones(2), size=n_public)
        probs[c] = (p / p.sum(1, keepdims=True)).astype(np.float32)
    return probs


@pytest.mark.parametrize("selection", ["auto", "oracle", "threshold"])
def test_server_clusters_once_keeps_models_and_feeds_back_cluster_predictions(selection):
    # no collapse guard: a retry would rightly replace a model, and whether one fires depends on the init
    extra = {"oracle_clusters": 2} if selection == "oracle" else {"epsilon": 5.0} if selection == "threshold" else {}
    config = CosmosConfig(server_arch="mlp", server_epochs=1, collapse_guard=False, cluster_selection=selection, **extra)
    server = CosmosServer(config, _setup(6))
    comm = ScriptedComm([_two_groups(), _two_groups(permute=True)])
    measures = server.round(0, list(range(6)), comm)
    assert all(m.arrays == {} for m in comm.sent[0].values())  # nothing to distill at round 0
    assert measures["num_clusters"] == 2
    np.testing.assert_array_equal(server.cluster_assignment(), [0, 0, 0, 1, 1, 1])
    models = dict(server.models)
    comm.rnd = 1
    server.round(1, list(range(6)), comm)  # different predictions, but clustering stays (once)
    np.testing.assert_array_equal(server.cluster_assignment(), [0, 0, 0, 1, 1, 1])
    assert all(server.models[k] is models[k] for k in models)  # g_k kept across rounds
    down = comm.sent[1]
    np.testing.assert_array_equal(down[0].arrays["targets"], down[2].arrays["targets"])
    assert not np.array_equal(down[0].arrays["targets"], down[3].arrays["targets"])
    extra_models = server.extra_models()["server"]
    assert extra_models[1] is server.models[0] and extra_models[4] is server.models[1]


def _first_round(monkeypatch, comm, verdicts):
    """Round 0 of a server whose collapse verdicts are scripted (in the order the walk asks for them);
    its models are tagged with their registry keys."""
    setup = _setup(6)
    build = setup.build_model

    def tagged(arch, key):
        model = build(arch, key)
        model.key = key
        return model

    setup.build_model = tagged
    verdicts = iter(verdicts)
    monkeypatch.setattr(cosmos_module, "collapsed", lambda q, target: next(verdicts))
    server = CosmosServer(CosmosConfig(server_arch="mlp", server_epochs=1), setup)
    measures = server.round(0, list(range(6)), comm)
    return server.models, measures["collapse_retries"]


def _same_models(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].key == b[k].key
        for name, tensor in a[k].state_dict().items():
            assert torch.equal(tensor, b[k].state_dict()[name])


def test_server_models_get_their_in_turn_keys_when_a_retry_comes_first(monkeypatch):
    """Where two tasks run at once, cluster 1's first attempt is trained beside cluster 0's with the
    next key, but a model keeps the key it gets when the clusters are trained in turn: cluster 0's
    retry takes key 1, so cluster 1's model is built again with key 2; the models are the same
    whether the work ran in turn or on copies, two at a time."""
    in_turn, retries = _first_round(monkeypatch, ScriptedComm([_two_groups()]), [True, False, False])
    on_copies, _ = _first_round(monkeypatch, CopyingComm([_two_groups()]), [True, False, False])
    assert retries == 1
    assert {k: m.key for k, m in in_turn.items()} == {0: "cosmos-server-1", 1: "cosmos-server-2"}
    _same_models(in_turn, on_copies)
    no_retry, _ = _first_round(monkeypatch, ScriptedComm([_two_groups()]), [False, False])
    assert no_retry[1].key == "cosmos-server-1"  # no retry: the planned keys hold
    # the retried run's cluster 1 started from key 2, not from key 1's model
    assert not torch.equal(no_retry[1].state_dict()["body.1.weight"], in_turn[1].state_dict()["body.1.weight"])


def test_a_collapsing_clusters_retries_are_trained_two_at_a_time_with_the_in_turn_results(monkeypatch):
    """Cluster 1 collapses three times: in turn that is five tasks one by one (and nothing trained
    that the walk does not use); two at a time the walk guesses the next retry and needs three
    round trips, with the same models and keys."""
    verdicts = [False, True, True, True, False]
    in_turn_comm, paired_comm = ScriptedComm([_two_groups()]), CopyingComm([_two_groups()])
    in_turn, retries = _first_round(monkeypatch, in_turn_comm, verdicts)
    paired, paired_retries = _first_round(monkeypatch, paired_comm, verdicts)
    assert retries == paired_retries == 3
    assert in_turn_comm.mapped == [1, 1, 1, 1, 1]
    assert paired_comm.mapped == [2, 2, 2]  # (0,0)+(1,0), (1,1)+(1,2), (1,3)+(1,4, unused)
    assert {k: m.key for k, m in in_turn.items()} == {0: "cosmos-server-0", 1: "cosmos-server-4"}
    _same_models(in_turn, paired)


def test_server_reclusters_every_round_when_asked():
    config = CosmosConfig(server_arch="mlp", server_epochs=1, collapse_guard=False, recluster_every_round=True)
    server = CosmosServer(config, _setup(6))
    comm = ScriptedComm([_two_groups(), _two_groups(seed=1), _two_groups(permute=True)])
    server.round(0, list(range(6)), comm)
    first = dict(server.models)
    comm.rnd = 1
    server.round(1, list(range(6)), comm)  # same groups: same cluster ids, same models
    np.testing.assert_array_equal(server.cluster_assignment(), [0, 0, 0, 1, 1, 1])
    assert all(server.models[k] is first[k] for k in first)
    comm.rnd = 2
    server.round(2, list(range(6)), comm)  # regrouped: {0,2,4} and {1,3,5}
    a = server.cluster_assignment()
    assert a[0] == a[2] == a[4] != a[1] == a[3] == a[5]


def test_server_assigns_late_clients_to_the_nearest_cluster():
    server = CosmosServer(CosmosConfig(server_arch="mlp", server_epochs=1), _setup(6))
    probs = _two_groups()
    comm = ScriptedComm([probs, probs])
    server.round(0, [0, 1, 3, 4], comm)
    assert server.cluster_assignment().tolist() == [0, 0, -1, 1, 1, -1]
    comm.rnd = 1
    server.round(1, [2, 5], comm)
    assert server.cluster_assignment().tolist() == [0, 0, 0, 1, 1, 1]
    assert comm.sent[1][2].arrays == {}  # a newcomer has nothing to distill yet


def test_collapse_test_is_label_free():
    one_class = np.tile([0.9, 0.05, 0.05], (5, 1))
    varied = np.eye(3)[[0, 1, 2, 0, 1]]
    assert collapsed(one_class, varied) and not collapsed(varied, varied) and not collapsed(one_class, one_class)


# -- the reproduction configs --------------------------------------------------------------------

def test_reproduction_configs_load_and_share_their_setting():
    root = Path(__file__).resolve().parents[1] / "configs" / "cosmos"
    methods = ["cosmos", "comet", "fedct", "fedmd", "local", "fedavg"]
    for dataset in ["mnist", "fashion_mnist", "cifar10"]:
        trees = {m: yaml.safe_load((root / dataset / f"{m}.yaml").read_text()) for m in methods}
        for method, tree in trees.items():
            config = load_config(root / dataset / f"{method}.yaml")  # validates every field
            assert config.algorithm["name"] == method and config.data.dataset == dataset
            assert config.data.partition == "cosmos" and config.data.num_clients == 25 and config.rounds == 10
            for section in ("data", "client"):
                assert tree[section] == trees["cosmos"][section], (dataset, method, section)
            if method != "fedavg":
                assert tree["models"] == trees["cosmos"]["models"] and len(set(tree["models"]["clients"])) >= 2
            else:
                assert len(tree["models"]["clients"]) == 1
        routine = {k: trees["cosmos"]["algorithm"][k] for k in ("pretrain_epochs", "distill_epochs")}
        for method in ("comet", "fedct"):
            assert {k: trees[method]["algorithm"][k] for k in routine} == routine  # same client routine
    assert load_config(root / "smoke.yaml").algorithm["name"] == "cosmos"


def test_comet_server_kmeans_once_or_every_round():
    from hetpfl.algorithms.comet import CometConfig, CometServer

    for every_round in (True, False):
        server = CometServer(CometConfig(num_clusters=2, recluster_every_round=every_round), _setup(6))
        comm = ScriptedComm([_two_groups(), _two_groups(permute=True)])
        assert server.round(0, list(range(6)), comm) == {"num_clusters": 2.0}
        a = server.cluster_assignment()
        assert a[0] == a[1] == a[2] != a[3] == a[4] == a[5]
        comm.rnd = 1
        server.round(1, list(range(6)), comm)
        down = comm.sent[1]
        np.testing.assert_array_equal(down[0].arrays["targets"], down[1].arrays["targets"])  # cluster mean
        b = server.cluster_assignment()
        if every_round:
            assert b[0] == b[2] == b[4] != b[1] == b[3] == b[5]  # follows the new predictions
        else:
            np.testing.assert_array_equal(a, b)


def test_kept_clusters_first_attempts_go_out_together_with_the_same_results(monkeypatch):
    """A kept cluster's first attempt is needed whatever comes before it, so two at a time a steady
    round sends all four at once (one round trip); in turn it is four, and the models agree."""
    monkeypatch.setattr(cosmos_module, "collapsed", lambda q, target: False)
    rng = np.random.default_rng(0)
    probs = {}
    for c in range(8):  # clients 2g, 2g+1 predict class g: four groups
        p = rng.dirichlet(np.ones(4), size=64) * 0.1
        p[:, c // 2] += 1.0
        probs[c] = (p / p.sum(1, keepdims=True)).astype(np.float32)
    config = CosmosConfig(server_arch="mlp", server_epochs=1, cluster_selection="oracle", oracle_clusters=4)
    servers = {}
    for comm in (ScriptedComm([probs, probs]), CopyingComm([probs, probs])):
        server = CosmosServer(config, _setup(8))
        server.round(0, list(range(8)), comm)
        assert len(server.models) == 4
        comm.rnd, comm.mapped = 1, []
        server.round(1, list(range(8)), comm)
        servers[comm.workers] = (server, comm.mapped)
    assert servers[1][1] == [1, 1, 1, 1] and servers[2][1] == [4]
    for k, model in servers[1][0].models.items():
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, servers[2][0].models[k].state_dict()[name])
