import numpy as np
import pytest

from hetpfl.clienthost import DiskStore, MemoryStore
from hetpfl.engine import assign_architectures, sampling_schedule, spread
from hetpfl.messages import Message


def test_sampling_schedule_is_pre_drawn_and_seeded():
    a = sampling_schedule(0, 20, 5, 0.25)
    assert a == sampling_schedule(0, 20, 5, 0.25)
    assert a != sampling_schedule(1, 20, 5, 0.25)
    assert all(len(r) == 5 and r == sorted(set(r)) for r in a)
    assert sampling_schedule(0, 20, 3, 1.0) == [list(range(20))] * 3


def test_architecture_assignment_follows_proportions():
    archs = assign_architectures(["mlp", "cnn_small", "resnet_small"], [0.3, 0.3, 0.4], 10, seed=0)
    assert sorted(archs).count("resnet_small") == 4 and archs.count("mlp") == 3
    assert archs == assign_architectures(["mlp", "cnn_small", "resnet_small"], [0.3, 0.3, 0.4], 10, seed=0)
    assert archs != assign_architectures(["mlp", "cnn_small", "resnet_small"], [0.3, 0.3, 0.4], 10, seed=1)
    equal = assign_architectures(["mlp", "cnn_small"], None, 7, seed=0)
    assert sorted([equal.count("mlp"), equal.count("cnn_small")]) == [3, 4]


def test_spread_worst10_is_mean_of_lowest_decile():
    values = np.arange(1, 21) / 20  # 20 clients: the worst 10% are the two lowest
    out = spread(values, "acc")
    assert out["acc_worst10"] == pytest.approx((0.05 + 0.10) / 2)
    assert out["acc_mean"] == pytest.approx(values.mean())
    assert spread(np.array([0.3, np.nan]), "x")["x_worst10"] == pytest.approx(0.3)


@pytest.mark.parametrize("store_cls", [MemoryStore, DiskStore])
def test_state_stores_round_trip_and_snapshot(store_cls, tmp_path):
    store = store_cls() if store_cls is MemoryStore else store_cls(tmp_path / "live")
    assert store.get(3) is None
    store.put(3, Message({"model/w": np.arange(4)}, {"state/pretrained": True}))
    store.put(5, Message({"model/w": np.ones(2, np.float32)}))
    got = store.get(3)
    np.testing.assert_array_equal(got.arrays["model/w"], np.arange(4))
    assert got.scalars == {"state/pretrained": True}
    store.snapshot(tmp_path / "snap")
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["client-000003.npz", "client-000005.npz"]
    store.put(3, Message({"model/w": np.zeros(4)}))
    store.put(7, Message())
    store.restore(tmp_path / "snap")  # back to the snapshot: client 7 did not exist then
    assert store.get(7) is None and store.get(3).scalars == {"state/pretrained": True}
    np.testing.assert_array_equal(store.get(3).arrays["model/w"], np.arange(4))


class _StubTransport:
    """Replies to 'communicate' with NaN scores from client 1 and valid scores from the others."""

    def exchange(self, stage, rnd, messages):
        from hetpfl.engine import Exchange
        from hetpfl.messages import Message

        replies = {}
        for client, message in messages.items():
            scores = np.zeros((len(message.arrays["public_idx"]), 10), np.float32)
            if client == 1:
                scores[0, 0] = np.nan
            replies[client] = Message({"scores": scores})
        return Exchange(replies=replies)


@pytest.mark.parametrize("policy", ["record", "raise"])
def test_invalid_reply_is_recorded_or_raised_as_the_run_says(policy):
    from conftest import small_config
    from hetpfl.engine import Ledger, RoundComm
    from hetpfl.experiment import prepare
    from hetpfl.messages import Message, MessageError

    run = prepare(small_config("fedmd", rounds=1, **{"runtime.on_client_error": policy})).run
    ledger = Ledger(run.num_clients)
    comm = RoundComm(run, _StubTransport(), 0, ledger)
    ask = {c: Message({"public_idx": np.arange(5, dtype=np.int64)}) for c in range(3)}
    if policy == "raise":
        with pytest.raises(MessageError, match="client 1.*NaN"):
            comm.ask("communicate", ask)
        return
    replies = comm.ask("communicate", ask)
    assert sorted(replies) == [0, 2]
    assert "invalid reply" in ledger.failures[1] and "NaN" in ledger.failures[1]
    assert ledger.up[1] > 0  # the bytes did travel


def test_bytes_and_seconds_by_stage_and_server_phase(tmp_path):
    """The summary splits traffic by stage (which messages carried what) and time by stage and by
    server phase; timings stay out of metrics.jsonl."""
    from conftest import small_config
    from hetpfl.experiment import run_experiment

    config = small_config("cosmos", rounds=2, **{"algorithm.server_arch": "mlp", "algorithm.server_epochs": 1})
    summary = run_experiment(config, tmp_path)
    by_stage = summary["bytes_by_stage"]
    assert set(by_stage) == {"round", "evaluate"}
    assert by_stage["round"]["up"] == summary["bytes_up_total"] and by_stage["round"]["down"] == summary["bytes_down_total"]
    assert by_stage["evaluate"]["up"] + by_stage["evaluate"]["down"] == summary["bytes_eval_total"]
    assert set(summary["time_by_phase_s"]) == {"clustering", "server_models"}
    assert all(v > 0 for v in summary["time_by_stage_s"].values())
    assert "phase_s" not in (tmp_path / "metrics.jsonl").read_text()
