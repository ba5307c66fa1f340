"""Mosaic's pieces: class-wise experts, prototypes, the meta model, the run around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetpfl.algorithms.experts import class_experts, class_prototypes
from hetpfl.configuration import ConfigError
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.learn import IndexBatches, Objective, OptimOptions, ema_update, optimize
from hetpfl.models import MixtureTeacher, build_model
from hetpfl.state import load_tree, save_tree

CONFIG = Path(__file__).parent / "configs" / "alg" / "mosaic.yaml"


def _whole(state):
    """The sub-model index of a full-width client: every entry of every array."""
    return {k: tuple(np.arange(d) for d in np.shape(v)) for k, v in state.items()}


def test_a_class_expert_is_the_class_count_weighted_average():
    rng = np.random.default_rng(0)
    states = [{"w.x": rng.normal(size=(3, 2)).astype(np.float32), "b.n": np.array([i], np.int64)} for i in range(3)]
    full = {"w.x": np.zeros((3, 2), np.float32), "b.n": np.array([0], np.int64)}
    counts = [np.array([5, 0, 1]), np.array([1, 0, 0]), np.array([0, 0, 3])]
    experts = class_experts({}, full, states, [_whole(s) for s in states], counts, num_classes=3)
    expected0 = (5 * states[0]["w.x"].astype(np.float64) + 1 * states[1]["w.x"]) / 6
    np.testing.assert_allclose(experts[0]["w.x"], expected0, rtol=1e-6)
    assert 1 not in experts  # nobody holds class 1: no expert this round
    expected2 = (1 * states[0]["w.x"].astype(np.float64) + 3 * states[2]["w.x"]) / 4
    np.testing.assert_allclose(experts[2]["w.x"], expected2, rtol=1e-6)
    one = class_experts({}, full, states[:1], [_whole(states[0])], counts[:1], 3)
    np.testing.assert_array_equal(one[2]["w.x"], states[0]["w.x"])  # one holder


def test_a_robust_rule_keeps_a_hostile_client_from_steering_every_expert():
    """A client that claims every class with a huge count and uploads scaled weights owns every
    count-weighted expert; under the experiment's median rule each expert stays among the honest."""
    from hetpfl.algorithms.robust import AggregationOptions

    rng = np.random.default_rng(1)
    honest = [{"w.x": (1.0 + 0.01 * rng.normal(size=(4,))).astype(np.float32)} for _ in range(4)]
    hostile = {"w.x": np.full(4, -100.0, np.float32)}
    states = [*honest, hostile]
    counts = [np.array([10, 10]), np.array([10, 10]), np.array([10, 0]), np.array([0, 10]), np.array([10**6, 10**6])]
    args = ({}, {"w.x": np.zeros(4, np.float32)}, states, [_whole(s) for s in states], counts, 2)
    mean = class_experts(*args)
    median = class_experts(*args, AggregationOptions(rule="median"))
    for c in (0, 1):
        assert np.all(mean[c]["w.x"] < -99)  # the claimed counts win the weighted mean
        holders = np.stack([s["w.x"] for s, n in zip(honest, counts) if n[c] > 0]).astype(np.float64)
        assert np.all(median[c]["w.x"] >= holders.min(axis=0)) and np.all(median[c]["w.x"] <= holders.max(axis=0))
    trimmed = class_experts(*args, AggregationOptions(rule="trimmed_mean", trim_fraction=0.25))
    assert all(np.all(np.abs(trimmed[c]["w.x"] - 1.0) < 0.1) for c in (0, 1))


def test_a_mosaic_run_under_a_robust_rule_uses_it_for_the_experts(monkeypatch, tmp_path):
    """The server hands the experiment's rule to the experts, not only to the global model."""
    import hetpfl.algorithms.mosaic as mosaic

    seen = []
    original = mosaic.class_experts
    monkeypatch.setattr(mosaic, "class_experts", lambda *a: seen.append(a[-1]) or original(*a))
    run_experiment(load_config(CONFIG, ["aggregation.rule=trimmed_mean", "rounds=2", "algorithm.warmup_rounds=2"]), tmp_path)
    assert seen and all(options.rule == "trimmed_mean" for options in seen)


