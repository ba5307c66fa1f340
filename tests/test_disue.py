"""DisUE (as described): the class-wise teacher (a class only one cluster holds is taught by that
cluster's expert alone), one universal expert per architecture, one cluster without distillation
is FedAvg, the three clustering rules and the projected similarity, and bad inputs failing before
training. Determinism, resume and runtime agreement come from the contract tests (registration)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hetpfl.algorithms.clustering import best_by_silhouette, kmeans
from hetpfl.algorithms.disue import model_arrays
from hetpfl.algorithms.fedftg import LabelledGenerator
from hetpfl.algorithms.weights import count_sketch, flat_weights, shared_arrays, weight_distance_matrix
from hetpfl.clienthost import ClientHost
from hetpfl.configuration import ConfigError
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.simulator import InProcessTransport

CONFIGS = Path(__file__).parent / "configs" / "alg"


def config(*overrides: str):
    return load_config(CONFIGS / "disue.yaml", list(overrides))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Keep:
    """A round's Comm that keeps what went down and what came back."""

    def __init__(self, run, rnd: int = 0) -> None:
        self.comm = RoundComm(run, InProcessTransport(ClientHost(run)), rnd, Ledger(run.num_clients))
        self.down, self.up = {}, {}

    def ask(self, stage, messages):
        self.down.update(messages)
        self.up.update(self.comm.ask(stage, messages))
        return self.up


def one_round(*overrides: str):
    run = prepare(config(*overrides)).run
    server, keep = run.make_server(), Keep(run)
    measures = server.round(0, list(range(run.num_clients)), keep)
    return run, server, keep, measures


# --- the teacher -----------------------------------------------------------------------------------

def two_experts():
    run, server, _, _ = one_round("algorithm.distill_steps=0", "algorithm.num_clusters=2")
    experts = sorted(server.models)
    assert len(experts) == 2
    counts = np.array([[30, 10, 0, 5], [10, 30, 20, 0]], dtype=np.float64)
    counts = np.pad(counts, ((0, 0), (0, run.data.num_classes - 4)))  # classes 4.. held by nobody
    return run, server, experts, counts


def test_a_class_only_one_cluster_holds_is_taught_by_its_expert_alone():
    """The default: each generated sample's teacher weights the experts by their share of its class."""
    run, server, experts, counts = two_experts()
    source = LabelledGenerator(server.generator)
    teacher = server.teacher(experts, counts, source)
    y = torch.tensor([2, 2, 3, 0, 5, 2])
    with torch.no_grad():
        x = source(source.draw_latent(len(y), torch.Generator().manual_seed(0)), y)
        out, e0, e1 = teacher(x), server.models[experts[0]].eval()(x), server.models[experts[1]].eval()(x)
    expected = {2: (0.0, 1.0), 3: (1.0, 0.0), 0: (0.75, 0.25), 5: (0.5, 0.5)}  # 5: nobody's, the plain mean
    for i, label in enumerate(y.tolist()):
        w0, w1 = expected[label]
        assert torch.allclose(out[i], w0 * e0[i] + w1 * e1[i], atol=1e-5), label


def test_per_logit_class_weights_and_the_plain_mean():
    run, server, experts, counts = two_experts()
    server.config = dataclasses.replace(server.config, expert_weights="class")
    teacher = server.teacher(experts, counts)
    x = torch.as_tensor(run.data.global_test.x[:50])
    with torch.no_grad():
        out, e0, e1 = teacher(x), server.models[experts[0]].eval()(x), server.models[experts[1]].eval()(x)
    assert torch.allclose(out[:, 2], e1[:, 2], atol=1e-6)  # class 2: cluster 1 alone
    assert torch.allclose(out[:, 3], e0[:, 3], atol=1e-6)  # class 3: cluster 0 alone
    assert torch.allclose(out[:, 0], 0.75 * e0[:, 0] + 0.25 * e1[:, 0], atol=1e-5)  # shared by share
    assert torch.allclose(out[:, 5], 0.5 * (e0[:, 5] + e1[:, 5]), atol=1e-5)  # nobody's: the plain mean

    server.config = dataclasses.replace(server.config, expert_weights="uniform")
    with torch.no_grad():
        plain = server.teacher(experts, counts)(x)
    assert torch.allclose(plain, 0.5 * (e0 + e1), atol=1e-5)


# --- one universal expert per architecture -----------------------------------------------------------

def test_every_architecture_gets_its_own_universal_expert(tmp_path):
    run, server, keep, measures = one_round("models.clients=[cnn_small, mlp]", "algorithm.num_clusters=1")
    archs = run.client_archs
    assert set(archs) == {"cnn_small", "mlp"} and set(server.universal) == {"cnn_small", "mlp"}
    for c, message in keep.down.items():  # each client received its architecture's expert and trained it
        assert message.arrays.keys() == shared_arrays(run.new_model(archs[c], "x")).keys()
    for c in keep.up:  # experts are formed within an architecture (one cluster each here)
        assert server.expert_arch[int(server.assignment[c])] == archs[c]
    assert len(server.models) == 2 and set(server.expert_arch.values()) == {"cnn_small", "mlp"}
    assert "kd_loss" in measures
    run_experiment(config("models.clients=[cnn_small, mlp]", "rounds=2"), tmp_path)
    last = rows(tmp_path)[-1]
    assert {"global_cnn_small_test_acc", "global_mlp_test_acc"} <= set(last)
    assert all(a is not None for a in last["global_client_acc"])


