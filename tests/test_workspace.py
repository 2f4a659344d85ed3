"""The training step's reused buffers (convdescent/workspace.py): same numbers, and nothing a caller keeps
is overwritten."""

from __future__ import annotations

import contextlib

import pytest
import torch

from convdescent import SoftmaxCrossEntropy, workspace
from convdescent.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from convdescent.model import Sequential
from convdescent.models import make_model
from convdescent.optim import make_optimizer
from convdescent.train.step import train_step


def _batches(shape, n_batches=4, batch=12, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *shape), generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(n_batches)]


def _train(model, batches, optimizer="adam"):
    opt = make_optimizer(optimizer, lr=1e-2)
    state = opt.init(model.params())
    losses = []
    for xb, yb in batches:
        loss, _, state = train_step(model, SoftmaxCrossEntropy(), opt, state, xb, yb)
        losses.append(loss.clone())
    return losses


def _build(name, shape, seed):
    if name == "pooled-then-conv":  # a fused conv-pool inside the chunked stage (the conv after it is not fused)
        return Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Conv2D(6, 3), ReLU(), Flatten(), Dense(10)],
                          input_shape=shape, seed=seed)
    return make_model(name, input_shape=shape, seed=seed)


# the architectures whose nodes ask for buffers (fused conv-pool with and without dL/dx, native Dense), the
# settings that change the plan (fusion off, a chunked stage, both), and architectures whose nodes take none
# (residual blocks with plans inside, depthwise convs, attention), which must run the same with reuse on;
# the last field: whether the step is expected to hold buffers
CASES = [("seed_cnn", (1, 28, 28), {}, True), ("seed_cnn", (1, 28, 28), {"fusion": False}, True),
         ("seed_cnn", (1, 28, 28), {"fusion": False, "chunk_size": 5}, True),
         ("2c2d", (1, 28, 28), {}, True), ("2c2d", (1, 28, 28), {"chunk_size": 5}, True),
         # the fused conv-pool runs in the chunked stage, which must not reuse (its chunks' caches coexist)
         ("seed_cnn_bn", (1, 28, 28), {}, True), ("pooled-then-conv", (1, 16, 16), {"chunk_size": 5}, False),
         ("resnet8", (1, 16, 16), {}, False), ("mobilenet_tiny", (1, 16, 16), {}, False),
         ("vit_tiny", (1, 28, 28), {}, False)]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("name,shape,settings,holds", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in s.items()) or 'default'}" for n, _, s, _ in CASES])
def test_reused_buffers_give_the_numbers_of_fresh_memory(name, shape, settings, holds, optimizer, monkeypatch):
    """Bit for bit: the same kernels run on the same values, only the memory they write differs."""
    batches = _batches(shape)
    runs = []
    for reuse in (True, False):
        model = _build(name, shape, seed=3)
        if "fusion" in settings:
            model.set_fusion(settings["fusion"])
        if "chunk_size" in settings:
            model.chunk_size = settings["chunk_size"]
        if not reuse:
            monkeypatch.setattr(Sequential, "step_buffers", lambda self: contextlib.nullcontext())
        losses = _train(model, batches, optimizer)
        monkeypatch.undo()
        runs.append((losses, model.params(), model._workspace))
    (la, pa, ws), (lb, pb, ws_off) = runs
    assert len(ws_off) == 0
    assert (len(ws) > 0) == holds, f"{len(ws)} buffers held"
    for a, b in zip(la, lb):
        assert torch.equal(a, b)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_buffers_are_reused_from_step_to_step_and_dropped_with_the_plan():
    model = make_model("seed_cnn", input_shape=(1, 28, 28), seed=0)
    batches = _batches((1, 28, 28), n_batches=3, batch=32)
    _train(model, batches[:1])
    ws = model._workspace
    held = {k: t.data_ptr() for k, t in ws._tensors.items()}
    # the pooled map, the winners, Dense's output and partial sums, dL/dx of dense1, its gradient blocks
    assert len(held) >= 5 and ws.nbytes() > 32 * 32 * 13 * 13 * 4
    _train(model, batches[1:])
    assert {k: t.data_ptr() for k, t in ws._tensors.items()} == held
    handle = model.register_hook("after_backward", lambda *a: None)  # a new plan
    model.plan()
    assert len(ws) == 0
    handle.remove()


def _native_head(hidden: bool = True):
    """A model whose last node is a native Dense (256 x 300 weight, above Dense.NATIVE_MIN_WEIGHT), which
    takes its output from the workspace when it is not the model's last node; ``hidden``: a native Dense
    before it too."""
    layers = [Flatten(), Dense(300), ReLU()] if hidden else [Flatten()]
    model = Sequential(layers + [Dense(300)], input_shape=(1, 16, 16), seed=0)
    x = torch.zeros(2, 256)
    assert all(layer._native("cd_dense_fwd", x) is not None for layer in model.layers if isinstance(layer, Dense)), \
        "the test needs Dense's native path"
    return model