def test_prototypes_are_kmeans_centres_or_the_mean_of_a_small_class():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (40, 4)), rng.normal(10, 1, (3, 4))]).astype(np.float32)
    labels = np.array([0] * 40 + [1] * 3)
    protos, classes = class_prototypes(feats, labels, k=5, rng=np.random.default_rng(1))
    assert classes.tolist() == [0] * 5 + [1]
    np.testing.assert_allclose(protos[5], feats[40:].mean(axis=0), rtol=1e-5)  # 3 < k: the class mean
    # the 5 centres of class 0 partition its points: each point is nearest to one, all used
    nearest = ((feats[:40, None] - protos[None, :5]) ** 2).sum(-1).argmin(1)
    assert len(np.unique(nearest)) == 5


def test_the_meta_model_learns_separable_prototypes_and_its_ema_follows():
    torch.manual_seed(0)
    experts = [build_model("mlp", (6,), 3).eval().requires_grad_(False) for _ in range(3)]
    meta = build_model("moe_meta", (6,), 3, num_experts=3, dropout=0.0)
    ema = build_model("moe_meta", (6,), 3, num_experts=3, dropout=0.0)
    ema.load_state_dict(meta.state_dict())
    mixture = MixtureTeacher(experts, meta)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, experts[0].feature_dim))
    labels = rng.integers(0, 3, 120)
    feats = torch.tensor(centres[labels] + rng.normal(0, 0.3, (120, centres.shape[1])), dtype=torch.float32)
    y = torch.tensor(labels)
    before = (mixture.from_features(feats).argmax(-1) == y).float().mean().item()
    objective = Objective(lambda idx: F.cross_entropy(mixture.from_features(feats[idx]), y[idx]), meta,
                          OptimOptions(lr=3e-3), train=(meta,), eval=tuple(experts),
                          after_step=lambda: ema_update(ema, meta, 0.9))
    optimize(objective, IndexBatches(120, 32, steps=150, generator=torch.Generator().manual_seed(0)))
    meta.eval()
    after = (mixture.from_features(feats).argmax(-1) == y).float().mean().item()
    assert after > 0.95 and after > before
    ema_acc = (MixtureTeacher(experts, ema.eval()).from_features(feats).argmax(-1) == y).float().mean().item()
    assert ema_acc > 0.9  # the EMA teacher tracks the trained meta model
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), meta.parameters()))


@pytest.fixture(scope="module")
def mosaic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mosaic")
    return out, run_experiment(load_config(CONFIG), out)


def test_a_run_distills_once_uploads_generators_once_and_draws_their_samples(mosaic_run):
    out, summary = mosaic_run
    rows = [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("kd_loss" in r["server"]) for r in rows] == [False, False, True, False]  # at the end of warm-up
    assert summary["bytes_by_stage"]["generator"]["up"] > 0 and summary["bytes_by_stage"]["generator"]["down"] == 0
    assert rows[-1]["server"]["generators"] == 5.0 and rows[-1]["server"]["prototypes"] > 0
    assert "global_test_acc" in summary["final"]
    assert (out / "generated_samples.png").stat().st_size > 0
    assert set(summary["time_by_phase_s"]) == {"generators", "meta_model", "distillation"}


def test_only_the_last_warmup_rounds_send_prototypes(mosaic_run, tmp_path):
    import json

    out, _ = mosaic_run  # prototype_rounds 5 >= warmup_rounds 3: every warm-up round sends them
    every = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run_experiment(load_config(CONFIG, ["algorithm.prototype_rounds=1"]), tmp_path)
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["server"]["prototypes"] > 0 for r in every[:3]] == [True, True, True]
    assert [r["server"]["prototypes"] > 0 for r in last[:3]] == [False, False, True]
    assert last[2]["server"]["prototypes"] < every[2]["server"]["prototypes"]
    assert all(a["bytes_up"] < b["bytes_up"] for a, b in zip(last[:2], every[:2]))  # no prototypes travel
    assert last[2]["bytes_up"] == every[2]["bytes_up"]  # the same round, the same prototypes


