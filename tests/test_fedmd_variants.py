"""The two FedMDs (issue #15): the original (``fedmd``: the mean of class *scores*, L1 digest) and
FedMD as COSMOS's code runs it (``fedmd_cosmos``: the mean of *probabilities*, the shared KL
routine at lr 2e-3). Each computes the target it claims, from what reached the server."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import recording_transport, small_config

from hetpfl.algorithms.fedmd import softmax
from hetpfl.clienthost import ClientHost, make_store
from hetpfl.engine import run_rounds
from hetpfl.prepare import prepare


def recorded(algorithm: str, **overrides):
    run = prepare(small_config(algorithm, **{"rounds": 3, **overrides})).run
    transport = recording_transport(ClientHost(run, make_store("memory")))
    run_rounds(run, transport)
    return run, transport


def test_the_original_fedmd_averages_class_scores():
    _, t = recorded("fedmd")
    for rnd, replies in t.replies["communicate"].items():
        consensus = next(iter(t.sent["digest_revisit"][rnd].values())).arrays["consensus"]
        scores = [replies[c].arrays["scores"] for c in sorted(replies)]
        np.testing.assert_allclose(consensus, np.mean(scores, axis=0), rtol=1e-6)
        # not the probability mean: its softmax is sharper than the mean of the softmaxes
        assert softmax(consensus).max(1).mean() > np.mean([softmax(s) for s in scores], axis=0).max(1).mean()


def test_fedmd_as_cosmos_code_runs_it_sends_the_mean_of_last_rounds_probabilities():
    run, t = recorded("fedmd_cosmos", participation=0.5)
    rounds = t.replies["round"]
    assert all("targets" not in m.arrays for m in t.sent["round"][0].values())  # nothing to distill yet
    for rnd in range(1, 3):
        uploads = [rounds[rnd - 1][c].arrays["probs"].astype(np.float64) for c in sorted(rounds[rnd - 1])]
        expected = np.mean(uploads, axis=0)
        expected /= expected.sum(axis=1, keepdims=True)
        for message in t.sent["round"][rnd].values():  # the same global target for every client
            np.testing.assert_allclose(message.arrays["targets"], expected, rtol=1e-5, atol=1e-7)
    assert run.algorithm_config.distill_lr == pytest.approx(2e-3)


def test_comet_and_the_fedmd_variant_use_the_cosmos_codes_learning_rates():
    assert prepare(small_config("comet")).run.algorithm_config.distill_lr == pytest.approx(8e-4)
    assert prepare(small_config("cosmos")).run.algorithm_config.distill_lr == pytest.approx(1e-3)
