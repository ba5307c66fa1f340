"""Every foundation algorithm learns, is deterministic, and writes a complete results folder."""

import json

import numpy as np
import pytest

from conftest import small_config
from hetpfl.experiment import prepare, run_experiment
from hetpfl.messages import array_nbytes


def _rows(out):
    return (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("algorithm", ["local", "fedmd", "fedavg"])
def test_algorithm_learns_and_is_deterministic(tmp_path, algorithm):
    extra = {"models.clients": "[mlp]"} if algorithm == "fedavg" else {}
    config = small_config(algorithm, **extra)
    summary = run_experiment(config, tmp_path / "a")
    again = run_experiment(small_config(algorithm, **extra), tmp_path / "b")
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b"), "same seed must give identical metrics.jsonl"
    final = summary["final"]
    assert final["personalized_acc_mean"] > 0.5  # chance is 0.1 on digits
    assert final["personalized_acc_worst10"] <= final["personalized_acc_mean"]
    assert again["final"]["personalized_acc_mean"] == final["personalized_acc_mean"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "accuracy.png", "partition.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    rows = [json.loads(line) for line in _rows(tmp_path / "a").splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    if algorithm == "local":
        assert summary["bytes_up_total"] == summary["bytes_down_total"] == 0
    if algorithm == "fedavg":
        assert "global_acc_mean" in final


def test_different_seed_gives_different_numbers(tmp_path):
    run_experiment(small_config("fedmd"), tmp_path / "a")
    run_experiment(small_config("fedmd", seed=1), tmp_path / "b")
    assert _rows(tmp_path / "a") != _rows(tmp_path / "b")


def test_fedmd_bytes_are_exactly_predictions_and_consensus(tmp_path):
    config = small_config("fedmd", rounds=1)
    prepared = prepare(config)
    summary = run_experiment(config, tmp_path)
    n_public, n_classes = len(prepared.run.data.public), prepared.run.data.num_classes
    scores = array_nbytes(np.zeros((n_public, n_classes), np.float32)) + len("scores")
    idx = array_nbytes(np.zeros(n_public, np.int64)) + len("public_idx")
    consensus = scores - len("scores") + len("consensus")
    clients = config.data.num_clients
    assert summary["bytes_up_total"] == clients * scores
    assert summary["bytes_down_total"] == clients * (idx + idx + consensus)


def test_fedavg_moves_whole_models(tmp_path):
    config = small_config("fedavg", **{"models.clients": "[mlp]", "rounds": 1})
    summary = run_experiment(config, tmp_path)
    params = summary["clients"][0]["params"]
    assert summary["bytes_up_total"] > config.data.num_clients * params * 4


def test_disk_state_store_gives_identical_results(tmp_path):
    run_experiment(small_config("fedmd"), tmp_path / "mem")
    run_experiment(small_config("fedmd", **{"runtime.client_state": "disk"}), tmp_path / "disk")
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "wall"))} for line in text.splitlines()]  # noqa: E731
    assert strip(_rows(tmp_path / "mem")) == strip(_rows(tmp_path / "disk"))


def test_partial_participation_samples_the_pre_drawn_clients(tmp_path):
    summary = run_experiment(small_config("local", participation=0.5, rounds=3), tmp_path)
    rows = [json.loads(line) for line in _rows(tmp_path).splitlines()]
    assert all(len(r["clients"]) == 3 for r in rows)
    assert len({tuple(r["clients"]) for r in rows}) > 1
    assert summary["final"]["personalized_acc_mean"] > 0.1


def test_fp16_compression_halves_fedmd_uplink(tmp_path):
    plain = run_experiment(small_config("fedmd", rounds=1), tmp_path / "a")
    half = run_experiment(small_config("fedmd", rounds=1, **{"runtime.compression": "fp16"}), tmp_path / "b")
    assert half["bytes_up_total"] < 0.7 * plain["bytes_up_total"]