def test_the_teacher_spans_every_architecture():
    run, server, _, _ = one_round("models.clients=[cnn_small, mlp]", "algorithm.num_clusters=1")
    experts = sorted(server.models)
    server.config = dataclasses.replace(server.config, expert_weights="class")
    teacher = server.teacher(experts, np.ones((len(experts), run.data.num_classes)))
    assert {type(m).__name__ for m in teacher.members} == {type(server.models[k]).__name__ for k in experts}
    assert len({type(m).__name__ for m in teacher.members}) == 2


# --- one cluster, no distillation: FedAvg -----------------------------------------------------------

def test_one_cluster_without_distillation_is_fedavg(tmp_path):
    run_experiment(config("rounds=3", "algorithm.num_clusters=1", "algorithm.distill_steps=0"), tmp_path / "disue")
    run_experiment(config("rounds=3", "algorithm=fedavg"), tmp_path / "fedavg")
    for mine, theirs in zip(rows(tmp_path / "disue"), rows(tmp_path / "fedavg")):
        shared = {k: v for k, v in theirs.items() if "acc" in k}
        assert shared and {k: mine[k] for k in shared} == shared
        for cluster, universal in zip(mine["cluster_client_acc"], mine["global_client_acc"]):
            assert cluster is None or cluster == universal  # one expert: the universal expert itself
        assert mine["cluster0_test_acc"] == mine["global_test_acc"]  # the expert is the universal expert


def test_distillation_moves_the_universal_expert():
    run, server, _, _ = one_round("algorithm.num_clusters=2", "algorithm.distill_steps=0")
    _, distilled, _, measures = one_round("algorithm.num_clusters=2")
    a = flat_weights(shared_arrays(server.universal["cnn_small"]))
    b = flat_weights(shared_arrays(distilled.universal["cnn_small"]))
    assert not np.allclose(a, b) and measures["kd_loss"] >= 0 and "generator_loss" in measures


# --- clustering rules ---------------------------------------------------------------------------------

def test_clustering_finds_the_two_true_groups(tmp_path):
    """Inverted and plain digits: by the third round the cosine clustering (K by silhouette) is exact."""
    run_experiment(config("rounds=4", "participation=1.0", "algorithm.distill_steps=0"), tmp_path)
    aris = [r["cluster_ari"] for r in rows(tmp_path)]
    assert aris[-1] == 1.0 and aris[-2] == 1.0, aris


@pytest.mark.parametrize("overrides", [
    ["algorithm.clustering=kmeans", "algorithm.num_clusters=2"],
    ["algorithm.clustering=kmeans"],
    ["algorithm.clustering=loss", "algorithm.num_clusters=2"],
    ["algorithm.similarity_threshold=0.5"],
    ["algorithm.projection_dim=64"],
    ["algorithm.distill_data=public", "algorithm.expert_weights=samples"],
    ["algorithm.expert_weights=class"],
])
def test_every_clustering_and_distillation_source_runs(tmp_path, overrides):
    run_experiment(config("rounds=3", "participation=1.0", *overrides), tmp_path)
    last = rows(tmp_path)[-1]
    assert last["server"]["num_clusters"] >= 1 and last["global_test_acc"] > 0.2
    assert all(k >= 0 for k in last["cluster_assignment"])


def test_loss_clustering_sends_the_experts_and_clients_choose():
    run, server, keep, _ = one_round("algorithm.clustering=loss", "algorithm.num_clusters=3")
    for c, message in keep.down.items():
        assert {k.split("/")[0] for k in message.arrays} == {"w.0", "w.1", "w.2", "w.3"}  # u + 3 experts
        assert 0 <= keep.up[c].scalars["cluster"] < 3
    assert sorted(server.models) == [0, 1, 2]  # K experts kept, chosen or not


def test_projected_similarity_clusters_on_the_clients_sketches_alone():
    run, server, keep, _ = one_round("algorithm.projection_dim=32", "algorithm.num_clusters=2")
    seeds = {m.scalars["projection_seed"] for m in keep.down.values()}
    assert len(seeds) == 1  # one projection for everyone: sketches are comparable
    seed = seeds.pop()
    start = flat_weights(keep.down[0].arrays)
    for reply in keep.up.values():  # the sketch of the client's update, computed on the client
        expected = count_sketch(flat_weights(model_arrays(reply)) - start, 32, seed)
        assert reply.arrays["sketch"].dtype == np.float32 and np.allclose(reply.arrays["sketch"], expected)
    ids = sorted(keep.up)
    labels = server.partition(0, "cnn_small", ids, keep.up)
    blinded = {c: type(r)({**{k: np.zeros_like(v) for k, v in model_arrays(r).items()},
                           "sketch": r.arrays["sketch"]}, dict(r.scalars)) for c, r in keep.up.items()}
    assert np.array_equal(server.partition(0, "cnn_small", ids, blinded), labels)  # weights unused


