"""The public-set-size sweep (issue #15): its configs are the generator's output, load, keep the COSMOS
table's sections and one private set size across public sizes; its table compares what it claims."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import assert_written_as_shipped, benchmark_script

from hetpfl.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_sweep_configs_are_the_scripts_output_and_share_each_cells_private_data(tmp_path, monkeypatch):
    make = benchmark_script("make_public_sweep_configs")
    monkeypatch.setattr(make, "ROOT", tmp_path)
    make.main()
    shipped = REPO / "configs" / "public_sweep"
    written = assert_written_as_shipped(tmp_path, shipped)
    assert len(written) == len(make.DATASETS) * len(make.PUBLIC_SIZES) * len(make.METHODS)
    for path in written:
        dataset, cell, method = path.parts[0], path.parts[1], path.stem
        config = load_config(shipped / path)  # validates every key, the method's too
        size = int(cell.removeprefix("public"))
        assert config.algorithm["name"] == method.removesuffix("_unweighted") and config.data.public_size == size
        assert (config.algorithm.get("client_weighting") == "none") == method.endswith("_unweighted")
        assert config.data.max_train_samples - size == make.PRIVATE  # the same private size at every public size
        cosmos_table = yaml.safe_load((REPO / "configs" / "cosmos" / dataset / "cosmos.yaml").read_text())
        tree = yaml.safe_load((shipped / path).read_text())
        same = {k: v for k, v in tree["data"].items() if k not in ("public_size", "max_train_samples")}
        assert same == {k: v for k, v in cosmos_table["data"].items() if k not in ("public_size", "max_train_samples")}
        assert tree["client"] == cosmos_table["client"] and tree["rounds"] == cosmos_table["rounds"]
        weight_sharing = method in ("fedrep", "cfl")
        assert (tree["models"]["clients"] == ["cnn_small"]) == weight_sharing


def test_the_table_sets_cosmos_server_measure_against_the_best_baselines_client_measure():
    table_script = benchmark_script("public_sweep_table")
    table = {
        ("mnist", "cosmos", "server_acc_mean"): {400: [90.0, 92.0], 5000: [95.0]},
        ("mnist", "cosmos", "personalized_acc_mean"): {400: [89.0, 89.0], 5000: [93.0]},
        ("mnist", "comet", "personalized_acc_mean"): {400: [90.5, 91.5], 5000: [94.0]},
        ("mnist", "fedmd", "personalized_acc_mean"): {400: [88.0, 88.0], 5000: [96.0]},
        ("mnist", "fedrep", "personalized_acc_mean"): {400: [99.0, 99.0]},  # weight sharing: not in the gap
    }
    assert table_script.gap(table, "mnist", 400, table_script.MODEL_AGNOSTIC) == "+0.00"  # 91 vs COMET's 91
    assert table_script.gap(table, "mnist", 5000, table_script.MODEL_AGNOSTIC) == "-1.00"  # FedMD's 96 leads
    assert table_script.gap(table, "mnist", 5000, table_script.PAPERS_BASELINES) == "+1.00"  # COMET's 94 only
    assert table_script.gap(table, "mnist", 5000, ("fedmd",)) == "-1.00"
    assert table_script.gap(table, "mnist", 2000, ("fedmd",)) == "—"
    paper = table_script.markdown(table, "mnist", table_script.PAPER, "as the paper reports")
    assert "| COSMOS (server measure) | 91.00 ± 1.00 | 95.00 (n=1) |" in paper  # fewer seeds than the table
    like = table_script.markdown(table, "mnist", table_script.LIKE_FOR_LIKE, "like for like")
    assert "| COSMOS (client measure) | 89.00 ± 0.00 | 93.00 (n=1) |" in like and "server measure" not in like
