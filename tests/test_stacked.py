"""The batched executor's local training (hetpfl.learn.stacked): a group of same-architecture
clients trained as one stacked model gives each client what ``fit`` gives it, up to float order."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import small_config

from hetpfl.algorithms.fedavg import FedAvgClient
from hetpfl.experiment import run_experiment
from hetpfl.learn import OptimOptions, distill, evaluate, fit, predict_logits
from hetpfl.learn.stacked import FitJob, StackedModel, evaluate_many, fill_groups, fit_many, predict_many, stack_signature
from hetpfl.models import build_model

SIZES = [40, 70, 100, 9, 64]  # unequal: clients run out of batches at different steps (masked)


def _tolerances(arch: str) -> tuple[float, float, float]:
    """(mean loss, weights atol, weights rtol) of a stacked run against one by one. Batch norm's scale
    gradient is a sum that cancels (of g * x_hat, x_hat summing to zero): float order moves it ~4e-4
    relatively per step, for one client alone without padding as well (measured), and training
    carries that into the other weights and the losses."""
    return (5e-5, 2e-3, 2e-3) if arch == "mobilenet_small" else (1e-5, 5e-4, 1e-3)


def _clients(arch: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    models = [build_model(arch, shape, 10) for _ in SIZES]
    xs = [rng.random((n, *shape)).astype(np.float32) for n in SIZES]
    ys = [rng.integers(0, 10, n) for n in SIZES]
    return models, xs, ys


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("cnn_small", (1, 8, 8)), ("cnn_small", (64,)),
                                        ("mlp", (64,)), ("mobilenet_small", (1, 8, 8)), ("mobilenet_small", (64,))])
@pytest.mark.parametrize("optim,augment", [
    (OptimOptions(lr=3e-3), "none"),
    (OptimOptions(lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-3, max_grad_norm=0.5), "flip"),
    (OptimOptions(lr=0.05, optimizer="sgd", momentum=0.0), "none"),
])
def test_each_client_ends_where_fit_takes_it(arch, shape, optim, augment):
    loss_tolerance, atol, rtol = _tolerances(arch)
    models, xs, ys = _clients(arch, shape)
    one_by_one, stacked = [copy.deepcopy(m) for m in models], [copy.deepcopy(m) for m in models]
    expected = [fit(m, x, y, epochs=2, optim=optim, augment=augment, generator=torch.Generator().manual_seed(i))
                for i, (m, x, y) in enumerate(zip(one_by_one, xs, ys))]
    got = fit_many([FitJob(m, x, y, torch.Generator().manual_seed(i), epochs=2)
                    for i, (m, x, y) in enumerate(zip(stacked, xs, ys))], optim=optim, augment=augment)
    assert [r["steps"] for r in got] == [r["steps"] for r in expected] == [-(-n // 32) * 2 for n in SIZES]
    for ours, theirs in zip(got, expected):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=loss_tolerance)
    for a, b, before in zip(stacked, one_by_one, models):
        for (name, ours), theirs, start in zip(a.state_dict().items(), b.state_dict().values(),
                                               before.state_dict().values()):
            torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol, msg=name)
            assert not torch.equal(ours, start)  # it did train


def test_fixed_steps_and_one_client_alone():
    models, xs, ys = _clients("mlp", (1, 8, 8))
    alone = copy.deepcopy(models[3])
    fit(alone, xs[3], ys[3], steps=7, generator=torch.Generator().manual_seed(3))
    got = fit_many([FitJob(models[3], xs[3], ys[3], torch.Generator().manual_seed(3), steps=7)])
    assert got[0]["steps"] == 7
    for ours, theirs in zip(models[3].parameters(), alone.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_what_stacks_and_what_does_not():
    assert stack_signature(build_model("mlp", (1, 8, 8), 10)) == stack_signature(build_model("mlp", (1, 8, 8), 10))
    assert stack_signature(build_model("mlp", (1, 8, 8), 10)) != stack_signature(build_model("mlp", (64,), 10))
    assert stack_signature(build_model("cnn_small", (1, 8, 8), 10)) is not None
    assert stack_signature(build_model("cnn_small", (3, 16, 16), 10)) is not None
    for large in ((1, 28, 28), (3, 32, 32), (784,)):  # stacking does not pay there (docs/performance.md)
        assert stack_signature(build_model("mlp", large, 10)) is None
    assert stack_signature(build_model("cnn_small", (1, 28, 28), 10)) is None
    assert stack_signature(build_model("resnet_small", (1, 8, 8), 10)) is None  # residual blocks
    mobilenet = build_model("mobilenet_small", (1, 8, 8), 10)  # depthwise convolutions, batch norm
    assert stack_signature(mobilenet) is not None
    assert stack_signature(build_model("mobilenet_small", (1, 28, 28), 10)) is None
    mobilenet.body[1].momentum = None  # a cumulative average: not carried
    assert stack_signature(mobilenet) is None
    frozen = build_model("mlp", (1, 8, 8), 10)
    frozen.head.weight.requires_grad_(False)
    assert stack_signature(frozen) is None
    with pytest.raises(ValueError, match="one stackable architecture"):
        StackedModel([build_model("mlp", (1, 8, 8), 10), build_model("cnn_small", (1, 8, 8), 10)])


def test_the_stacked_forward_is_each_models_forward():
    models, xs, _ = _clients("cnn_small", (1, 8, 8))
    batch = torch.stack([torch.from_numpy(x[:9]) for x in xs])
    with torch.no_grad():
        stacked = StackedModel(models)(batch)
        for c, model in enumerate(models):
            torch.testing.assert_close(stacked[c], model(batch[c]), atol=1e-5, rtol=1e-5)


def test_batch_norm_normalizes_each_client_by_its_own_valid_rows():
    """In train mode each client's statistics come from its own rows in ``valid`` only: its outputs
    and running statistics are its model's on those rows alone, and a client with no valid rows
    keeps its statistics and batch count, as a model that did not run."""
    models, xs, _ = _clients("mobilenet_small", (1, 8, 8))
    alone = [copy.deepcopy(m) for m in models]
    batch = torch.stack([torch.from_numpy(x[:9]) for x in xs])
    valid = torch.ones(len(models), 9, dtype=torch.bool)
    valid[1, 5:] = False  # a short last batch, padded
    valid[3] = False  # a client done with its steps
    stacked = StackedModel(models).train()
    out = stacked(batch, valid)
    stacked.write_back(models)
    for c, (model, reference) in enumerate(zip(models, alone)):
        rows = int(valid[c].sum())
        if rows:
            torch.testing.assert_close(out[c, :rows], reference.train()(batch[c, :rows]), atol=1e-5, rtol=1e-5)
        buffers = list(model.buffers())
        assert len(buffers) == 3 * 7 and int(buffers[2]) == (1 if rows else 0)  # 7 batch norms
        for ours, theirs in zip(buffers, reference.buffers()):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("cnn_small", (1, 8, 8)), ("mobilenet_small", (1, 8, 8))])
@pytest.mark.parametrize("loss", ["l1_logits", "kl"])
def test_distillation_jobs_end_where_distill_takes_each_model(arch, shape, loss):
    loss_tolerance, atol, rtol = _tolerances(arch)
    models, xs, _ = _clients(arch, shape)
    rng = np.random.default_rng(1)
    targets = [rng.normal(size=(len(x), 10)).astype(np.float32) for x in xs]
    if loss == "kl":  # probability rows
        targets = [np.exp(t) / np.exp(t).sum(1, keepdims=True) for t in targets]
    optim = OptimOptions(lr=3e-3, max_grad_norm=1.0)
    one_by_one, stacked = [copy.deepcopy(m) for m in models], [copy.deepcopy(m) for m in models]
    expected = [distill(m, x, t, epochs=2, optim=optim, loss=loss, generator=torch.Generator().manual_seed(i))
                for i, (m, x, t) in enumerate(zip(one_by_one, xs, targets))]
    got = fit_many([FitJob(m, x, t, torch.Generator().manual_seed(i), epochs=2, loss=loss)
                    for i, (m, x, t) in enumerate(zip(stacked, xs, targets))], optim=optim)
    for ours, theirs in zip(got, expected):
        assert ours["steps"] == theirs["steps"] and ours["loss"] == pytest.approx(theirs["loss"], abs=loss_tolerance)
    for a, b, before in zip(stacked, one_by_one, models):
        for ours, theirs, start in zip(a.state_dict().values(), b.state_dict().values(), before.state_dict().values()):
            torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
            assert not torch.equal(ours, start)
    with pytest.raises(ValueError, match="share a loss"):
        fit_many([FitJob(models[0], xs[0], targets[0], torch.Generator(), loss=loss),
                  FitJob(models[1], xs[1], targets[1], torch.Generator())])


@pytest.mark.parametrize("arch", ["cnn_small", "mobilenet_small"])
def test_predictions_of_a_group_are_each_models_own(arch):
    models, xs, _ = _clients(arch, (1, 8, 8))
    for model in models:
        model.train()  # predicting puts them in eval mode (batch norm: running statistics), as predict_logits does
    inputs = np.concatenate(xs * 3)[:600]  # more than one chunk of 512
    for ours, model in zip(predict_many(models, inputs), models):
        assert ours.dtype == np.float32 and ours.shape == (600, 10)
        np.testing.assert_allclose(ours, predict_logits(model, inputs), atol=1e-5, rtol=1e-5)
    assert [p.shape for p in predict_many(models, inputs[:0])] == [(0, 0)] * len(models)


def test_a_group_evaluates_each_model_on_its_own_split():
    models, xs, ys = _clients("cnn_small", (1, 8, 8))
    xs, ys = [np.concatenate([x] * 6) for x in xs], [np.concatenate([y] * 6) for y in ys]  # 54 to 600 rows
    xs[2], ys[2] = xs[2][:0], ys[2][:0]  # one client without test rows
    groups = [np.arange(len(y)) % 3 for y in ys]
    got = evaluate_many(models, xs, ys, groups=groups, num_groups=3)
    for ours, model, x, y, g in zip(got, models, xs, ys, groups):
        theirs = evaluate(model, x, y, groups=g, num_groups=3)
        assert ours.keys() == theirs.keys() and ours["n"] == theirs["n"] == len(x)
        if len(x):
            assert ours["accuracy"] == theirs["accuracy"] and ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        else:
            assert np.isnan(ours["accuracy"]) and np.isnan(theirs["accuracy"])
        np.testing.assert_array_equal(ours["group_correct"], theirs["group_correct"])
        np.testing.assert_array_equal(ours["group_count"], theirs["group_count"])


def test_a_batched_fedmd_run_stacks_its_stages_and_is_deterministic(tmp_path):
    config = small_config("fedmd", **{"models.clients": "[mlp, cnn_small]", "runtime.executor": "batched"})
    first = run_experiment(config, tmp_path / "a")
    run_experiment(config, tmp_path / "b")
    # two groups (mlp, cnn_small), three stages a round (communicate, digest_revisit, evaluate), two rounds
    assert first["batched_groups"] == 12
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_batched_fedavg_run_trains_groups_whole_and_is_deterministic(tmp_path):
    config = small_config("fedavg", **{"models.clients": "[mlp]", "runtime.executor": "batched"})
    first = run_experiment(config, tmp_path / "a")
    run_experiment(config, tmp_path / "b")
    assert first["batched_groups"] == 4  # one group (every client is an mlp), train and evaluate, two rounds
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


def test_a_declined_group_fails_client_by_client_as_sequential_does(tmp_path, monkeypatch):
    """A group FedAvg's batched handler declines (here every group: ``train_many`` patched to decline)
    runs client by client; a raising client there is that client's failure alone, as in the
    sequential executor."""
    train = FedAvgClient.train

    def fails_for_client_2(self, message, ctx):
        if ctx.client_id == 2 and ctx.round == 1:
            raise OSError("disk full")
        return train(self, message, ctx)

    monkeypatch.setattr(FedAvgClient, "train", fails_for_client_2)
    monkeypatch.setattr(FedAvgClient, "train_many", lambda self, messages, ctxs: None)  # every group declines
    for executor in ("sequential", "batched"):
        run_experiment(small_config("fedavg", **{"models.clients": "[mobilenet_small]", "runtime.executor": executor}),
                       tmp_path / executor)
    rows = _rows(tmp_path / "batched")
    assert rows == _rows(tmp_path / "sequential")
    assert rows[1]["failures"] == {"2": "train: raised OSError: disk full"}


class Crash(RuntimeError):
    pass


def test_a_batched_run_resumes_to_the_uninterrupted_batched_records(tmp_path):
    config = small_config("fedavg", rounds=3, **{"models.clients": "[cnn_small]", "runtime.executor": "batched",
                                                 "runtime.checkpoint_every": 1})
    whole = run_experiment(config, tmp_path / "whole")
    assert whole["batched_groups"] == 6  # one group, train and evaluate, three rounds

    def crash_in_round_1(row):
        if row["round"] == 1:
            raise Crash

    with pytest.raises(Crash):
        run_experiment(config, tmp_path / "cut", on_round=crash_in_round_1)
    resumed = run_experiment(config, tmp_path / "cut", resume=True)
    assert resumed["resumed_at_round"] == 1
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()


def test_a_group_is_stacked_in_sub_groups_of_similar_step_counts():
    """A stacked step costs the whole group's work however few clients are still active, so clients
    far below the group's largest step count go in sub-groups of their own."""
    assert fill_groups([21, 12, 6, 18]) == [[0, 3], [1], [2]]
    assert fill_groups([8, 8, 8]) == [[0, 1, 2]]
    assert fill_groups([10, 8, 7], min_fill=0.8) == [[0, 1], [2]]
    assert fill_groups([]) == []
