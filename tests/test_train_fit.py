"""fit / Trainer: learning, callbacks and their hooks, fast path = hooked path, full batch, steps, bf16,
early stopping, reduce-on-plateau, display modes and argument errors."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.data.synthetic import synthetic_images
from convdescent.optim import make_optimizer, optimizer_from_args
from convdescent.optim.fused import InlineAdam
from convdescent.train import Callback, EarlyStopping, LambdaCallback, fit
from convdescent.train.callbacks import format_epoch_line


# These networks are tiny; one thread avoids losing most of the time to thread contention.
pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=192, nv=64, k=4, hw=8, seed=0):
    x, y = synthetic_images(n, k, (1, hw, hw), seed=seed)
    xv, yv = synthetic_images(nv, k, (1, hw, hw), seed=seed + 1)
    return x, y, xv, yv


def model(k=4, hw=8, seed=0):
    return seed_cnn((1, hw, hw), k, seed=seed)


def test_fit_learns_and_fills_history():
    m = model()
    h = fit(m, SoftmaxCrossEntropy(), make_optimizer("adam", lr=3e-3), data(), epochs=4, batch_size=16, verbose=0)
    assert h.epoch == [1, 2, 3, 4]
    assert h.step == [12, 24, 36, 48]
    assert h.loss[-1] < h.loss[0]
    assert h.val_acc[-1] >= 0.9
    assert h.best_val_acc == max(h.val_acc)
    assert h.final["epoch"] == 4 and h.final["val_acc"] == h.val_acc[-1]
    assert all(lr == pytest.approx(3e-3) for lr in h.lr)
    assert all(t > 0 for t in h.time)


class Recorder(Callback):
    """Checks the hook contract: grads seen before the update, updates equal to the parameter change."""

    def __init__(self, every=3):
        self.every = every
        self.calls = []
        self.grad_steps = []

    def on_train_begin(self, trainer):
        self.calls.append("train_begin")

    def on_epoch_begin(self, trainer, epoch):
        self.calls.append(f"epoch_begin {epoch}")

    def wants_grads(self, step):
        return step % self.every == 0

    def on_gradients(self, trainer, step, grads, params):
        self.grad_steps.append(step)
        self.grads = {k: g.clone() for k, g in grads.items()}
        self.before = {k: p.clone() for k, p in params.items()}

    def on_update(self, trainer, step, updates, params):
        self.updates = {k: u.clone() for k, u in updates.items()}
        for k, p in params.items():  # the parameters have not moved yet
            assert torch.equal(p, self.before[k])
        self.check_step = step

    def on_step_end(self, trainer, step, logs):
        assert step == trainer.step
        if step % self.every == 0:
            assert step == self.check_step
            for k, p in trainer.model.params().items():
                torch.testing.assert_close(p - self.before[k], self.updates[k], rtol=0, atol=1e-6)
                # plain gradient descent: the update is -lr * grad
                torch.testing.assert_close(self.updates[k], -0.1 * self.grads[k], rtol=1e-6, atol=1e-7)

    def on_epoch_end(self, trainer, epoch, logs):
        self.calls.append(f"epoch_end {epoch} {logs['val_acc']:.3f}")

    def on_train_end(self, trainer):
        self.calls.append("train_end")


def test_callback_hooks_order_and_contract():
    rec = Recorder()
    fit(model(), SoftmaxCrossEntropy(), make_optimizer("gd", lr=0.1), data(n=96), epochs=2, batch_size=16,
        callbacks=[rec], verbose=0)
    assert rec.calls[0] == "train_begin" and rec.calls[-1] == "train_end"
    assert [c.split()[0] for c in rec.calls[1:-1]] == ["epoch_begin", "epoch_end", "epoch_begin", "epoch_end"]
    assert rec.grad_steps == [3, 6, 9, 12]


@pytest.mark.parametrize("small_native", [False, True], ids=["torch-kernel", "native-small-update"])
def test_hooked_steps_give_the_same_parameters_as_the_fast_path(small_native, monkeypatch):
    """A step whose gradients a callback reads runs compute_gradients and the fused optimizer step; the fast
    path runs train_step. With the same update kernel on both (torch's fused Adam) they agree bit for bit;
    with train_step's native update of small parameter sets (CPU) to float rounding."""
    if not small_native:
        monkeypatch.setattr(InlineAdam, "SMALL_REST", -1)

    def run(cbs):
        m = model(seed=3)
        fit(m, SoftmaxCrossEntropy(), make_optimizer("adam", lr=1e-2), data(n=96), epochs=2, batch_size=16,
            callbacks=cbs, verbose=0)
        return m.params()

    fast = run([])
    seen = []
    hooked = run([LambdaCallback(wants_grads=lambda s: True,
                                 on_gradients=lambda t, s, g, p: seen.append(s))])
    assert seen == list(range(1, 13))
    for k in fast:
        if small_native:
            torch.testing.assert_close(fast[k], hooked[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(fast[k], hooked[k]), k


def test_full_batch_is_gradient_descent_on_the_whole_set():
    x, y, _, _ = data(n=50)
    m = model(seed=1)
    ref = model(seed=1)
    fit(m, SoftmaxCrossEntropy(), make_optimizer("gd", lr=0.5), (x, y), epochs=2, batch_size="full",
        chunk_size=16, verbose=0)
    loss_fn = SoftmaxCrossEntropy()
    xf = x.float() / 255
    for _ in range(2):
        loss, dlogits = loss_fn(ref.forward(xf, train=True), y)
        ref.backward(dlogits)
        for k, p in ref.params().items():
            p -= 0.5 * ref.grads()[k]
    for k, p in m.params().items():
        torch.testing.assert_close(p, ref.params()[k], rtol=1e-5, atol=1e-6)


def test_steps_end_mid_epoch_with_a_partial_record():
    ends = []
    h = fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), data(n=64), steps=6, batch_size=16,
            callbacks=[LambdaCallback(on_epoch_end=lambda t, e, logs: ends.append(logs["partial"]))], verbose=0)
    assert h.step == [4, 6] and h.epoch == [1, 2]
    assert ends == [False, True]


def test_bf16_keeps_fp32_masters_and_learns():
    m = model(seed=2)
    ref = model(seed=2)
    x, y, xv, yv = data()
    # one step's gradients in bf16 are close to the fp32 ones
    from convdescent.train.precision import Precision
    from convdescent.train.step import compute_gradients

    xb, yb = x[:32].float() / 255, y[:32]
    _, _, g16 = compute_gradients(m, SoftmaxCrossEntropy(), xb, yb, Precision(m, "bf16"))
    g16 = {k: v.clone() for k, v in g16.items()}
    _, _, g32 = compute_gradients(ref, SoftmaxCrossEntropy(), xb, yb)
    for k in g32:
        assert g16[k].dtype == torch.float32
        rel = (g16[k] - g32[k]).norm() / g32[k].norm()
        assert rel < 0.05, (k, float(rel))
    h = fit(m, SoftmaxCrossEntropy(), make_optimizer("adam", lr=3e-3), (x, y, xv, yv), epochs=3, batch_size=16,
            precision="bf16", verbose=0)
    assert all(p.dtype == torch.float32 for p in m.params().values())
    assert h.val_acc[-1] >= 0.9


def test_early_stopping_stops_and_restores_the_best_weights():
    # lr 0 means nothing improves after the first epoch
    es = EarlyStopping("val_loss", patience=2, restore_best=True)
    snapshots = []
    cb = LambdaCallback(on_epoch_end=lambda t, e, logs: snapshots.append(
        {k: v.clone() for k, v in t.model.params().items()}))
    m = model()
    h = fit(m, SoftmaxCrossEntropy(), make_optimizer("sgd", lr=0.0), data(n=64), epochs=10, batch_size=16,
            callbacks=[cb, es], verbose=0)
    assert len(h) == 3 and es.best_epoch == 1
    assert [e["event"] for e in h.events] == ["early_stopping", "restored_best"]

    # a run that learns for an epoch, then is wrecked (weights zeroed, learning rate 0): the weights of
    # the best epoch come back at the end
    es = EarlyStopping("val_acc", patience=2, restore_best=True)
    snapshots.clear()

    class Wreck(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:
                for p in trainer.model.params().values():
                    p.zero_()
                trainer.lr_scale = 0.0

    m = model(seed=4)
    h = fit(m, SoftmaxCrossEntropy(), make_optimizer("adam", lr=3e-3), data(), epochs=6, batch_size=16,
            callbacks=[cb, es, Wreck()], verbose=0)
    assert len(h) == 3 and h.val_acc[0] > 0.5 and max(h.val_acc[1:]) < h.val_acc[0]
    assert es.best_epoch == 1
    assert [e["event"] for e in h.events] == ["early_stopping", "restored_best"]
    for k, p in m.params().items():
        assert torch.equal(p, snapshots[0][k])


def test_reduce_on_plateau_cuts_the_learning_rate():
    # a learning rate too small to change anything: the validation loss never improves by the threshold,
    # so with patience 0 the rate halves after every epoch but the first
    opt = optimizer_from_args("sgd", 1e-9, schedule="reduce_on_plateau",
                              schedule_params={"patience": 0, "factor": 0.5, "eps": 0.0}, record=False)
    h = fit(model(), SoftmaxCrossEntropy(), opt, data(n=64), epochs=4, batch_size=64, verbose=0)
    assert h.lr == pytest.approx([1e-9, 1e-9, 5e-10, 2.5e-10])


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_display_modes():
    line = re.compile(r"^Epoch 2/2 - loss \d\.\d{4} - acc \d\.\d{3} - val_loss \d\.\d{3} - val_acc \d\.\d{3} - "
                      r"lr 1\.0e-03 - \d+\.\ds$")
    for verbose, stream in (("auto", io.StringIO()), (1, io.StringIO())):
        fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), data(n=64), epochs=2, batch_size=16,
            verbose=verbose, stream=stream)
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2 and "\r" not in stream.getvalue()
        assert line.match(lines[1]), lines[1]
    tty = FakeTTY()
    fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), data(n=64), epochs=2, batch_size=16,
        verbose="auto", stream=tty)
    out = tty.getvalue()
    assert "\r" in out and "/s" in out and "<" in out and "loss" in out
    assert line.match(out.split("\n")[-2].split("\r")[-1])
    js = io.StringIO()
    fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), data(n=64), epochs=2, batch_size=16,
        verbose="json", stream=js)
    recs = [json.loads(s) for s in js.getvalue().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2] and all(r["type"] == "epoch" for r in recs)
    quiet = io.StringIO()
    fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), data(n=64), epochs=1, batch_size=16,
        verbose=0, stream=quiet)
    assert quiet.getvalue() == ""


def test_epoch_line_leaves_out_missing_validation():
    text = format_epoch_line({"epoch": 3, "loss": 0.28714, "acc": 0.8941, "val_loss": math.nan,
                              "val_acc": math.nan, "lr": 1e-3, "time": 3.21}, 10)
    assert text == "Epoch 3/10 - loss 0.2871 - acc 0.894 - lr 1.0e-03 - 3.2s"


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be a positive int, got 0"),
    ({"steps": -1}, "steps must be a positive int, got -1"),
    ({"on_nan": "ignore"}, "on_nan must be 'stop' or 'rollback', got 'ignore'"),
    ({"nan_check_every": 0}, "nan_check_every must be an int >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be a positive int or 'full', got 0"),
    ({"verbose": "loud"}, "verbose must be"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), data(n=32), **{"verbose": 0, **kwargs})


def test_bad_data_is_refused_clearly():
    with pytest.raises(ValueError, match="data must be a Dataset"):
        fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), "train.npz", verbose=0)
    x, y, _, _ = data(n=32)
    with pytest.raises(ValueError, match="x must be a uint8 tensor"):
        fit(model(), SoftmaxCrossEntropy(), make_optimizer("adam"), (x.float(), y), verbose=0)