def test_what_the_step_hands_out_survives_the_next_step():
    """The logits loss_fn is given (a loss may keep them, e.g. for a confusion matrix), the loss and the count
    of correct predictions train_step returns: none is a reused buffer, so step 1's still hold after step 2."""
    for hidden in (True, False):
        model = _native_head(hidden)
        kept = []

        def keeping_loss(logits, y, **kw):
            kept.append((logits, logits.clone()))
            return SoftmaxCrossEntropy()(logits, y, **kw)

        opt = make_optimizer("adam", lr=1e-2)
        state = opt.init(model.params())
        returned = []
        for xb, yb in _batches((1, 16, 16), n_batches=3, batch=8, classes=300):
            loss, correct, state = train_step(model, keeping_loss, opt, state, xb, yb)
            returned.append(((loss, loss.clone()), (correct, correct.clone())))
        assert len(model._workspace) > 0  # reuse was on: the hidden Dense's buffers, the Adam kernel's blocks
        for out, copy in kept + [pair for step in returned for pair in step]:
            assert torch.equal(out, copy)
        assert len({out.data_ptr() for out, _ in kept}) == len(kept)


def test_outside_the_training_step_every_forward_gets_fresh_memory():
    """A user's forward calls (and evaluation) keep their outputs: no buffer is shared between calls."""
    model = _native_head()
    _train(model, _batches((1, 16, 16), n_batches=1, batch=8, classes=300))
    (x1, _), (x2, _) = _batches((1, 16, 16), n_batches=2, batch=8, seed=5)
    y1 = model.forward(x1, train=True)
    kept = y1.clone()
    model.forward(x2, train=True)
    assert torch.equal(y1, kept)
    inner = []
    handle = model.register_hook("after_forward", lambda name, layer, out: inner.append(out), layer="dense1",
                                 split=False)  # the hidden Dense, whose output would be a buffer in a step
    model.forward(x1)
    model.forward(x2)
    handle.remove()
    assert inner[0].data_ptr() != inner[1].data_ptr()


def test_a_forward_hook_that_keeps_activations_turns_reuse_off():
    """A hook may keep what it is shown past the step: with one registered, train_step takes fresh memory,
    so what the hook kept at step 1 still holds step 1's values after step 2."""
    model = make_model("seed_cnn", input_shape=(1, 28, 28), seed=0)
    kept = []
    model.register_hook("after_forward", lambda name, layer, out: kept.append((out, out.clone())), layer="dense1")
    _train(model, _batches((1, 28, 28), n_batches=3, batch=8))
    assert len(kept) == 3
    for out, copy in kept:
        assert torch.equal(out, copy)
    assert len(model._workspace) == 0


def test_workspace_nesting_and_suspension():
    owner = object()
    outer, inner = workspace.Workspace(), workspace.Workspace()
    assert workspace.active() is None
    fresh = [workspace.empty(owner, "a", (3,), torch.float32) for _ in range(2)]
    assert fresh[0].data_ptr() != fresh[1].data_ptr()
    with outer:
        a = workspace.empty(owner, "a", (3,), torch.float32)
        assert workspace.empty(owner, "a", (3,), torch.float32) is a
        assert workspace.empty(owner, "a", (4,), torch.float32).shape == (4,)  # another shape: a new buffer
        assert workspace.empty(owner, "a", (4,), torch.float64).dtype == torch.float64
        with inner:
            assert workspace.active() is inner
            assert workspace.empty(owner, "a", (3,), torch.float32) is not a
        assert workspace.active() is outer
        with workspace.suspended():
            assert workspace.active() is None
            assert workspace.empty(owner, "b", (2,), torch.float32) is not workspace.empty(owner, "b", (2,),
                                                                                          torch.float32)
        assert workspace.active() is outer
    assert workspace.active() is None
    assert len(outer) == 1 and len(inner) == 1


def test_threads_entering_one_workspace_in_any_order_each_get_their_own_back():
    """The active workspace and what it replaced are per thread: thread A enters ``shared``, thread B (with
    its own ``other`` active) enters ``shared`` too, A leaves first; A is then back to none and B to
    ``other``, whatever the order of exits."""
    import threading

    shared, other = workspace.Workspace(), workspace.Workspace()
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with shared:
            a_entered.set()
            b_entered.wait(5)
        seen["a"] = workspace.active()
        a_left.set()

    def thread_b():
        with other:
            a_entered.wait(5)
            with shared:
                b_entered.set()
                a_left.wait(5)
                seen["b inside"] = workspace.active()
            seen["b"] = workspace.active()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": None, "b inside": shared, "b": other}
