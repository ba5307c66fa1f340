"""FedMosaic's invariants (PQ-LoRA, block alignment, RELA) and its bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hetpfl.data.hetvqa as hv
from hetpfl.algorithms.fedmosaic import shared_names
from hetpfl.algorithms.rela import mix_by_weights, rela_weights
from hetpfl.configuration import ConfigError
from hetpfl.experiment import load_config, off_diagonal_correlation, prepare
from hetpfl.models import build_model
from hetpfl.models.lora import add_lora, adapter_state, lora_layers, target_layers

CONFIG = Path(__file__).parent / "configs" / "alg" / "fedmosaic.yaml"
VOCAB = len(hv.vocabulary())


def adapted(arch: str, blocks: int = 2, rank: int = 4):
    torch.manual_seed(0)
    return build_model(arch, hv.IMAGE_SHAPE, VOCAB, lora_rank=rank, lora_dual=True, lora_pq_blocks=blocks)


def test_p_and_q_shapes_do_not_depend_on_width_or_depth():
    small, large = adapted("vlm_llama_s"), adapted("vlm_llama_l")
    shapes = {}
    for model in (small, large):
        state = adapter_state(model, "local")
        names = shared_names(model)
        pq = {names[k]: tuple(v.shape) for k, v in state.items() if names[k].startswith("w.pq")}
        assert set(pq.values()) == {(4, 4), (4,)}
        shapes[model.size.width] = pq
    assert shapes[64] == shapes[192]  # the same keys and shapes: averaged across the two widths


def test_with_p_and_q_zero_the_adapted_model_is_the_base_model():
    torch.manual_seed(0)
    base = build_model("vlm_gpt_m", hv.IMAGE_SHAPE, VOCAB)
    model = copy.deepcopy(base)
    add_lora(model, 4, 8, dual=True, pq=lambda name: name.startswith("blocks.3"))
    assert sum(layer.is_pq for layer in lora_layers(model).values()) == 6  # q, k, v, o, fc_in, fc_out
    inputs = base.example_inputs(2)
    assert torch.equal(model(*inputs), base(*inputs))
    for layer in lora_layers(model).values():  # a non-zero P moves it (the update is live)
        if layer.is_pq:
            torch.nn.init.normal_(layer.adapters["local"].P)
    assert not torch.allclose(model(*inputs), base(*inputs))


def test_block_mapping_pairs_the_last_layer_of_each_depth_block():
    assert target_layers(2, 2) == [0, 1] and target_layers(6, 2) == [2, 5] and target_layers(6, 4) == [0, 1, 2, 5]
    blocks = {}
    for arch in ("vlm_llama_s", "vlm_llama_l"):
        blocks[arch] = {int(name.split(".")[2]): layer.block for name, layer in lora_layers(adapted(arch)).items()
                        if layer.is_pq}
    assert blocks == {"vlm_llama_s": {0: 0, 1: 1}, "vlm_llama_l": {2: 0, 5: 1}}
    with pytest.raises(ValueError, match="lora_pq_blocks"):
        adapted("vlm_llama_s", blocks=3)


def test_identical_profiles_give_uniform_weights_over_the_others():
    profiles = np.repeat(np.random.default_rng(0).normal(size=(1, 5, 3)), 4, axis=0)
    weights = rela_weights(profiles, temperature=0.5)
    assert np.allclose(np.diag(weights), 0) and np.allclose(weights[~np.eye(4, dtype=bool)], 1 / 3)


def test_related_profiles_get_more_weight_and_mixing_renormalizes():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    profiles = np.stack([a, a + 0.01 * rng.normal(size=a.shape), b])
    weights = rela_weights(profiles, temperature=0.5)
    assert weights[0, 1] > weights[0, 2] and np.allclose(weights.sum(axis=1), 1)
    mixed = mix_by_weights({1: 0.25, 2: 0.5}, {1: {"x": np.ones(2)}, 2: {"x": np.zeros(2), "y": np.ones(2)}})
    assert np.allclose(mixed["x"], 1 / 3) and np.allclose(mixed["y"], 1)  # y: only client 2 holds it


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.num_blocks=3"], "algorithm.num_blocks=3"),
    (["algorithm.num_blocks=0"], "algorithm.num_blocks=0"),
    (["algorithm.temperature=0"], "algorithm.temperature=0"),
    (["algorithm.row_fraction=1.5"], "algorithm.row_fraction=1.5"),
    (["algorithm.row_fraction=0"], "algorithm.row_fraction=0"),
    (["algorithm.proxy=vlm_llama_l"], "algorithm.proxy='vlm_llama_l'"),
    (["models.lora.rank=0"], "models.lora.rank=0"),
])
def test_bad_fedmosaic_settings_fail_before_training(overrides, key):
    with pytest.raises(ConfigError) as err:
        prepare(load_config(CONFIG, overrides))
    assert key in str(err.value)


def test_a_run_draws_rela_weights_beside_the_scenarios_relatedness(tmp_path):
    from hetpfl.experiment import run_experiment
    from hetpfl.models import VLM_ARCHITECTURES

    scenario = hv.load_scenario(Path(__file__).parent / "configs" / "hetvqa_tiny.yaml", VLM_ARCHITECTURES)
    truth = scenario.relatedness()  # clients 0 and 2 share both task types, client 1 one of two
    assert np.allclose(truth, [[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]])
    summary = run_experiment(load_config(CONFIG, ["rounds=2"]), tmp_path)
    assert (tmp_path / "rela_weights.png").is_file() and "heatmaps" not in summary
    assert {"rela_max_weight", "rela_weight_std"} <= set(summary["server"])
    # the weights themselves, and how well they follow the truth, are in the summary for tables
    rela = json.loads((tmp_path / "summary.json").read_text())["client_matrices"]["rela_weights"]
    weights = np.array(rela["values"])
    assert weights.shape == (3, 3) and np.allclose(np.diag(weights), 0) and np.allclose(weights.sum(1), 1)
    assert rela["truth_correlation"] == pytest.approx(off_diagonal_correlation(weights, truth))
    # and how much of its personal global module each client's gate takes, on its own test inputs
    final = summary["final"]
    assert 0 < final["global_share_worst10"] <= final["global_share_mean"] < 1


def test_the_correlation_with_the_truth_reads_the_pairs_of_distinct_clients_only():
    truth = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.1], [0.9, 0.1, 1.0]])
    scaled = 0.5 * truth + np.diag([7.0, -3.0, 2.0])  # a different diagonal, the same pairs up to scale
    assert off_diagonal_correlation(scaled, truth) == pytest.approx(1.0)
    assert off_diagonal_correlation(-truth, truth) == pytest.approx(-1.0)
    assert off_diagonal_correlation(truth, None) is None
    assert off_diagonal_correlation(truth, np.ones((3, 3))) is None  # every pair equally related: no r


def test_weight_alignment_matches_codes_and_keeps_b_orthonormal():
    prepared = prepare(load_config(CONFIG))
    report = prepared.setup["weight_alignment"]
    assert list(report) == ["vlm_llama_s"]  # the proxy (vlm_gpt_s, the smallest by name) is the pivot
    facts = report["vlm_llama_s"]
    assert facts["layers"] == 4  # the attention's q, k, v, o of the PQ block: llama's MLP has no gpt partner
    assert facts["relative_error"] < 0.5 * facts["relative_error_before"]
    run = prepared.run
    client = next(i for i, a in enumerate(run.client_archs) if a == "vlm_llama_s")
    spec = run.client_modules(client)["model"]
    assert "lora_pq_basis" in spec.kwargs
    model = run.new_module(spec, "probe")
    aligned = [layer.basis.B for layer in lora_layers(model).values() if layer.is_pq and "attn" in "".join(
        n for n, m in model.named_modules() if m is layer)]
    assert len(aligned) == 4
    for b in aligned:
        assert torch.allclose(b.T @ b, torch.eye(b.shape[1]), atol=1e-5)
    unaligned = prepare(load_config(CONFIG, ["algorithm.weight_alignment=false"]))
    assert unaligned.setup == {} and "lora_pq_basis" not in unaligned.run.client_modules(client)["model"].kwargs


def test_without_block_alignment_p_and_q_pair_by_layer_index_instead():
    small, large = adapted("vlm_llama_s"), adapted("vlm_llama_l")

    def pq_keys(model, aligned):
        return {k for k in shared_names(model, aligned).values() if k.startswith("w.pq")}

    assert pq_keys(small, True) == pq_keys(large, True)  # blocks 0 and 1 of both
    assert not pq_keys(small, False) & pq_keys(large, False)  # layers {0, 1} against {2, 5}: no pair


def test_without_pq_lora_plain_lora_is_shared_across_sizes_by_padding():
    from hetpfl.algorithms.hetlora import cut_to, padded_average

    small = {"w.x.lora_A": np.ones((2, 3), dtype=np.float32)}
    large = {"w.x.lora_A": np.full((2, 5), 3.0, dtype=np.float32), "w.deep.lora_A": np.ones((2, 5), dtype=np.float32)}
    mixed = padded_average({0: small, 1: large, 2: small}, {0: 0.0, 1: 0.75, 2: 0.25})  # client 0's own G
    assert np.allclose(mixed["w.x.lora_A"][:, :3], 0.75 * 3 + 0.25) and np.allclose(mixed["w.x.lora_A"][:, 3:], 3.0)
    assert np.allclose(cut_to(small, mixed)["w.x.lora_A"], 0.75 * 3 + 0.25)  # the small client's slice
    prepared = prepare(load_config(CONFIG, ["algorithm.pq_lora=false"]))
    assert prepared.setup == {}  # nothing to align without PQ layers
    model = prepared.run.new_module(prepared.run.client_modules(0)["model"], "probe")
    assert not any(layer.is_pq for layer in lora_layers(model).values())


def test_the_fast_adaptation_trains_p_q_and_the_gates_at_their_training_rates(tmp_path, monkeypatch):
    """P and Q learn at ``pq_lr_scale`` × lr in training (at 1 × they barely move); the adaptation to
    unseen tasks after the last round must use the same rates, or it measures a crippled FedMosaic."""
    import hetpfl.algorithms.vqa as vqa
    from hetpfl.experiment import run_experiment

    seen = []
    real = vqa.optimize

    def recording(objective, batches, **kwargs):
        seen.append(objective)
        return real(objective, batches, **kwargs)

    monkeypatch.setattr(vqa, "optimize", recording)
    run_experiment(load_config(CONFIG, ["rounds=1", "algorithm.pq_lr_scale=7"]), tmp_path)
    adaptations = [o for o in seen if o.name == "loss"]  # fast_adaptation's objectives (one per unseen task)
    assert adaptations
    for objective in adaptations:
        scaled = {id(p) for p in objective.params if (objective.lr_scales or {}).get(id(p)) == 7}
        assert scaled and scaled < {id(p) for p in objective.params}  # P/Q and gates at 7 ×, the rest at 1 ×
