"""The static step behind CUDA graphs, checked on the CPU: it must train exactly as ``train_step`` does.

The recording and replay themselves need a GPU (tests/cuda/); everything they rely on is here: the step
written against fixed buffers, device-side learning rate and step count, the host-side counters, and the
reasons a step is not recorded.
"""

from __future__ import annotations

import pytest
import torch

from convdescent import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy
from convdescent.optim import cosine_decay, make_optimizer, warmup
from convdescent.optim.transforms import scale_by_adam
from convdescent.train.graphs import GraphedSteps, StaticStep, capture_blocker
from convdescent.train.precision import Precision
from convdescent.train.step import compute_gradients, train_step
from convdescent.optim import update_and_apply
from convdescent.optim.fused import InlineAdam


def _model(kind: str, seed: int = 3):
    layers = {
        "cnn": [Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(16), ReLU(), Dense(5)],
        "bn": [Conv2D(4, 3), BatchNorm2D(), ReLU(), MaxPool2D(2), Flatten(), Dense(5)],
        "dropout": [Conv2D(4, 3), ReLU(), Flatten(), Dropout(0.3), Dense(5)],
    }[kind]
    return Sequential(layers, input_shape=(2, 10, 10), seed=seed)


def _batches(n: int, batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 2, 10, 10, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


OPTIMIZERS = {
    "adam": lambda: make_optimizer("adam", lr=3e-2),
    "adamw": lambda: make_optimizer("adamw", lr=3e-2, weight_decay=0.05),
    "adam-l2": lambda: make_optimizer("adam", lr=3e-2, weight_decay=0.01),
    "amsgrad": lambda: make_optimizer("adam", lr=3e-2, amsgrad=True),
    "cosine": lambda: make_optimizer("adam", lr=warmup(cosine_decay(3e-2, 8), 3)),
}


@pytest.mark.parametrize("kind", ["cnn", "bn", "dropout"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_static_step_trains_exactly_as_train_step(kind, opt, monkeypatch):
    """Parameters, buffers, optimizer state and per-step loss/correct are bit-identical after 8 steps.

    On the CPU train_step updates small parameter sets with the native Adam kernel (equal to torch's fused
    one to rounding, checked in test_dense_inline_adam.py); here it takes torch's fused kernel, as it does on
    CUDA where steps are recorded, so that the two steps run the same kernels."""
    monkeypatch.setattr(InlineAdam, "SMALL_REST", -1)
    a, b = _model(kind), _model(kind)
    opt_a, opt_b = OPTIMIZERS[opt](), OPTIMIZERS[opt]()
    sa, sb = opt_a.init(a.params()), opt_b.init(b.params())
    assert capture_blocker(b, opt_b, sb) is None
    loss_fn = SoftmaxCrossEntropy()
    batches = _batches(8)
    static = StaticStep(b, loss_fn, opt_b, *batches[0])
    for xb, yb in batches:
        la, ca, sa = train_step(a, loss_fn, opt_a, sa, xb, yb)
        lb, cb, sb = static.run(xb, yb, sb)
        assert torch.equal(la, lb) and torch.equal(ca, cb)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k
    from convdescent.optim import state_dict as opt_state_dict

    flat_a, flat_b = opt_state_dict(sa), opt_state_dict(sb)
    assert repr(flat_a.keys()) == repr(flat_b.keys())

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        else:
            yield x

    for x, y in zip(leaves(flat_a), leaves(flat_b)):
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y)


def test_static_step_buffers_keep_their_identity():
    """A recording reads fixed addresses: the step must never replace the tensors it was built on."""
    model = _model("bn")
    opt = make_optimizer("adam", lr=1e-2)
    state = opt.init(model.params())
    batches = _batches(3)
    static = StaticStep(model, SoftmaxCrossEntropy(), opt, *batches[0])
    ids = (id(static.x), id(static.y), id(static.lr), id(static.count), id(static.loss), id(static.correct))
    params = {k: id(v) for k, v in model.params().items()}
    buffers = {k: id(v) for k, v in model.buffers().items()}
    moments = [id(t) for t in state[0].mu.values()] + [id(t) for t in state[0].nu.values()]
    for xb, yb in batches:
        _, _, state = static.run(xb, yb, state)
    assert ids == (id(static.x), id(static.y), id(static.lr), id(static.count), id(static.loss), id(static.correct))
    assert params == {k: id(v) for k, v in model.params().items()}
    assert buffers == {k: id(v) for k, v in model.buffers().items()}
    assert moments == [id(t) for t in state[0].mu.values()] + [id(t) for t in state[0].nu.values()]
    assert state[0].count == 3 and state[1].count == 3


def test_static_step_bf16_matches_the_trainer_path():
    """With bf16 compute the static step equals compute_gradients + update_and_apply (what the Trainer runs)."""
    a, b = _model("cnn"), _model("cnn")
    opt = make_optimizer("adam", lr=1e-2)
    sa, sb = opt.init(a.params()), opt.init(b.params())
    pa, pb = Precision(a, "bf16"), Precision(b, "bf16")
    loss_fn = SoftmaxCrossEntropy()
    batches = _batches(5)
    static = StaticStep(b, loss_fn, opt, *batches[0], precision=pb)
    for xb, yb in batches:
        la, _, grads = compute_gradients(a, loss_fn, xb, yb, pa)
        sa = update_and_apply(opt, a.params(), grads, sa)
        lb, _, sb = static.run(xb, yb, sb)
        assert torch.equal(la.float(), lb)
    for k in a.params():
        assert torch.equal(a.params()[k], b.params()[k]), k


@pytest.mark.parametrize("opt,needle", [
    (lambda: make_optimizer("sgd", lr=0.1, momentum=0.9), "no fused step"),
    (lambda: make_optimizer("rmsprop", lr=0.01), "no fused step"),
    (lambda: make_optimizer("adam", lr=1e-3, clip_norm=1.0), "no fused step"),
    (lambda: make_optimizer("adam", lr=1e-3, betas=(lambda step: 0.9, 0.999)), "scheduled Adam b1"),
])
def test_capture_blocker_names_what_cannot_be_recorded(opt, needle):
    model = _model("cnn")
    o = opt()
    assert needle in capture_blocker(model, o, o.init(model.params()))


def test_graphed_steps_on_cpu_are_the_eager_steps():
    """Off CUDA nothing is recorded; every step is train_step's, and no notice is printed for it."""
    a, b = _model("cnn"), _model("cnn")
    opt = make_optimizer("adam", lr=1e-2)
    sa, sb = opt.init(a.params()), opt.init(b.params())
    told = []
    runner = GraphedSteps(b, SoftmaxCrossEntropy(), opt, notice=told.append)
    for xb, yb in _batches(4):
        la, _, sa = train_step(a, SoftmaxCrossEntropy(), opt, sa, xb, yb)
        lb, _, sb = runner.step(xb, yb, sb)
        assert torch.equal(la, lb)
    assert runner.replays == 0 and runner.eager_steps == 4 and runner.recordings == 0
    assert told == []


def test_schedule_value_reaches_the_device_scalar():
    """The learning rate filled before each step is the schedule's value for that step."""
    sched = warmup(cosine_decay(0.1, 10), 4)
    model = _model("cnn")
    opt = make_optimizer("adam", lr=sched)
    state = opt.init(model.params())
    static = StaticStep(model, SoftmaxCrossEntropy(), opt, *_batches(1)[0])
    seen = []
    for xb, yb in _batches(6):
        static.prepare(xb, yb, state)
        seen.append((float(static.lr), float(static.count)))
        static.body()
        state = static.finish(state)
    assert [c for _, c in seen] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [lr for lr, _ in seen] == pytest.approx([float(sched(i)) for i in range(6)], rel=1e-12)


def test_plain_adam_transform_is_not_mistaken_for_a_fused_chain():
    """A bare scale_by_adam (no learning rate in the chain) has no fused step to record."""
    model = _model("cnn")
    tx = scale_by_adam()
    assert "no fused step" in capture_blocker(model, tx, tx.init(model.params()))
