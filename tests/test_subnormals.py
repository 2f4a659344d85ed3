"""Subnormal floats in the training step: flushed to zero inside it, the caller's setting untouched outside.

On Fashion-MNIST, Adam's first moments of the first Dense weights whose inputs are zero for every image
decay by beta1 each step once their gradient stops, and reach the subnormal range (below 1.2e-38) after
about 600 steps with beta1 = 0.9, where arithmetic on them is many times slower (docs/performance.md).
The test below counts subnormals directly in every tensor the step keeps, with beta1 = 0.5 so that the
same decay gets there in about 120 steps instead of 600.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from convdescent import SoftmaxCrossEntropy, native, seed_cnn
from convdescent.data import BatchLoader, Normalizer, load_dataset
from convdescent.optim import make_optimizer
from convdescent.train.step import compute_gradients, train_step

TINY32 = torch.finfo(torch.float32).tiny


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", val_split=0, seed=0)


def _subnormals(obj) -> int:
    """Subnormal values in every floating tensor inside ``obj`` (tensors, dicts, tuples, layer caches)."""
    if torch.is_tensor(obj):
        if not obj.is_floating_point():
            return 0
        return int(((obj != 0) & (obj.abs() < torch.finfo(obj.dtype).tiny)).sum())
    if isinstance(obj, dict):
        return sum(_subnormals(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_subnormals(v) for v in obj)
    return 0


def _train(data, steps: int, flush: bool) -> list[int]:
    """Subnormals held by the model, its gradients, the optimizer state and the layers' caches, every 20
    steps of Adam(1e-3, beta1=0.5) at batch 32 on real data."""
    previous = native.set_subnormal_flushing(flush)
    try:
        model = seed_cnn(input_shape=data.input_shape, num_classes=data.num_classes, seed=0)
        opt = make_optimizer("adam", lr=1e-3, betas=(0.5, 0.999))
        state = opt.init(model.params())
        loss_fn = SoftmaxCrossEntropy()
        loader = BatchLoader(data.x_train, data.y_train, 32, shuffle=True, seed=0, normalizer=Normalizer.unit())
        counts = []
        for step, (xb, yb) in enumerate(loader, 1):
            _, _, state = train_step(model, loss_fn, opt, state, xb, yb)
            if step % 20 == 0:
                counts.append(_subnormals([model.params(), model.grads(), state,
                                           [getattr(layer, "_cache", None) for layer in model.layers]]))
            if step == steps:
                return counts
    finally:
        native.set_subnormal_flushing(previous)
    raise AssertionError("the training set ran out")


def test_the_step_keeps_no_subnormal_values_on_real_data(fashion):
    assert native.library() is not None, native.status()
    flushed = _train(fashion, 180, flush=True)
    plain = _train(fashion, 180, flush=False)
    # without flushing, the decaying moments do go subnormal (what slowed the step 3x) ...
    assert max(plain) > 1000, plain
    # ... and with it not one value anywhere in the step's state is, at any point
    assert flushed == [0] * len(flushed), flushed


def test_the_callers_setting_is_restored_on_every_thread(fashion):
    assert native.library() is not None, native.status()
    model = seed_cnn(input_shape=fashion.input_shape, num_classes=fashion.num_classes, seed=0)
    opt = make_optimizer("adam", lr=1e-3)
    xb = fashion.x_train[:32].float().div(255)
    yb = fashion.y_train[:32]
    loss_fn = SoftmaxCrossEntropy()
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = native.flush_state()
        assert before == [False, False] and not native.flushes_here()
        seen = []

        def looking(logits, y, **kw):  # a loss that looks at the threads from inside the step
            seen.append((native.flush_state(), native.flushes_here()))
            return loss_fn(logits, y, **kw)

        train_step(model, looking, opt, opt.init(model.params()), xb, yb)
        assert seen == [([True, True], True)]
        assert native.flush_state() == before and not native.flushes_here()
        compute_gradients(model, looking, xb, yb)
        assert seen[-1] == ([True, True], True)
        assert native.flush_state() == before and not native.flushes_here()

        # a caller who flushes on its own thread keeps that (and only that) after the step
        torch.set_flush_denormal(True)
        try:
            mine = native.flush_state()
            assert mine[0] and native.flushes_here()
            train_step(model, loss_fn, opt, opt.init(model.params()), xb, yb)
            assert native.flush_state() == mine and native.flushes_here()
        finally:
            torch.set_flush_denormal(False)

        # an exception inside the step restores the setting too
        def broken(logits, y, **kw):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            train_step(model, broken, opt, opt.init(model.params()), xb, yb)
        assert native.flush_state() == before and not native.flushes_here()
    finally:
        torch.set_num_threads(old)


def test_nested_scopes_restore_once():
    assert native.library() is not None, native.status()
    with native.flush_subnormals:
        with native.flush_subnormals:
            assert native.flushes_here()
        assert native.flushes_here()  # the inner exit leaves the outer scope flushing
    assert not native.flushes_here()


def test_without_the_kernels_the_calling_thread_still_flushes(monkeypatch):
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_TRIED", True)
    assert native.flush_state() is None
    with native.flush_subnormals:
        assert native.flushes_here()
        assert torch.tensor([TINY32 / 8]).mul(3.0).item() == 0.0
    assert not native.flushes_here()
    assert torch.tensor([TINY32 / 8]).mul(3.0).item() != 0.0


def test_flushing_can_be_turned_off():
    previous = native.set_subnormal_flushing(False)
    try:
        with native.flush_subnormals:
            assert not native.flushes_here()
    finally:
        native.set_subnormal_flushing(previous)
    code = "from convdescent import native; print(native.subnormal_flushing())"
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, CONVDESCENT_FLUSH_SUBNORMALS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
