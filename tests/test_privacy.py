"""Differential privacy for uploaded predictions (issue #13): the Gaussian mechanism bounds, noises
and post-processes what leaves a client as documented, Opacus's accountant gives ε, and a run
reports the privacy spent per round, per client, across a resume."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from conftest import recording_transport, small_config

from hetpfl.algorithms import ALGORITHMS
from hetpfl.clienthost import ClientHost, make_store
from hetpfl.configuration import ConfigError
from hetpfl.engine import run_rounds
from hetpfl.messages import ArrayField, Message, Schema
from hetpfl.prepare import prepare
from hetpfl.privacy import PrivacyOptions, check_privacy, epsilon, privatize, releases_in, sensitivity

PROBS = Schema(arrays={"probs": ArrayField(shape=(None, None), probabilities=True)})
SCORES = Schema(arrays={"scores": ArrayField(shape=(None, None), logits=True)}, scalars={"num_examples": int})


def released(reply, schema, client=0, **options):
    return privatize(reply, schema, PrivacyOptions(mechanism="gaussian", **options), seed=0, client=client, rnd=0,
                     stage="round")


def test_score_rows_are_clipped_and_noised_at_the_sensitivity_of_the_whole_upload():
    rows = 4000
    scores = np.zeros((rows, 3), dtype=np.float32)
    scores[:, 0] = 50.0  # norm 50, clipped to 2
    out = released(Message({"scores": scores}, {"num_examples": 9}), SCORES, clip=2.0, noise_multiplier=0.01)
    std = 0.01 * math.sqrt(rows) * 2 * 2.0  # σ · √R · 2·clip
    noise = out.arrays["scores"] - np.array([2.0, 0.0, 0.0])
    assert abs(noise.mean()) < 0.1 * std and noise.std() == pytest.approx(std, rel=0.05)
    assert out.scalars == {"num_examples": 9} and out.arrays["scores"].dtype == np.float32


def test_probability_rows_stay_probabilities_and_sensitivity_uses_the_simplex_diameter():
    assert sensitivity(100, True, clip=5.0) == pytest.approx(10 * math.sqrt(2))
    assert sensitivity(100, False, clip=5.0) == pytest.approx(100.0)
    p = np.full((50, 4), 0.25, dtype=np.float32)
    out = released(Message({"probs": p}), PROBS, noise_multiplier=0.05).arrays["probs"]
    assert (out >= 0).all() and np.allclose(out.sum(1), 1, atol=1e-5) and not np.allclose(out, p)
    PROBS.validate(Message({"probs": out}), where="test")


def test_the_noise_follows_the_seed_unless_a_deployment_asks_otherwise():
    s = Message({"scores": np.ones((20, 3), dtype=np.float32)}, {"num_examples": 1})
    a, b = released(s, SCORES).arrays["scores"], released(s, SCORES).arrays["scores"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, released(s, SCORES, client=1).arrays["scores"])  # each client its own noise
    c, d = (released(s, SCORES, reproducible_noise=False).arrays["scores"] for _ in range(2))
    assert not np.array_equal(c, d) and not np.array_equal(a, c)


def test_epsilon_is_opacus_rdp_accountant_and_grows_with_releases_and_shrinks_with_noise():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=1.3, sample_rate=1.0)
    assert epsilon(5, 1.3, 1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert epsilon(0, 1.3, 1e-5) == 0.0
    assert epsilon(1, 1.3, 1e-5) < epsilon(5, 1.3, 1e-5) and epsilon(5, 2.0, 1e-5) < epsilon(5, 1.3, 1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm": "local", "privacy.mechanism": "gaussian"},
     "privacy.mechanism='gaussian': local uploads nothing the mechanism protects"),
    ({"algorithm": "ifca", "privacy.mechanism": "gaussian"},  # a guarantee covers the whole upload
     "privacy.mechanism='gaussian': ifca uploads train.cluster, which the mechanism does not cover"),
    ({"privacy.mechanism": "gaussian", "privacy.noise_multiplier": 0}, "privacy.noise_multiplier=0"),
    ({"privacy.mechanism": "laplace"}, "privacy.mechanism='laplace': expected one of none, gaussian"),
    ({"privacy.mechanism": "gaussian", "privacy.delta": 1}, "privacy.delta=1"),
])
def test_a_mechanism_the_run_cannot_use_fails_at_config_time(overrides, message):
    algorithm = overrides.pop("algorithm", "cosmos")
    with pytest.raises(ConfigError, match=re.escape(message)):
        small_config(algorithm, **overrides)


def run_cosmos(**overrides):
    run = prepare(small_config("cosmos", **{"rounds": 3, "participation": 0.5, **overrides})).run
    transport = recording_transport(ClientHost(run, make_store("memory")))
    rows = []
    return run, transport, run_rounds(run, transport, on_round=rows.append), rows


def test_a_run_reports_each_clients_privacy_spent_from_the_uploads_that_left_it():
    run, noisy, summary, rows = run_cosmos(**{"privacy.mechanism": "gaussian", "privacy.noise_multiplier": 0.5})
    _, clean, _, _ = run_cosmos()
    rounds = noisy.replies["round"]
    uploads = [sum(c in rounds[r] for r in rounds) for c in range(run.num_clients)]
    privacy = summary["privacy"]
    assert privacy["releases_by_client"] == uploads and len(set(uploads)) > 1  # participation 0.5: counts differ
    assert privacy["epsilon_by_client"] == [epsilon(k, 0.5, 1e-5) for k in uploads]
    assert privacy["epsilon_max"] == max(privacy["epsilon_by_client"]) > 0
    spent = [row["privacy_epsilon"] for row in rows]
    assert spent == sorted(spent) and spent[-1] == privacy["epsilon_max"]
    for client, reply in rounds[0].items():  # what left a client is noised, and still probabilities
        probs = reply.arrays["probs"]
        assert not np.allclose(probs, clean.replies["round"][0][client].arrays["probs"])
        assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_privacy_spent_survives_a_resume(tmp_path):
    from hetpfl.experiment import run_experiment

    overrides = {"rounds": 3, "participation": 0.5, "privacy.mechanism": "gaussian", "runtime.checkpoint_every": 1}

    class Crash(Exception):
        pass

    def crash_in_round_1(row):
        if row["round"] == 1:
            raise Crash

    whole = run_experiment(small_config("cosmos", **overrides), tmp_path / "whole")
    with pytest.raises(Crash):
        run_experiment(small_config("cosmos", **overrides), tmp_path / "cut", on_round=crash_in_round_1)
    resumed = run_experiment(small_config("cosmos", **overrides), tmp_path / "cut", resume=True)
    assert resumed["privacy"] == whole["privacy"]
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["privacy"]["epsilon_max"] > 0


WEIGHTS = Schema(prefix_arrays={"w.": ArrayField(shape=None), "b.": ArrayField(dtype="int64", shape=None)},
                 scalars={"num_examples": int}, returns_sent=True)


def test_a_weight_update_is_clipped_as_a_whole_and_noised_around_what_was_sent():
    rng = np.random.default_rng(0)
    sent = Message({"w.a": rng.normal(size=(3000,)).astype(np.float32),
                    "w.bn.running_var": np.full(2000, 0.01, np.float32), "b.bn.steps": np.array(7)})
    trained = Message({"w.a": sent.arrays["w.a"] + 5.0, "w.bn.running_var": sent.arrays["w.bn.running_var"],
                       "b.bn.steps": np.array(9)}, {"num_examples": 40})
    out = privatize(trained, WEIGHTS, PrivacyOptions(mechanism="gaussian", noise_multiplier=0.001, clip_weights=3.0),
                    seed=0, client=0, rnd=0, stage="train", sent=sent)
    update = np.concatenate([out.arrays["w.a"] - sent.arrays["w.a"],
                             out.arrays["w.bn.running_var"] - sent.arrays["w.bn.running_var"]]).astype(np.float64)
    std = 0.001 * 2 * 3.0  # σ · 2·clip_weights
    clipped = 3.0 / np.sqrt(3000)  # the update of norm 5·√3000 scaled to norm 3, all in w.a
    assert np.mean(update[:3000]) == pytest.approx(clipped, abs=4 * std / np.sqrt(3000))
    assert np.std(update[:3000]) == pytest.approx(std, rel=0.1)
    assert (out.arrays["w.bn.running_var"] >= 0).all()  # post-processing keeps a variance one
    assert int(out.arrays["b.bn.steps"]) == 9 and out.scalars == {"num_examples": 40}  # public: as they were
    assert releases_in(out, WEIGHTS) == 1


def test_a_model_nothing_was_sent_for_is_released_from_zero():
    weights = Message({"w.g": np.full(100, 10.0, np.float32)}, {"num_examples": 5})
    out = privatize(weights, WEIGHTS, PrivacyOptions(mechanism="gaussian", noise_multiplier=1e-6, clip_weights=1.0),
                    seed=0, client=0, rnd=0, stage="generator")
    np.testing.assert_allclose(np.linalg.norm(out.arrays["w.g"]), 1.0, rtol=1e-3)  # clipped as a whole


PROTOTYPE_UPLOAD = Schema(
    arrays={"prototypes": ArrayField(shape=(None, None), private="prototypes"),
            "prototype_labels": ArrayField(dtype="int64", shape=(None,), private="prototype_labels"),
            "class_counts": ArrayField(dtype="int64", shape=(None,), private="class_counts")},
    scalars={"num_examples": int})


def test_prototypes_become_one_row_per_class_and_counts_stay_counts():
    """Which classes a client holds is private: the release has a row for every class, clipped and
    noised at √C·2·clip; counts are rounded into [0, n] around n_c with noise √2·n."""
    rows = np.array([[3.0, 4.0], [3.0, 4.0], [0.0, 0.5]], np.float32)  # class 2 twice (norm 5), class 0 once
    reply = Message({"prototypes": rows, "prototype_labels": np.array([2, 2, 0]),
                     "class_counts": np.array([1, 0, 2, 0])}, {"num_examples": 3})
    options = dict(mechanism="gaussian", noise_multiplier=1e-4, clip=1.0)
    out = privatize(reply, PROTOTYPE_UPLOAD, PrivacyOptions(**options), seed=0, client=0, rnd=0, stage="train",
                    num_classes=4)
    np.testing.assert_array_equal(out.arrays["prototype_labels"], [0, 1, 2, 3])
    np.testing.assert_allclose(out.arrays["prototypes"], [[0, 0.5], [0, 0], [0.6, 0.8], [0, 0]], atol=0.01)
    np.testing.assert_array_equal(out.arrays["class_counts"], [1, 0, 2, 0])  # σ·√2·n ≪ 0.5: rounds back
    assert releases_in(out, PROTOTYPE_UPLOAD) == 2
    loud = privatize(reply, PROTOTYPE_UPLOAD, PrivacyOptions(mechanism="gaussian", noise_multiplier=5.0), seed=0,
                     client=0, rnd=0, stage="train", num_classes=4)
    assert ((loud.arrays["class_counts"] >= 0) & (loud.arrays["class_counts"] <= 3)).all()
    many = privatize(Message({"prototypes": np.zeros((1, 20000), np.float32), "prototype_labels": np.array([0]),
                              "class_counts": np.array([1, 0, 0, 0])}, {"num_examples": 1}), PROTOTYPE_UPLOAD,
                     PrivacyOptions(mechanism="gaussian", noise_multiplier=0.5, clip=2.0), seed=0, client=0, rnd=0,
                     stage="train", num_classes=4)
    assert many.arrays["prototypes"].std() == pytest.approx(0.5 * np.sqrt(4) * 2 * 2.0, rel=0.05)


@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_the_mechanism_accepts_runs_under_it_and_spends_privacy(method, tmp_path):
    """Registered methods are covered by being registered: the mechanism either refuses a method at
    config time, naming what would travel in the clear, or the method's contract run finishes under it
    with finite figures and every sampled client's ε above 0."""
    from test_contract import method_config

    from hetpfl.algorithms import get_algorithm
    from hetpfl.configuration import FieldError
    from hetpfl.experiment import run_experiment

    spec = get_algorithm(method)
    try:
        check_privacy(PrivacyOptions(mechanism="gaussian"), dict(spec.schemas), method)
    except FieldError as refused:
        assert "privacy.mechanism" in str(refused) and ("uploads" in str(refused))
        return
    config = method_config(method, **{"privacy.mechanism": "gaussian", "privacy.noise_multiplier": 0.01})
    summary = run_experiment(config, tmp_path)
    spent = summary["privacy"]
    assert spent["epsilon_max"] > 0 and all(np.isfinite(v) for v in spent["epsilon_by_client"])
    assert all(np.isfinite(v) for v in summary["final"].values() if isinstance(v, float))
