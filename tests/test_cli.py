import json
import subprocess
import sys

import pytest

from hetpfl.cli import main


def test_run_then_report(tmp_path, capsys):
    for seed in (0, 1):
        code = main(["run", "configs/default.yaml", "-o", str(tmp_path / f"s{seed}"), "--set", "rounds=1",
                     "--set", f"seed={seed}", "--set", "algorithm.pretrain_epochs=2"])
        assert code == 0
    assert json.loads((tmp_path / "s0" / "summary.json").read_text())["rounds"] == 1
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "default [fedmd, digits]" in table and " 2 " in table  # one group, two seeds
    assert (tmp_path / "report" / "comparison.png").exists()
    assert (tmp_path / "report" / "table.md").read_text().startswith("| run |")


def test_report_table_shows_test_set_accuracy_and_ari_but_not_numbered_models():
    from hetpfl.report import format_table

    base = {"seeds": [0, 1], "personalized_acc_mean": (0.9, 0.01), "personalized_acc_worst10": (0.8, 0.02),
            "bytes_up_per_client_mean": (1e6, 0), "bytes_down_per_client_mean": (2e6, 0), "wall_time_s": (3.0, 0)}
    rows = [{**base, "group": "a", "global_test_acc": (0.5, 0.1), "cluster0_test_acc": (0.4, 0.0)},
            {**base, "group": "b", "cluster_ari": (1.0, 0.0)}]
    header, _, first, second = format_table(rows, markdown=True).splitlines()
    assert "global test-set acc %" in header and "cluster ARI" in header and "cluster0" not in header
    assert "| 50.00 ± 10.00 | — |" in first and "| — | 1.00 ± 0.00 |" in second


def test_report_shows_the_best_single_cluster_model():
    from hetpfl.report import best_cluster_model, format_table

    final = {"global_test_acc": 0.6, "cluster0_test_acc": 0.4, "cluster7_test_acc": 0.55, "cluster_acc_mean": 0.9}
    assert best_cluster_model(final) == {"best_cluster_test_acc": 0.55}
    assert best_cluster_model({"global_test_acc": 0.6}) == {}
    base = {"seeds": [0], "personalized_acc_mean": (0.9, 0.0), "personalized_acc_worst10": (0.8, 0.0),
            "bytes_up_per_client_mean": (1e6, 0), "bytes_down_per_client_mean": (2e6, 0), "wall_time_s": (3.0, 0)}
    header, _, row = format_table([{**base, "group": "a", "best_cluster_test_acc": (0.55, 0.0)}], markdown=True).splitlines()
    assert "best_cluster test-set acc %" in header and "55.00" in row


def test_config_error_exits_2_with_message(tmp_path, capsys):
    assert main(["run", "configs/default.yaml", "-o", str(tmp_path), "--set", "data.dirichlet_alpha=-1"]) == 2
    err = capsys.readouterr().err
    assert "data.dirichlet_alpha=-1" in err and "must be > 0" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_data_info_reports_location(capsys):
    assert main(["data", "info", "digits"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "digits"


def test_data_info_missing_dataset_says_how_to_provide(tmp_path, capsys):
    code = main(["data", "info", "mnist", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "HETPFL_DATA_DIR" in out


def test_list_names_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("fedmd", "fedavg", "local", "vgg_small", "cifar10", "cosmos"):
        assert name in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "hetpfl.cli", "list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "algorithms:" in result.stdout


@pytest.mark.parametrize("missing", ["nope.yaml"])
def test_missing_config_file(missing, capsys):
    assert main(["run", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
