"""A reply that passes the message format but not what was asked is that client's failure, and the
federation goes on (issue #13; reliability-probe.md §2 and ranked items 1 and 5).

Client 0 answers honestly, then its reply is altered on the way back, as a buggy or hostile client
of a deployment would send it. Every run must finish every round, record client 0's failure, and
keep the altered numbers out of every aggregate and metric."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hetpfl.clienthost import ClientHost, make_store
from hetpfl.engine import run_rounds
from hetpfl.messages import Message
from hetpfl.prepare import prepare
from hetpfl.simulator import InProcessTransport

from conftest import small_config


class TamperingTransport(InProcessTransport):
    """The simulator's transport with client 0's replies to some stages altered."""

    def __init__(self, host, tampers):
        super().__init__(host)
        self.tampers = tampers  # stage -> how client 0's reply is altered

    def exchange(self, stage, rnd, messages):
        result = super().exchange(stage, rnd, messages)
        if stage in self.tampers and 0 in result.replies:
            result.replies[0] = self.tampers[stage](result.replies[0])
        return result


def run_tampered(config, tampers):
    run = prepare(config).run
    rows = []
    summary = run_rounds(run, TamperingTransport(ClientHost(run, make_store("memory")), tampers), on_round=rows.append)
    return rows, summary


def arrays(message, **changes):
    new = dict(message.arrays)
    for name, value in changes.items():
        if value is None:
            new.pop(name)
        else:
            new[name] = value
    return Message(new, dict(message.scalars))


def scalars(message, **changes):
    return Message(dict(message.arrays), {**message.scalars, **changes})


def first_weight(message):
    return sorted(n for n in message.arrays if n.startswith("w."))[0]


CASES = {
    "fedmd: 5 score rows when 287 were asked": (
        "fedmd", {}, "communicate", lambda m: arrays(m, scores=m.arrays["scores"][:5]), "axis 0: 5 != "),
    "fedct: a label outside the classes": (
        "fedct", {}, "round", lambda m: arrays(m, labels=np.full_like(m.arrays["labels"], 99)),
        "expected values below 10"),
    "fedct: 7 labels": ("fedct", {}, "round", lambda m: arrays(m, labels=m.arrays["labels"][:7]), "axis 0: 7 != "),
    "cosmos: 3 probability rows": (
        "cosmos", {"algorithm.server_arch": "mlp", "algorithm.server_epochs": 1}, "round",
        lambda m: arrays(m, probs=m.arrays["probs"][:3]), "axis 0: 3 != "),
    "fedavg: a weight dropped": (
        "fedavg", {}, "train", lambda m: arrays(m, **{first_weight(m): None}), "arrays sent down (missing"),
    "fedavg: a weight truncated": (
        "fedavg", {}, "train", lambda m: arrays(m, **{first_weight(m): m.arrays[first_weight(m)].reshape(-1)[:1]}),
        "was sent down"),
    "fedavg: 10**15 examples": ("fedavg", {}, "train", lambda m: scalars(m, num_examples=10**15), "outside [0, "),
    "fedavg: negative examples": ("fedavg", {}, "train", lambda m: scalars(m, num_examples=-10**6), "outside [0, "),
    # within the federation's examples but thrice its own: the weight of others' data (probe 2.14, ranked 5)
    "fedavg: more examples than the client holds": (
        "fedavg", {}, "train", lambda m: scalars(m, num_examples=3 * int(m.scalars["num_examples"])), "outside [0, "),
    "fedavg: a weight that was not sent": (
        "fedavg", {}, "train", lambda m: arrays(m, **{"w.evil": np.zeros(10**5, np.float32)}),
        "returns 'w.evil', which was not sent down"),
    "fedmd: finite but absurd scores": (
        "fedmd", {}, "communicate", lambda m: arrays(m, scores=np.full_like(m.arrays["scores"], 3e38)),
        "holds 3e+38, beyond the magnitude allowed (1e+06)"),
    "fedmd: a reply over the size cap": (
        "fedmd", {"runtime.max_reply_mb": 0.1}, "communicate",
        lambda m: arrays(m, scores=np.zeros((50 * len(m.arrays["scores"]), 10), np.float32)),
        "bytes, over runtime.max_reply_mb (0.1 MiB)"),
    "fedmd: accuracy 7.5": ("fedmd", {}, "evaluate", lambda m: scalars(m, accuracy=7.5), "'accuracy'=7.5 is outside [0.0, 1.0]"),
    "fedct: a negative label": (  # probe 2.6
        "fedct", {}, "round", lambda m: arrays(m, labels=np.full_like(m.arrays["labels"], -1)),
        "array 'labels' holds -1, below the smallest allowed value 0"),
    "fedmd: loss -1": ("fedmd", {}, "evaluate", lambda m: scalars(m, loss=-1.0), "'loss'=-1.0 is outside [0.0, None]"),
    "fedmd: -3 examples evaluated": (  # probe 2.16
        "fedmd", {}, "evaluate", lambda m: scalars(m, num_examples=-3), "'num_examples'=-3 is outside [0, "),
    "comet: 0 probability rows": (
        "comet", {"algorithm.num_clusters": 2}, "round", lambda m: arrays(m, probs=m.arrays["probs"][:0]),
        "axis 0: 0 != "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_reply_is_that_clients_failure_and_every_round_finishes(case):
    algorithm, extra, stage, tamper, message = CASES[case]
    config = small_config(algorithm, **{"models.clients": ["mlp"], "data.num_clients": 3, **extra})
    rows, summary = run_tampered(config, {stage: tamper})
    assert [row["round"] for row in rows] == list(range(config.rounds))
    for row in rows:
        assert message in row["failures"]["0"], row["failures"]
        assert set(row["failures"]) == {"0"}
    accuracy = summary["final"]["personalized_acc_mean"]
    assert 0.0 <= accuracy <= 1.0
    if stage == "evaluate":  # the lie is not in the figures, and the summary says they average 2 clients
        assert summary["final"]["client_acc"][0] is None
        assert summary["final_clients_evaluated"] == 2
    else:
        assert summary["final_clients_evaluated"] == 3


def test_every_failed_stage_of_a_round_is_recorded():
    config = small_config("fedmd", **{"models.clients": ["mlp"], "data.num_clients": 3, "rounds": 1})
    rows, _ = run_tampered(config, {"communicate": lambda m: arrays(m, scores=m.arrays["scores"][:5]),
                                    "evaluate": lambda m: scalars(m, accuracy=7.5)})
    failure = rows[0]["failures"]["0"]
    assert failure.startswith("communicate: invalid reply") and "; evaluate: invalid reply" in failure


def test_clients_no_round_sampled_are_named_in_the_summary():
    config = small_config("fedavg", **{"models.clients": ["mlp"], "data.num_clients": 6, "rounds": 1,
                                       "participation": 0.5})
    run = prepare(config).run
    summary = run_rounds(run, InProcessTransport(ClientHost(run, make_store("memory"))))
    assert summary["never_sampled"] == sorted(set(range(6)) - set(run.schedule()[0]))
    assert len(summary["never_sampled"]) == 3


def test_a_reply_keeps_the_sizes_its_message_down_asked_for():
    from hetpfl.algorithms import get_algorithm

    schema = get_algorithm("fedmd").schema("communicate")
    sizes = {"num_classes": 10, "num_public_total": 287}
    schema.down.validate(Message({"public_idx": np.arange(40, dtype=np.int64)}), where="down", sizes=sizes)
    assert sizes["num_public"] == 40
    schema.up.validate(Message({"scores": np.zeros((40, 10), np.float32)}), where="up", sizes=dict(sizes))
    with pytest.raises(ValueError, match="axis 0: 5 != 40"):
        schema.up.validate(Message({"scores": np.zeros((5, 10), np.float32)}), where="up", sizes=dict(sizes))
    with pytest.raises(ValueError, match="holds 287, expected values below 287"):
        schema.down.validate(Message({"public_idx": np.array([0, 287], np.int64)}), where="down",
                             sizes={"num_classes": 10, "num_public_total": 287})


def test_a_message_down_with_public_indices_outside_the_public_set_is_refused():
    """Probe 2.17: FedMD's ``public_idx`` down holding -5 or 10**6 (the public set has 287)."""
    from hetpfl.algorithms import get_algorithm
    from hetpfl.messages import MessageError

    down = get_algorithm("fedmd").schema("communicate").down
    for idx, message in [([-5], "holds -5, below the smallest allowed value 0"),
                         ([-5, 10**6], "holds -5, below the smallest allowed value 0"),
                         ([3, 10**6], "holds 1000000, expected values below 287")]:
        with pytest.raises(MessageError, match=re.escape(f"down: array 'public_idx' {message}")):
            down.validate(Message({"public_idx": np.array(idx, np.int64)}), where="down",
                          sizes={"num_classes": 10, "num_public_total": 287})


