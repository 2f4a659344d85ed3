"""The learning-rate range test: restoration bit for bit, the known good range, NaN handling, the rules."""

import math

import numpy as np
import pytest
import torch

from convdescent.data import BatchLoader
from convdescent.data.synthetic import synthetic_images
from convdescent.layers import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, ReLU
from convdescent.losses import MSE, SoftmaxCrossEntropy
from convdescent.model import Sequential
from convdescent.optim import make_optimizer
from convdescent.optim import state_dict as opt_state_dict
from convdescent.search import analyze, lr_find, smooth_losses, suggest, sweep_lrs


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix: tree}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _regression_batches(n_batches=20, batch=64, d=10, seed=0):
    """Least squares with x ~ N(0, I): the loss's curvature is about 2, so plain SGD diverges beyond lr ~1."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, 1, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, d, generator=g)
        y = x @ w_true + 0.01 * torch.randn(batch, 1, generator=g)
        out.append((x, y))
    return out


def test_restores_weights_buffers_rngs_loader_and_optimizer_state_bit_for_bit():
    x, y = synthetic_images(96, 3, (1, 8, 8), seed=1)
    model = Sequential([Conv2D(4, 3), BatchNorm2D(), ReLU(), Flatten(), Dropout(0.3, seed=5), Dense(3)],
                       input_shape=(1, 8, 8), seed=0)
    loader = BatchLoader(x, y, batch_size=16, shuffle=True, seed=3, augment="flip")
    opt = make_optimizer("adam", lr=1e-3)
    state = opt.init(model.params())
    # give the optimizer a non-trivial state first, as in a run in progress
    for xb, yb in list(loader)[:2]:
        logits = model.forward(xb, train=True)
        _, d = SoftmaxCrossEntropy()(logits, yb)
        model.backward(d)
        updates, state = opt.update(model.grads(), state, model.params())
        from convdescent.optim import apply_updates
        apply_updates(model.params(), updates)
    next(iter(loader))  # a loader in the middle of an epoch
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = _flat(opt_state_dict(state))
    before_loader = loader.state_dict()
    before_drop = model.layers[4].get_rng_state().clone()
    before_global = torch.get_rng_state()
    result = lr_find(model, SoftmaxCrossEntropy(), loader, "adam", start_lr=1e-5, end_lr=10.0, num_steps=30,
                     opt_state=state, sync_every=7)
    assert len(result.lrs) > 5
    after = model.state_dict()
    assert before_model.keys() == after.keys()
    for k in before_model:
        assert torch.equal(before_model[k], after[k]), k
    assert "bn1.running_mean" in after and not torch.equal(after["bn1.running_mean"],
                                                                   torch.zeros_like(after["bn1.running_mean"]))
    after_opt = _flat(opt_state_dict(state))
    assert before_opt.keys() == after_opt.keys()
    assert all(_same(before_opt[k], after_opt[k]) for k in before_opt)
    assert loader.state_dict() == before_loader
    assert torch.equal(model.layers[4].get_rng_state(), before_drop)
    assert torch.equal(torch.get_rng_state(), before_global)
    # and the next batches are the ones that would have come anyway
    xb_after, _ = next(iter(loader))
    loader.load_state_dict(before_loader)
    xb_again, _ = next(iter(loader))
    assert torch.equal(xb_after, xb_again)


def test_restores_state_even_when_the_sweep_raises():
    x, y = synthetic_images(32, 3, (1, 8, 8), seed=1)
    model = Sequential([Flatten(), Dense(3)], input_shape=(1, 8, 8), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = BatchLoader(x, y, batch_size=8, seed=0)
    calls = {"n": 0}

    def bad_loss(logits, yb):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return SoftmaxCrossEntropy()(logits, yb)

    with pytest.raises(RuntimeError, match="boom"):
        lr_find(model, bad_loss, loader, "sgd", num_steps=10, sync_every=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert loader.state_dict()["position"] == 0 and loader.state_dict()["epoch"] == 0


def test_finds_the_known_good_range_of_least_squares():
    model = Sequential([Dense(1)], input_shape=(10,), seed=0)
    batches = _regression_batches()
    result = lr_find(model, MSE(), batches, "sgd", start_lr=1e-4, end_lr=10.0, num_steps=100, sync_every=5)
    # curvature ~2 (up to ~4 on a batch of 64): stable below lr ~0.5-1, best near 0.25-0.5
    assert result.stop_reason == "diverged", result.report()
    stop_lr = result.lrs[result.num_valid]
    assert 0.5 < stop_lr < 10.0
    rec = result.recommended_lr
    assert rec is not None and 1e-2 <= rec <= 1.0, result.report()
    lo, hi = result.good_range
    assert 1e-3 <= lo < hi <= 2.0
    for rule in ("valley", "steepest", "min/10"):
        assert result.suggestions[rule].lr is not None
        assert result.suggestions[rule].lr < stop_lr
    text = result.report()
    assert "Recommended" in text and "valley" in text and "steepest" in text and "min/10" in text


def test_nan_loss_ends_the_sweep_and_gives_no_suggestion_from_it():
    model = Sequential([Dense(1)], input_shape=(10,), seed=0)
    batches = _regression_batches()

    class NanAfter:
        """MSE that returns NaN from step 40 on, as a blown-up network would."""

        def __init__(self):
            self.n = 0
            self.inner = MSE()

        def __call__(self, pred, target):
            self.n += 1
            loss, d = self.inner(pred, target)
            if self.n > 40:
                loss = loss * float("nan")
            return loss, d

    result = lr_find(model, NanAfter(), batches, "sgd", start_lr=1e-4, end_lr=1e-1, num_steps=60,
                     sync_every=8, diverge_factor=1e9)
    assert result.stop_reason == "non-finite loss"
    assert result.num_valid == 40
    assert len(result.lrs) == 41 and math.isnan(result.losses[-1])
    for s in result.suggestions.values():
        if s.index is not None:
            assert s.index < 40
            assert math.isfinite(s.loss)
    d = result.to_dict()
    assert d["losses"][-1] is None and d["smoothed"][-1] is None


def test_smoothing_is_bias_corrected():
    s = smooth_losses([2.0, 2.0, 2.0], beta=0.98)
    assert np.allclose(s, 2.0)
    s = smooth_losses([1.0, float("inf"), 1.0])
    assert s[0] == 1.0 and np.isnan(s[1]) and np.isnan(s[2])


def test_steepest_ignores_a_noisy_start_and_valley_sits_in_the_lower_part():
    lrs = sweep_lrs(1e-6, 1.0, 200)
    x = np.log10(lrs)
    # flat at 2.3, a sharp noisy drop at the very start, the real fall between 1e-3 and 1e-1
    curve = 2.3 - 1.8 / (1 + np.exp(-(x + 2) * 3))
    curve[:4] = [4.0, 3.0, 2.5, 2.3]
    sugg, valley = suggest(lrs, curve, skip_start=0.05)
    st = sugg["steepest"]
    assert st.index >= 10 and 3e-3 < st.lr < 3e-2
    a, b = valley
    assert lrs[a] < 1e-2 < lrs[b]
    v = sugg["valley"].lr
    assert math.log10(lrs[a]) + 0.5 * (math.log10(lrs[b]) - math.log10(lrs[a])) < math.log10(v) <= math.log10(lrs[b])
    assert math.isclose(sugg["min/10"].lr, lrs[int(np.argmin(curve[10:])) + 10] / 10)


def test_no_recommendation_when_the_loss_never_falls():
    lrs = sweep_lrs(1e-6, 1.0, 50)
    losses = 2.3 + 0.01 * np.sin(np.arange(50))
    result = analyze(lrs, losses)
    assert result.recommended is None
    assert "never fell" in result.reason or "no rule" in result.reason
    assert result.warnings  # it reached end_lr without blowing up


@pytest.mark.parametrize("kwargs, message", [
    ({"start_lr": -1.0}, "start_lr must be a positive number, got -1.0"),
    ({"start_lr": 1.0, "end_lr": 0.1}, "end_lr must be larger than start_lr"),
    ({"num_steps": 2}, "num_steps must be an integer of at least 5, got 2"),
    ({"beta": 1.0}, "beta must be in [0, 1), got 1.0"),
    ({"diverge_factor": 0.5}, "diverge_factor must be larger than 1, got 0.5"),
    ({"lr": 0.1}, "lr is what the range test sweeps"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    model = Sequential([Dense(1)], input_shape=(10,), seed=0)
    with pytest.raises(ValueError) as e:
        lr_find(model, MSE(), _regression_batches(2), "sgd", **kwargs)
    assert message in str(e.value)


def test_plot_marks_every_rule(tmp_path):
    model = Sequential([Dense(1)], input_shape=(10,), seed=0)
    result = lr_find(model, MSE(), _regression_batches(), "sgd", start_lr=1e-4, end_lr=10.0, num_steps=60)
    path = result.plot(tmp_path / "lr_find.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_lucky_early_drop_in_noisy_losses_does_not_pass_for_the_steepest_fall():
    rng = np.random.default_rng(0)
    lrs = sweep_lrs(1e-6, 1.0, 100)
    x = np.log10(lrs)
    trend = 2.3 - 1.5 / (1 + np.exp(-(x + 2) * 2.5)) + 20 * np.maximum(x + 0.3, 0) ** 2
    raw = trend + 0.3 * rng.standard_normal(100)
    raw[:3] += 0.6  # the first batches are unlucky (2 sigma): the average falls fast early on
    result = analyze(lrs, raw)
    st = result.suggestions["steepest"]
    assert st.index >= 10 and 1e-3 < st.lr < 0.3, result.report()
    assert result.recommended is not None and 1e-3 < result.recommended_lr < 0.3


def test_a_loss_that_turns_up_without_exploding_is_reported_as_the_top_of_the_range():
    lrs = sweep_lrs(1e-6, 10.0, 120)
    x = np.log10(lrs)
    # falls around 1e-3, bottoms out near 1e-1, then climbs back towards the start (dead units) but < 4x best
    curve = 2.3 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + 2.0 / (1 + np.exp(-(x + 0.5) * 4))
    result = analyze(lrs, curve)
    assert result.stop_reason == "reached end_lr"
    assert any("turned up after lr" in w for w in result.warnings), result.warnings
    flat = analyze(lrs, 2.3 - 1.5 / (1 + np.exp(-(x + 3) * 3)))
    assert any("never blew up" in w for w in flat.warnings)
