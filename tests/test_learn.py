import numpy as np
import pytest
import torch
from torch import nn

from hetpfl.learn import (
    OptimOptions,
    arrays_to_state,
    augment_batch,
    distill,
    evaluate,
    fit,
    predict_logits,
    predict_proba,
    sharpen,
    state_to_arrays,
)


def _blobs(n=400, d=8, c=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (c, d))
    y = rng.integers(0, c, n)
    x = (centers[y] + rng.normal(0, 1, (n, d))).astype(np.float32)
    return x, y.astype(np.int64)


def _net(d=8, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, c))


def test_fit_learns_separable_data():
    x, y = _blobs()
    model = _net()
    before = evaluate(model, x, y)["accuracy"]
    fit(model, x, y, epochs=5, batch_size=32, optim=OptimOptions(lr=1e-2), generator=torch.Generator().manual_seed(0))
    after = evaluate(model, x, y)["accuracy"]
    assert after > 0.95 and after > before


def test_fit_is_deterministic_given_generator():
    x, y = _blobs()
    outs = []
    for _ in range(2):
        model = _net()
        fit(model, x, y, epochs=1, generator=torch.Generator().manual_seed(5))
        outs.append(predict_proba(model, x))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_fractional_epochs_take_proportional_steps():
    x, y = _blobs(n=320)
    assert fit(_net(), x, y, epochs=0.5, batch_size=32)["steps"] == 5
    assert fit(_net(), x, y, epochs=2, batch_size=32)["steps"] == 20


def test_fixed_steps_override_epochs_whatever_the_data_size():
    for n in (20, 320, 1000):
        x, y = _blobs(n=n)
        assert fit(_net(), x, y, epochs=1, steps=10, batch_size=64)["steps"] == 10


def test_distill_moves_student_towards_teacher():
    x, y = _blobs()
    teacher = _net(seed=1)
    fit(teacher, x, y, epochs=5, optim=OptimOptions(lr=1e-2))
    targets = predict_proba(teacher, x)
    student = _net(seed=2)

    def kl(model):
        p = predict_proba(model, x)
        return float(np.mean(np.sum(targets * (np.log(targets + 1e-9) - np.log(p + 1e-9)), 1)))

    before = kl(student)
    distill(student, x, targets, epochs=5, optim=OptimOptions(lr=1e-2), consistency_weight=5.0,
            generator=torch.Generator().manual_seed(0))
    assert kl(student) < 0.25 * before
    agree = (predict_proba(student, x).argmax(1) == targets.argmax(1)).mean()
    assert agree > 0.95


def test_distill_sample_weights_zero_means_no_kl_gradient():
    x, y = _blobs(n=64)
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    targets = np.eye(3, dtype=np.float32)[y]
    distill(model, x, targets, epochs=1, sample_weights=np.zeros(len(x), np.float32), optim=OptimOptions(optimizer="sgd", momentum=0.0))
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(b, p.detach())


def test_sharpen():
    p = np.array([[0.6, 0.3, 0.1]], np.float32)
    assert sharpen(p, 1.0) is p
    hot = sharpen(p, 0.01)
    assert hot[0, 0] > 0.999
    flat = sharpen(p, 100.0)
    assert np.ptp(flat) < 0.02
    np.testing.assert_allclose(sharpen(p, 0.5).sum(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0)


def test_crop_flip_keeps_shape_and_content_stats():
    x = torch.rand(16, 3, 8, 8)
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    again = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    assert not torch.equal(out, x)
    with pytest.raises(ValueError, match="augment"):
        augment_batch(x, "rotate", None)


def test_state_round_trip_through_arrays():
    model, other = _net(seed=0), _net(seed=1)
    arrays = state_to_arrays(model)
    assert any(k.startswith("b.") for k in arrays)  # BatchNorm counter travels as an integer buffer
    arrays_to_state(other, arrays)
    x, _ = _blobs(n=10)
    np.testing.assert_array_equal(predict_proba(model, x), predict_proba(other, x))


def test_predict_proba_is_softmax_of_predict_logits():
    x, _ = _blobs(n=1100)
    model = _net()
    logits = predict_logits(model, x, batch_size=300)
    probs = predict_proba(model, x)
    assert logits.shape == probs.shape == (1100, 3) and probs.dtype == np.float32
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, shifted / shifted.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(predict_proba(model, x, batch_size=7), probs, rtol=1e-5, atol=1e-7)
    assert predict_proba(model, x[:0]).shape == (0, 0)


def test_distill_l1_logits_moves_logits_towards_targets():
    x, _ = _blobs(n=128)
    target = np.random.default_rng(0).normal(size=(128, 3)).astype(np.float32)
    model = _net()
    before = np.abs(predict_logits(model, x) - target).mean()
    out = distill(model, x, target, loss="l1_logits", epochs=20, optim=OptimOptions(lr=1e-2),
                  generator=torch.Generator().manual_seed(0))
    assert out["steps"] == 80
    assert np.abs(predict_logits(model, x) - target).mean() < 0.8 * before


def test_bad_arguments_fail_early():
    x, y = _blobs(n=16)
    with pytest.raises(ValueError, match="augment"):
        fit(_net(), x, y, epochs=0, augment="rotate")
    with pytest.raises(ValueError, match="labels"):
        fit(_net(), x, y[:10])
    with pytest.raises(ValueError, match="target rows"):
        distill(_net(), x, np.full((10, 3), 1 / 3, np.float32))
    with pytest.raises(ValueError, match="loss"):
        distill(_net(), x, np.full((16, 3), 1 / 3, np.float32), loss="mse")
    assert fit(_net(), x, y, epochs=0) == pytest.approx({"loss": float("nan"), "steps": 0}, nan_ok=True)
