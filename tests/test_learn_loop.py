"""The general loop of ``hetpfl.learn``: objectives over parameter subsets, module modes, several
optimizers alternating within a step, batch sources, integer (token) inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetpfl.learn import (
    IndexBatches,
    Objective,
    OptimOptions,
    SampledBatches,
    as_input_tensor,
    evaluate,
    fit,
    index_pass,
    kl_to_targets,
    noise_consistency,
    optimize,
    predict_logits,
    predict_proba,
    select_parameters,
    steps_for_epochs,
)


def _blobs(n=200, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (c, d))
    y = rng.integers(0, c, n)
    return (centers[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y.astype(np.int64)


def _net(d=6, c=3, seed=0, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, c))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


# -- parameter subsets -------------------------------------------------------------------------


def test_only_the_objectives_parameters_change():
    x, y = _blobs()
    model = _net()
    head = select_parameters(model, where=lambda name: name.startswith("4."))
    assert [p.shape for p in head] == [torch.Size([3, 16]), torch.Size([3])]
    before = _snapshot(model)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def loss(idx):
        return F.cross_entropy(model(xt[idx]), yt[idx])

    out = optimize(Objective(loss, head, OptimOptions(lr=1e-2), train=(model,)), IndexBatches(len(x), 32, epochs=2))
    assert out["steps"] == 14 and np.isfinite(out["loss"])
    state = model.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(state[key], before[key]), key
        assert dict(model.named_parameters())[key].grad is None  # no gradient computed outside the set
    assert not torch.equal(state["4.weight"], before["4.weight"])
    assert not torch.equal(state["1.running_mean"], before["1.running_mean"])  # train mode: BN statistics move


def test_fit_leaves_frozen_parameters_alone():
    x, y = _blobs()
    model = _net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    assert len(select_parameters(model)) == 4  # trainable ones only
    before = _snapshot(model)
    fit(model, x, y, epochs=1, optim=OptimOptions(optimizer="sgd", weight_decay=1e-2))
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[0].bias, before["0.bias"])
    assert not torch.equal(model[4].weight, before["4.weight"])


class _LoraLinear(nn.Module):
    def __init__(self, d_in, d_out, rank=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def test_adapter_only_training_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(_LoraLinear(6, 8), nn.ReLU(), _LoraLinear(8, 3))
    adapters = select_parameters(model, where=lambda name: "lora" in name)
    assert len(adapters) == 4
    x, y = _blobs()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    before = _snapshot(model)
    optimize(Objective(lambda idx: F.cross_entropy(model(xt[idx]), yt[idx]), adapters, OptimOptions(lr=1e-2),
                       train=(model,)), IndexBatches(len(x), 32, steps=5))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) == ("lora" not in key), key


# -- several objectives, module modes ----------------------------------------------------------


def test_generator_and_student_alternate_with_teacher_frozen():
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 6))
    student, teacher = _net(seed=1), _net(seed=2)
    modules = {"generator": generator, "student": student, "teacher": teacher}
    seen: list[tuple[str, str, bool]] = []
    phase = {"now": None}
    for name, module in modules.items():
        module.register_forward_hook(lambda m, i, o, name=name: seen.append((phase["now"], name, m.training)))
    teacher_before, student_before, generator_before = _snapshot(teacher), _snapshot(student), _snapshot(generator)
    rng = torch.Generator().manual_seed(0)
    calls = {"generator": 0, "student": 0}

    def generator_loss(z):  # adversarial: make the student disagree with the teacher
        phase["now"] = "generator"
        calls["generator"] += 1
        x = generator(z)
        return -kl_to_targets(student(x), F.softmax(teacher(x), dim=-1)).mean()

    def student_loss(z):
        phase["now"] = "student"
        calls["student"] += 1
        with torch.no_grad():
            x = generator(z)
            target = F.softmax(teacher(x), dim=-1)
        return kl_to_targets(student(x), target).mean()

    objectives = [
        Objective(generator_loss, generator, OptimOptions(lr=1e-3), train=(generator,), eval=(student, teacher),
                  repeats=2, name="generator"),
        Objective(student_loss, student, OptimOptions(lr=1e-2, optimizer="sgd", max_grad_norm=1.0),
                  train=(student,), eval=(generator, teacher), name="student"),
    ]
    out = optimize(objectives, SampledBatches(lambda step: torch.randn(16, 4, generator=rng), steps=6))
    assert set(out) == {"generator", "student", "steps"} and out["steps"] == 6
    assert np.isfinite(out["generator"]) and np.isfinite(out["student"])
    assert calls == {"generator": 12, "student": 6}
    expected = {
        "generator": {"generator": True, "student": False, "teacher": False},
        "student": {"generator": False, "student": True, "teacher": False},
    }
    assert {(p, n) for p, n, _ in seen} == {(p, n) for p in expected for n in expected[p]}
    for p, name, training in seen:
        assert training == expected[p][name], (p, name)
    assert _unchanged(teacher, teacher_before)  # weights and BatchNorm statistics
    assert all(p.grad is None for p in teacher.parameters())
    assert not _unchanged(student, student_before) and not _unchanged(generator, generator_before)
    # the student ran in eval mode in the generator's turns: only its own 6 steps moved its statistics
    assert int(student[1].num_batches_tracked) == 6


def test_eval_modules_override_train_modules():
    model = _net()
    states = []
    model[1].register_forward_hook(lambda m, i, o: states.append((model.training, m.training)))
    x = torch.randn(8, 6)
    optimize(Objective(lambda b: model(b).pow(2).mean(), model, train=(model,), eval=(model[1],)), [x, x])
    assert states == [(True, False), (True, False)]


def test_objective_and_optimize_validation():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="repeats"):
        Objective(lambda b: b, model, repeats=0)
    with pytest.raises(ValueError, match="steps"):
        Objective(lambda b: b, model, name="steps")
    with pytest.raises(ValueError, match="distinct"):
        optimize([Objective(lambda b: b, model), Objective(lambda b: b, model)], [1])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        optimize(Objective(lambda b: frozen(b).sum(), frozen), [torch.ones(1, 2)])
    out = optimize(Objective(lambda b: model(b).sum(), model), [torch.ones(1, 2)], steps=0)
    assert out["steps"] == 0 and np.isnan(out["loss"])


def test_recorded_loss_is_the_mean_of_step_losses():
    model = _net()
    x, y = _blobs(n=100)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    values = []

    def loss(idx):
        value = F.cross_entropy(model(xt[idx]), yt[idx])
        values.append(value.item())
        return value

    out = optimize(Objective(loss, model, train=(model,)), IndexBatches(100, 16, epochs=1.5,
                                                                        generator=torch.Generator().manual_seed(0)))
    assert out["steps"] == len(values) == 10
    assert out["loss"] == float(np.mean(values))


# -- batch sources -----------------------------------------------------------------------------


def test_sampled_batches_are_drawn_lazily_for_the_given_steps():
    model = nn.Linear(3, 1)
    drawn = []

    def sample(step):
        drawn.append(step)
        return torch.full((4, 3), float(step))

    source = SampledBatches(sample, steps=7)
    assert len(source) == 7
    assert optimize(Objective(lambda b: model(b).pow(2).mean(), model), source)["steps"] == 7
    assert drawn == list(range(7))
    drawn.clear()
    assert optimize(Objective(lambda b: model(b).pow(2).mean(), model), source, steps=3)["steps"] == 3
    assert drawn == [0, 1, 2]  # nothing drawn past the last step
    unsized = (torch.ones(2, 3) for _ in range(4))  # a plain iterator runs until it ends
    assert optimize(Objective(lambda b: model(b).sum(), model), unsized)["steps"] == 4
    with pytest.raises(ValueError, match="steps"):
        SampledBatches(sample, steps=-1)


def test_index_batches_cover_passes_and_count_steps():
    gen = torch.Generator().manual_seed(3)
    batches = list(IndexBatches(10, 4, epochs=2, generator=gen))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(10))
    replay = torch.Generator().manual_seed(3)
    assert torch.equal(torch.cat(batches[:3]), torch.randperm(10, generator=replay))  # one fresh order per pass
    assert [len(b) for b in index_pass(9, 4)] == [4, 4]  # a lone final sample is skipped
    assert [len(b) for b in index_pass(10, 4, shuffle=False, drop_last=True)] == [4, 4]
    assert [b.tolist() for b in index_pass(3, 8, shuffle=False, drop_last=True)] == [[0, 1, 2]]  # first kept
    assert steps_for_epochs(320, 32, 0.5) == 5 and steps_for_epochs(320, 32, 0.01) == 1
    assert steps_for_epochs(0, 32, 1) == 0 and steps_for_epochs(10, 32, 0) == 0
    # with drop_last a pass gives fewer batches, so the count is reached over more passes
    assert [len(b) for b in IndexBatches(10, 4, epochs=1, drop_last=True, shuffle=False)] == [4, 4, 4]
    assert len(IndexBatches(10, 4, steps=11)) == 11 and len(list(IndexBatches(10, 4, steps=11))) == 11
    assert len(IndexBatches(0, 4, steps=5)) == 0
    with pytest.raises(ValueError, match="batch_size"):
        IndexBatches(10, 0)


def test_batch_size_one_terminates_with_the_right_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = _blobs(n=10)
    assert [len(b) for b in index_pass(10, 1)] == [1] * 10
    assert fit(model, x, y, epochs=1, batch_size=1)["steps"] == 10
    assert fit(model, x, y, epochs=2.5, batch_size=1, generator=torch.Generator().manual_seed(0))["steps"] == 25


# -- integer (token) inputs --------------------------------------------------------------------


class _BagOfTokens(nn.Module):
    def __init__(self, vocab=20, dim=16, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))


def _token_data(n=400, length=8, vocab=20, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # class 0 draws tokens from the lower half of the vocabulary, class 1 from the upper half
    x = rng.integers(0, vocab // 2, (n, length)) + (vocab // 2) * y[:, None]
    return x.astype(np.int64), y.astype(np.int64)


def test_token_model_trains_and_scores_on_int64_inputs():
    x, y = _token_data()
    torch.manual_seed(0)
    model = _BagOfTokens()
    before = evaluate(model, x, y)
    out = fit(model, x, y, epochs=3, batch_size=32, optim=OptimOptions(lr=1e-2),
              generator=torch.Generator().manual_seed(0))
    assert out["steps"] == 39
    after = evaluate(model, x, y)
    assert after["accuracy"] > 0.95 and after["loss"] < before["loss"] and after["n"] == 400
    probs = predict_proba(model, x.astype(np.int32), batch_size=64)  # any integer dtype is a token id
    assert probs.shape == (400, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert (probs.argmax(1) == y).mean() == after["accuracy"]
    assert predict_logits(model, x).shape == (400, 2)


def test_inputs_keep_their_kind():
    assert as_input_tensor(np.zeros((2, 3), np.float64)).dtype == torch.float32
    assert as_input_tensor(np.zeros((2, 3), np.float16)).dtype == torch.float32
    assert as_input_tensor(np.zeros((2, 3), np.int32)).dtype == torch.int64
    assert as_input_tensor(np.zeros((2, 3), np.uint8)).dtype == torch.int64
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    t = as_input_tensor(x)
    t[0, 0] = 9  # shares memory with a writable int64 array
    assert x[0, 0] == 9
    with pytest.raises(ValueError, match="floating"):
        noise_consistency(nn.Identity(), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), noise_std=0.1,
                          generator=None)