def test_the_server_state_after_distillation_saves_and_restores(tmp_path):
    from hetpfl.clienthost import ClientHost
    from hetpfl.engine import Ledger, RoundComm
    from hetpfl.simulator import InProcessTransport

    run = prepare(load_config(CONFIG, ["algorithm.warmup_rounds=1", "rounds=1"])).run
    server = run.make_server()
    server.round(0, list(range(run.num_clients)), RoundComm(run, InProcessTransport(ClientHost(run)), 0,
                                                              Ledger(run.num_clients)))
    assert server.distilled and server.meta is not None
    save_tree(tmp_path / "s.npz", server.state_dict())
    fresh = run.make_server()
    fresh.load_state_dict(load_tree(tmp_path / "s.npz", build=fresh.setup.rebuild))
    assert fresh.distilled and sorted(fresh.generators) == sorted(server.generators)
    assert all(torch.equal(a, b) for a, b in zip(fresh.meta.state_dict().values(), server.meta.state_dict().values()))
    np.testing.assert_array_equal(fresh.prototypes, server.prototypes)


@pytest.mark.parametrize("override, key", [
    ("algorithm.prototype_k=0", "algorithm.prototype_k"),
    ("algorithm.inversion_threshold=-1", "algorithm.inversion_threshold"),
    ("algorithm.warmup_rounds=9", "algorithm.warmup_rounds"),
    ("algorithm.generator_arch=dcgan_generator", "algorithm.generator_arch"),  # images only; gaussian is vectors
    ("models.clients=[mlp, cnn_small]", "models.clients"),
])
def test_bad_input_fails_before_training_naming_the_key(override, key):
    extra = ["data.dataset=gaussian"] if "generator_arch" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prepare(load_config(CONFIG, [override, *extra]))


# -- the reproduction configs --------------------------------------------------------------------

def test_reproduction_configs_are_the_scripts_output_load_and_share_each_cells_setting(tmp_path, monkeypatch):
    import yaml
    from conftest import assert_written_as_shipped, benchmark_script

    repo = Path(__file__).resolve().parents[1]
    script = benchmark_script("make_mosaic_configs")
    monkeypatch.setattr(script, "ROOT", tmp_path)
    script.main()
    shipped = repo / "configs" / "mosaic"
    written = assert_written_as_shipped(tmp_path, shipped)
    cells = {p.parent for p in written if p.parts[0] != "ablations"}
    assert len(cells) == 3 * 3 * 2
    for cell in cells:
        trees = {p.stem: yaml.safe_load((shipped / p).read_text()) for p in written if p.parent == cell}
        for method, tree in trees.items():
            config = load_config(shipped / cell / f"{method}.yaml")  # validates every key, the method's too
            assert config.algorithm["name"] == method and config.data.num_clients == 10
            assert config.data.min_samples == 10 and config.participation == 1.0
            assert tree["data"] == trees["mosaic"]["data"] and tree["client"] == trees["mosaic"]["client"]
            assert tree["models"] == trees["mosaic"]["models"]
        widths = cell.parts[-1] == "widths"
        assert len(set(trees["mosaic"]["models"]["clients"])) == (3 if widths else 1)
        assert set(trees) >= ({"dfrd", "fedrolex"} if widths else {"dense", "fedftg", "fedgen", "fedavg"})