def test_count_sketch_preserves_cosines_on_average():
    rng = np.random.default_rng(0)
    base = rng.normal(size=20000)
    u, v = base + rng.normal(size=20000), base + rng.normal(size=20000)  # cosine ~ 0.5
    w = rng.normal(size=20000)  # cosine ~ 0 with both
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    sketched = [cos(count_sketch(u, 256, s), count_sketch(v, 256, s)) for s in range(20)]
    unrelated = [cos(count_sketch(u, 256, s), count_sketch(w, 256, s)) for s in range(20)]
    assert abs(np.mean(sketched) - cos(u, v)) < 0.05 and abs(np.mean(unrelated)) < 0.05
    assert np.array_equal(count_sketch(u, 64, 3), count_sketch(u, 64, 3))  # the seed fixes the projection


def test_best_by_silhouette_finds_blobs_and_refuses_noise():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(0, 0.1, (6, 2)), rng.normal(5, 0.1, (6, 2)), rng.normal((0, 5), 0.1, (6, 2))])
    dist = weight_distance_matrix(blobs)
    choice = best_by_silhouette(dist, lambda k: kmeans(blobs, k, np.random.default_rng(1))[0], 6)
    assert choice.num_clusters == 3 and choice.score > 0.8
    noise = rng.uniform(size=(18, 2))
    flat = best_by_silhouette(weight_distance_matrix(noise), lambda k: kmeans(noise, k, np.random.default_rng(1))[0],
                              6, min_silhouette=0.9)
    assert flat.num_clusters == 1


# --- bad inputs fail before training, naming the key -------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    (["algorithm.num_clusters=0"], "algorithm.num_clusters"),
    (["algorithm.num_clusters=6"], "algorithm.num_clusters"),  # 5 clients
    (["algorithm.clustering=loss"], "algorithm.num_clusters"),  # loss needs K
    (["algorithm.projection_dim=0"], "algorithm.projection_dim"),
    (["algorithm.distill_steps=-1"], "algorithm.distill_steps"),
    (["data.dataset=gaussian", "data.feature_shift=none", "algorithm.generator_arch=dcgan_generator"],
     "algorithm.generator_arch"),
    (["algorithm.distill_data=public", "algorithm.expert_weights=class", "data.public_fraction=0"],
     "algorithm.distill_data"),
    (["algorithm.distill_data=public"], "algorithm.expert_weights"),  # public inputs carry no generated label
    (["algorithm.similarity_threshold=0.5", "algorithm.num_clusters=2"], "algorithm.similarity_threshold"),
    (["algorithm.clustering=median"], "algorithm.clustering"),
    (["algorithm.ce_weight=0", "algorithm.adversarial_weight=0", "algorithm.diversity_weight=0"],
     "algorithm.ce_weight"),
])
def test_bad_inputs_fail_before_training_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prepare(config(*overrides))


# --- the comparison configs -----------------------------------------------------------------------------

def test_comparison_configs_are_the_scripts_output_load_and_share_each_settings_sections(tmp_path, monkeypatch):
    import shutil

    import yaml
    from conftest import assert_written_as_shipped, benchmark_script

    repo = Path(__file__).resolve().parents[1]
    script = benchmark_script("make_disue_configs")
    (tmp_path / "rotated").mkdir()
    shutil.copy(repo / "configs" / "clustered" / "rotated_mnist" / "fedavg.yaml", tmp_path / "rotated")
    monkeypatch.setattr(script, "ROOT", tmp_path / "disue")
    monkeypatch.setattr(script, "ROTATED", tmp_path / "rotated")
    script.main()
    shipped = repo / "configs" / "disue"
    written = assert_written_as_shipped(tmp_path / "disue", shipped)
    for name in ("disue", "fedgen"):
        assert (tmp_path / "rotated" / f"{name}.yaml").read_text() == \
            (repo / "configs" / "clustered" / "rotated_mnist" / f"{name}.yaml").read_text()
    settings = {p.parent for p in written if p.parts[0] != "ablations"}
    assert len(settings) == 4
    for setting in settings:
        trees = {p.stem: yaml.safe_load((shipped / p).read_text()) for p in written if p.parent == setting}
        assert set(trees) == {"disue", "local", "fedavg", "fedprox", "ifca", "cfl", "fesem", "pacfl", "fedgen"}
        for method, tree in trees.items():
            loaded = load_config(shipped / setting / f"{method}.yaml")  # validates every key, the method's too
            assert loaded.algorithm["name"] == method and loaded.data.num_clients == 100
            assert loaded.participation == 0.2
            assert {k: tree[k] for k in ("data", "client", "models", "rounds")} == \
                {k: trees["disue"][k] for k in ("data", "client", "models", "rounds")}
    for path in (shipped / "ablations").glob("*.yaml"):
        assert load_config(path).algorithm["name"] == "disue"
