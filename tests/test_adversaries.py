"""Byzantine clients (issue #13): the adversaries section picks who attacks and how; each attack
changes exactly what it says, on the attacking client, and the honest clients' figures are reported
apart."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import recording_transport, small_config

from hetpfl.adversaries import AdversaryOptions, choose_adversaries, tamper
from hetpfl.clienthost import ClientHost, make_store
from hetpfl.configuration import ConfigError
from hetpfl.engine import honest_spread, run_rounds
from hetpfl.messages import ArrayField, Message, Schema
from hetpfl.prepare import prepare
from hetpfl.simulator import InProcessTransport

PROBS = Schema(arrays={"probs": ArrayField(shape=(None, None), probabilities=True)})
SCORES = Schema(arrays={"scores": ArrayField(shape=(None, None), logits=True)})
WEIGHTS = Schema(prefix_arrays={"w.": ArrayField()}, scalars={"num_examples": int}, returns_sent=True)


def attacked(attack, reply, schema, sent=Message(), **options):
    return tamper(reply, sent, schema, AdversaryOptions(attack=attack, fraction=0.5, **options), seed=0, client=1,
                  rnd=0, stage="round")


def test_the_attackers_are_drawn_from_the_seed_in_the_share_asked():
    options = AdversaryOptions(attack="label_flip", fraction=0.3)
    chosen = choose_adversaries(20, options, seed=0)
    assert len(chosen) == 6 and chosen == choose_adversaries(20, options, seed=0)
    assert chosen != choose_adversaries(20, options, seed=1)
    assert choose_adversaries(20, AdversaryOptions(fraction=0.3), seed=0) == ()  # attack none: nobody
    assert choose_adversaries(20, AdversaryOptions(attack="label_flip", fraction=0.0), seed=0) == ()


def test_soft_label_attacks_change_the_predictions_as_documented():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    inverted = attacked("inverted_soft_labels", Message({"probs": p}), PROBS).arrays["probs"]
    np.testing.assert_allclose(inverted, (1 - p) / 2, rtol=1e-6)
    assert (inverted.argmax(1) == p.argmin(1)).all() and np.allclose(inverted.sum(1), 1)
    constant = attacked("constant_soft_labels", Message({"probs": p}), PROBS, constant_class=2).arrays["probs"]
    np.testing.assert_array_equal(constant, [[0, 0, 1], [0, 0, 1]])
    random = attacked("random_soft_labels", Message({"probs": p}), PROBS).arrays["probs"]
    assert random.dtype == np.float32 and np.allclose(random.sum(1), 1) and not np.allclose(random, p)
    np.testing.assert_array_equal(random, attacked("random_soft_labels", Message({"probs": p}), PROBS).arrays["probs"])

    s = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], dtype=np.float32)
    np.testing.assert_array_equal(attacked("inverted_soft_labels", Message({"scores": s}), SCORES).arrays["scores"], -s)
    constant = attacked("constant_soft_labels", Message({"scores": s}), SCORES).arrays["scores"]
    np.testing.assert_array_equal(constant, [[3.0, -2.0, -2.0], [3.0, -2.0, -2.0]])
    random = attacked("random_soft_labels", Message({"scores": s}), SCORES).arrays["scores"]
    assert random.min() >= -2.0 and random.max() <= 3.0 and not np.allclose(random, s)


def test_update_attacks_scale_or_flip_the_change_from_what_was_sent():
    sent = Message({"w.a": np.array([1.0, 1.0], dtype=np.float32)})
    reply = Message({"w.a": np.array([1.5, 0.0], dtype=np.float32)}, {"num_examples": 7})
    scaled = attacked("scaled_update", reply, WEIGHTS, sent, scale=4.0)
    np.testing.assert_allclose(scaled.arrays["w.a"], [3.0, -3.0])
    flipped = attacked("sign_flipped_update", reply, WEIGHTS, sent, scale=1.0)
    np.testing.assert_allclose(flipped.arrays["w.a"], [0.5, 2.0])
    assert flipped.scalars == {"num_examples": 7}  # only the weights lie


def test_label_flipping_poisons_the_attackers_training_labels_only():
    clean = prepare(small_config("fedavg", **{"models.clients": ["mlp"]})).run
    run = prepare(small_config("fedavg", **{"models.clients": ["mlp"], "adversaries.attack": "label_flip",
                                            "adversaries.fraction": 0.5})).run
    assert len(run.adversarial_clients) == 3
    for client in range(run.num_clients):
        honest_y, y = clean.data.client_train[client].y, run.data.client_train[client].y
        expected = 9 - honest_y if client in run.adversarial_clients else honest_y
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(run.data.client_test[client].y, clean.data.client_test[client].y)


@pytest.mark.parametrize("algorithm, overrides, message", [
    ("fedavg", {"adversaries.attack": "random_soft_labels"}, "adversaries.attack='random_soft_labels': fedavg "
     "uploads no soft labels (attacks it can meet: label_flip, scaled_update, sign_flipped_update)"),
    ("cosmos", {"adversaries.attack": "sign_flipped_update"}, "adversaries.attack='sign_flipped_update': cosmos "
     "returns no weights it was sent"),
    ("fedmd", {"adversaries.attack": "stealth"}, "adversaries.attack='stealth': expected one of none, label_flip"),
    ("fedmd", {"adversaries.attack": "label_flip", "adversaries.fraction": 1.0}, "adversaries.fraction=1.0"),
])
def test_an_attack_the_method_cannot_meet_fails_at_config_time(algorithm, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        small_config(algorithm, **{"adversaries.fraction": 0.2, **overrides})


def test_a_constant_class_beyond_the_data_fails_before_training():
    config = small_config("fedmd", **{"adversaries.attack": "constant_soft_labels", "adversaries.fraction": 0.2,
                                      "adversaries.constant_class": 10})
    with pytest.raises(ConfigError, match=re.escape("adversaries.constant_class=10: must name a class of digits (0..9)")):
        prepare(config)


def test_honest_figures_leave_the_attackers_out():
    measures = {"client_acc": [0.9, 0.1, None, 0.7], "server_client_acc": [0.5, 0.0, 0.5, 0.5], "loss": 3.0}
    honest = honest_spread(measures, (1,))
    assert honest["honest_personalized_acc_mean"] == pytest.approx(0.8)  # client 2 did not answer
    assert honest["honest_server_acc_mean"] == pytest.approx(0.5)
    assert set(honest) == {f"honest_{m}_acc_{s}" for m in ("personalized", "server") for s in ("mean", "std", "worst10")}


def test_an_attacking_client_uploads_the_attack_and_the_summary_names_it():
    config = small_config("cosmos", **{"rounds": 1, "adversaries.attack": "constant_soft_labels",
                                       "adversaries.fraction": 0.34, "adversaries.constant_class": 3})
    run = prepare(config).run
    transport = recording_transport(ClientHost(run, make_store("memory")))
    summary = run_rounds(run, transport)
    assert summary["adversarial_clients"] == list(run.adversarial_clients) and len(run.adversarial_clients) == 2
    assert summary["attack"] == "constant_soft_labels"
    for client, reply in transport.replies["round"][0].items():
        hot = (reply.arrays["probs"].argmax(1) == 3).all() and (reply.arrays["probs"].max(1) == 1).all()
        assert hot == (client in run.adversarial_clients), client
    assert "honest_server_acc_mean" in summary["final"] and "honest_personalized_acc_mean" in summary["final"]


def test_a_clean_run_is_unchanged_by_the_section():
    plain = prepare(small_config("fedmd", rounds=1)).run
    zero = prepare(small_config("fedmd", rounds=1, **{"adversaries.attack": "inverted_soft_labels"})).run
    a = run_rounds(plain, InProcessTransport(ClientHost(plain, make_store("memory"))))
    b = run_rounds(zero, InProcessTransport(ClientHost(zero, make_store("memory"))))
    assert zero.adversarial_clients == () and a["final"] == b["final"] and "adversarial_clients" not in b


def test_fedmd_with_a_robust_consensus_stays_with_the_honest_scores_where_the_mean_follows_the_attack():
    def agreement(rule):
        """Share of public inputs whose consensus class (last round) is the honest clients' mean class."""
        config = small_config("fedmd", **{"rounds": 3, "data.num_clients": 10, "client.local_epochs": 5,
                                          "adversaries.attack": "constant_soft_labels", "adversaries.fraction": 0.3,
                                          "aggregation.rule": rule, "aggregation.trim_fraction": 0.3})
        run = prepare(config).run
        transport = recording_transport(ClientHost(run, make_store("memory")))
        run_rounds(run, transport)
        scores = {c: m.arrays["scores"] for c, m in transport.replies["communicate"][2].items()}
        consensus = next(iter(transport.sent["digest_revisit"][2].values())).arrays["consensus"]
        honest = np.mean([s for c, s in scores.items() if c not in run.adversarial_clients], axis=0)
        return float((consensus.argmax(1) == honest.argmax(1)).mean())

    mean, median, trimmed = agreement("mean"), agreement("median"), agreement("trimmed_mean")
    assert mean < 0.2  # three clients of ten naming class 0 at full confidence take the mean's consensus
    assert median > mean + 0.4 and trimmed > mean + 0.4, (mean, median, trimmed)