def test_the_codes_meta_model_reads_the_set_of_expert_predictions_and_per_expert_reads_who_said_what():
    """Shared expansion and no positions (the official code): permuting the experts changes nothing;
    ``expansion="per_expert"`` gives each expert its own token map, so the order matters."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3)
    swapped = logits[:, [2, 0, 1, 4, 3]]
    shared = build_model("moe_meta", (6,), 3, num_experts=5, dropout=0.0).eval()
    own = build_model("moe_meta", (6,), 3, num_experts=5, dropout=0.0, expansion="per_expert").eval()
    with torch.no_grad():
        torch.testing.assert_close(shared(logits), shared(swapped))
        assert not torch.allclose(own(logits), own(swapped))
    with pytest.raises(ValueError, match="expansion='diagonal'"):
        build_model("moe_meta", (6,), 3, num_experts=5, expansion="diagonal")


def test_the_table_gives_mosaics_gap_seed_by_seed_against_the_best_baseline(tmp_path):
    from conftest import benchmark_script

    script = benchmark_script("mosaic_table")
    accuracies = {"mosaic": (0.50, 0.70, 0.90), "fedavg": (0.60, 0.60, 0.60), "fedprox": (0.40, 0.40, 0.40)}
    for method, per_seed in accuracies.items():
        for seed, acc in enumerate(per_seed):
            run = tmp_path / "a0.1" / "homogeneous" / method / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"seed": seed, "final": {"global_test_acc": acc}}))
    table = script.collect([tmp_path])
    assert table[("homogeneous", "mosaic")][0.1] == {0: 50.0, 1: 70.0, 2: 90.0}
    text = script.gap(table[("homogeneous", "mosaic")][0.1],
                      [table[("homogeneous", m)][0.1] for m in ("fedavg", "fedprox")])
    # the best baseline is fedavg (60); Mosaic − fedavg by seed: −10, +10, +30
    assert text == "+10.0 (by seed +10.0 ± 16.3, above on 2 of 3)"


def test_the_ablation_table_pairs_each_variant_with_the_full_run_seed_by_seed(tmp_path):
    from conftest import benchmark_script

    script = benchmark_script("mosaic_table")

    def write(folder: Path, seed: int, final: float, teacher: float, distilled: float) -> None:
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"seed": seed, "wall_time_s": 600.0,
                                                         "final": {"global_test_acc": final}}))
        rows = [{"round": 13}, {"round": 14, "teacher_test_acc": teacher, "global_test_acc": distilled}]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    for seed, final in enumerate((0.90, 0.80)):
        write(tmp_path / "full" / f"seed{seed}", seed, final, 0.70, 0.75)
    for seed, final in enumerate((0.85, 0.82)):
        write(tmp_path / "ablations" / "no_meta_model" / f"seed{seed}", seed, final, 0.80 + seed / 10, 0.84)
    table = script.collect_ablations(tmp_path / "ablations", tmp_path / "full")
    assert table["no_meta_model"]["teacher"] == pytest.approx({0: 80.0, 1: 90.0})
    assert table["full"]["global"] == pytest.approx({0: 75.0, 1: 75.0})
    text = script.ablation_markdown(table)
    # final − full by seed: 85 − 90 = −5, 82 − 80 = +2
    assert "| no_meta_model | 0,1 | 85.0 ± 5.0 | 84.0 ± 0.0 | 83.5 ± 1.5 | -1.5 ± 3.5, above on 1 of 2 | 10.0 ± 0.0 |" in text
    assert text.splitlines()[2].startswith("| full | 0,1 | 70.0 ± 0.0 | 75.0 ± 0.0 | 85.0 ± 5.0 | — |")


def test_the_costs_table_gives_megabytes_per_client_and_minutes_per_alpha(tmp_path):
    from conftest import benchmark_script

    script = benchmark_script("mosaic_table")
    for alpha, minutes in (("0.1", (10.0, 14.0)), ("1.0", (6.0, 6.0))):
        for seed, wall in enumerate(minutes):
            run = tmp_path / f"a{alpha}" / "widths" / "mosaic" / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({
                "seed": seed, "wall_time_s": 60 * wall, "bytes_up_per_client_mean": 5_000_000 + 1_000_000 * seed,
                "bytes_down_per_client_mean": 2_000_000, "final": {"global_test_acc": 0.5}}))
    text = script.costs_markdown([tmp_path])
    assert "| method | MB up per client | MB down per client | minutes, α = 0.1 | minutes, α = 1 |" in text
    assert "| mosaic | 5.50 | 2.00 | 12.0 ± 2.0 | 6.0 ± 0.0 |" in text