def test_the_honest_run_records_no_failure():
    config = small_config("fedavg", **{"models.clients": ["mlp"], "data.num_clients": 3})
    rows, _ = run_tampered(config, {"train": lambda m: m})
    assert all(not row["failures"] for row in rows)




class FlakyClient(Exception):
    pass


def test_a_client_that_raises_in_process_is_recorded_unless_the_run_says_raise(monkeypatch):
    from hetpfl.algorithms.fedavg import FedAvgClient

    honest = FedAvgClient.train

    def train(self, message, ctx):
        if ctx.client_id == 1:
            raise FlakyClient("out of memory on the device")
        return honest(self, message, ctx)

    monkeypatch.setattr(FedAvgClient, "train", train)
    config = small_config("fedavg", **{"models.clients": ["mlp"], "data.num_clients": 3})
    rows, summary = run_tampered(config, {})
    assert [row["failures"] for row in rows] == [{"1": "train: raised FlakyClient: out of memory on the device"}] * 2
    assert summary["final"]["personalized_acc_mean"] > 0.3  # the others trained and were averaged
    with pytest.raises(FlakyClient):
        run_tampered(small_config("fedavg", **{"models.clients": ["mlp"], "data.num_clients": 3,
                                               "runtime.on_client_error": "raise"}), {})


def test_simulated_dropout_and_stragglers_are_seeded_recorded_and_cost_only_what_travelled(tmp_path):
    from hetpfl.experiment import run_experiment

    def run(out, **faults):
        config = small_config("fedavg", **{"models.clients": ["mlp"], "data.num_clients": 6, "rounds": 3,
                                           **{f"runtime.{k}": v for k, v in faults.items()}})
        run_experiment(config, out)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    clean = run(tmp_path / "clean")
    faulty = run(tmp_path / "a", dropout=0.3, stragglers=0.3)
    assert faulty == run(tmp_path / "b", dropout=0.3, stragglers=0.3)  # drawn from the seed
    reasons = [reason for row in faulty for reason in row["failures"].values()]
    assert any("runtime.dropout" in r for r in reasons) and any("runtime.stragglers" in r for r in reasons)
    assert all(r.startswith("train: ") for r in reasons)  # evaluation is never dropped
    per_client_down, per_client_up = clean[0]["bytes_down_by_client"][0], clean[0]["bytes_up_by_client"][0]
    for row in faulty:
        for client in range(6):
            reason = row["failures"].get(str(client), "")
            expect_down = 0 if "dropout" in reason else per_client_down  # never delivered: not counted
            expect_up = 0 if reason else per_client_up  # late or silent: nothing received
            assert (row["bytes_down_by_client"][client], row["bytes_up_by_client"][client]) == (expect_down, expect_up)
        assert len(row["client_acc"]) == 6 and None not in row["client_acc"]


@pytest.mark.parametrize("override, message", [
    ({"runtime.dropout": 0.2, "runtime.name": "flower-sim"}, "runtime.dropout=0.2: is simulated by runtime.name=simulator only"),
    ({"runtime.stragglers": 0.2, "runtime.on_client_error": "raise"}, "runtime.stragglers=0.2: needs runtime.on_client_error=record"),
    ({"runtime.dropout": 1.0}, "runtime.dropout=1.0: must be in [0, 1)"),
])
def test_simulated_faults_are_checked(override, message):
    from hetpfl.configuration import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        small_config("fedavg", **override)
