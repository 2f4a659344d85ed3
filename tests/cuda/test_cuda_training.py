"""The training step on a GPU: CUDA-graph replay against the eager step, checkpoints across devices, and a run."""

from __future__ import annotations

import pytest
import torch

from convdescent import (BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Sequential,
                         SoftmaxCrossEntropy)
from convdescent.optim import cosine_decay, make_optimizer, warmup
from convdescent.train.graphs import GraphedSteps, StaticStep
from convdescent.train.step import train_step

CUDA = torch.device("cuda")


def _model(kind="cnn", seed=3):
    layers = {
        "cnn": [Conv2D(8, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(32), ReLU(), Dense(5)],
        "bn": [Conv2D(8, 3), BatchNorm2D(), ReLU(), MaxPool2D(2), Flatten(), Dense(5)],
        "dropout": [Conv2D(8, 3), ReLU(), Flatten(), Dropout(0.3), Dense(5)],
    }[kind]
    return Sequential(layers, input_shape=(1, 12, 12), seed=seed).to(device=CUDA)


def _batches(n, batch=16, seed=0, last=None):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.rand(batch, 1, 12, 12, generator=g).to(CUDA), torch.randint(0, 5, (batch,), generator=g).to(CUDA))
           for _ in range(n)]
    if last is not None:
        out.append((torch.rand(last, 1, 12, 12, generator=g).to(CUDA), torch.randint(0, 5, (last,), generator=g).to(CUDA)))
    return out


OPTIMIZERS = {
    "adam": lambda: make_optimizer("adam", lr=1e-2),
    "adamw": lambda: make_optimizer("adamw", lr=1e-2, weight_decay=0.05),
    "cosine": lambda: make_optimizer("adam", lr=warmup(cosine_decay(1e-2, 20), 5)),
}


@pytest.mark.parametrize("kind", ["cnn", "bn"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_graph_replay_equals_the_eager_static_step(kind, opt):
    """Replays of the recording give bit-identical weights, buffers and losses to running the same static step
    eagerly, and agree with train_step to float32 rounding (its learning rate is a double, the graph's a float)."""
    a, b, c = _model(kind), _model(kind), _model(kind)
    oa, ob, oc = OPTIMIZERS[opt](), OPTIMIZERS[opt](), OPTIMIZERS[opt]()
    sa, sb, sc = oa.init(a.params()), ob.init(b.params()), oc.init(c.params())
    loss_fn = SoftmaxCrossEntropy()
    batches = _batches(20)
    static = StaticStep(a, loss_fn, oa, *batches[0])
    runner = GraphedSteps(b, loss_fn, ob, warmup=3)
    for xb, yb in batches:
        la, _, sa = static.run(xb, yb, sa)
        la = la.clone()
        lb, _, sb = runner.step(xb, yb, sb)
        lc, _, sc = train_step(c, loss_fn, oc, sc, xb, yb)
        assert torch.equal(la, lb)
        torch.testing.assert_close(lb, lc, rtol=1e-4, atol=1e-5)
    assert runner.recordings == 1 and runner.replays == 17 and runner.eager_steps == 3
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
        torch.testing.assert_close(v, c.state_dict()[k], rtol=1e-3, atol=1e-5)
    assert sb[0].count == 20


def test_bf16_graph_replay_equals_the_eager_static_step():
    from convdescent.train.precision import Precision

    a, b = _model("bn"), _model("bn")
    opt = make_optimizer("adam", lr=1e-2)
    sa, sb = opt.init(a.params()), opt.init(b.params())
    loss_fn = SoftmaxCrossEntropy()
    batches = _batches(10)
    static = StaticStep(a, loss_fn, opt, *batches[0], precision=Precision(a, "bf16"))
    runner = GraphedSteps(b, loss_fn, opt, Precision(b, "bf16"), warmup=2)
    for xb, yb in batches:
        la, _, sa = static.run(xb, yb, sa)
        la = la.clone()
        lb, _, sb = runner.step(xb, yb, sb)
        assert torch.equal(la, lb)
    assert runner.replays == 8
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_partial_batch_runs_eagerly_and_says_so_once():
    model = _model()
    opt = make_optimizer("adam", lr=1e-2)
    state = opt.init(model.params())
    told = []
    runner = GraphedSteps(model, SoftmaxCrossEntropy(), opt, warmup=2, notice=told.append)
    for _ in range(2):  # two epochs, each ending in a smaller batch
        for xb, yb in _batches(6, last=5):
            _, _, state = runner.step(xb, yb, state)
    assert runner.recordings == 1 and runner.replays == 10 and runner.eager_steps == 2 + 2
    assert len(told) == 1 and "(5, 1, 12, 12)" in told[0]
    assert state[0].count == 14


def test_replaced_state_is_recorded_again():
    """Loading new tensors into the optimizer state (a restore) invalidates the recording."""
    from convdescent import optim

    model = _model()
    opt = make_optimizer("adam", lr=1e-2)
    state = opt.init(model.params())
    runner = GraphedSteps(model, SoftmaxCrossEntropy(), opt, warmup=1)
    batches = _batches(6)
    for xb, yb in batches[:3]:
        _, _, state = runner.step(xb, yb, state)
    state = optim.load_state_dict(opt.init(model.params()), optim.state_dict(state))
    for xb, yb in batches[3:]:
        _, _, state = runner.step(xb, yb, state)
    assert runner.recordings == 2


def test_dropout_masks_change_between_replays():
    model = _model("dropout")
    opt = make_optimizer("adam", lr=1e-3)
    state = opt.init(model.params())
    runner = GraphedSteps(model, SoftmaxCrossEntropy(), opt, warmup=1)
    if getattr(torch.cuda.CUDAGraph, "register_generator_state", None) is None:
        pytest.fail("this torch cannot register generators with CUDA graphs (torch >= 2.4 needed)")
    drop = [layer for _, layer in model.all_layers() if isinstance(layer, Dropout)][0]
    xb, yb = _batches(1)[0]
    masks = []
    for _ in range(4):
        _, _, state = runner.step(xb, yb, state)
        masks.append(drop._cache[0].clone() if drop._cache and drop._cache[0] is not None else None)
    assert runner.replays == 3
    assert masks[2] is not None and masks[3] is not None and not torch.equal(masks[2], masks[3])


def test_fit_on_cuda_learns_with_graphs(bands_npz):
    from convdescent.data import load_dataset
    from convdescent.train import fit

    data = load_dataset(bands_npz, val_split=0.1, seed=0)
    model = Sequential([Conv2D(8, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(4)], input_shape=data.input_shape, seed=0)
    history = fit(model, SoftmaxCrossEntropy(), make_optimizer("adam", lr=1e-2), data, epochs=4, batch_size=16,
                  device="cuda", verbose=0)
    assert history.final["val_acc"] >= 0.9
    assert next(iter(model.params().values())).device.type == "cuda"


def test_checkpoints_move_between_cpu_and_gpu(tmp_path, bands_npz):
    """A run trained on the GPU loads and evaluates on the CPU with the same accuracy, and the reverse; a CPU
    run resumes on the GPU."""
    from convdescent.data import load_dataset
    from convdescent.train import load_run, train_from_config
    from convdescent.train.step import evaluate

    base = {"model": "seed_cnn", "dataset": bands_npz, "epochs": 1, "batch_size": 16}
    gpu = train_from_config({**base, "device": "cuda", "name": "gpu"}, out=str(tmp_path), display="none")
    cpu = train_from_config({**base, "device": "cpu", "name": "cpu"}, out=str(tmp_path), display="none")
    data = load_dataset(bands_npz, val_split=0)
    loss = SoftmaxCrossEntropy()
    for result in (gpu, cpu):
        accs = []
        for device in ("cpu", "cuda"):
            run = load_run(result.run_dir, device=device)
            assert next(iter(run.model.params().values())).device.type == device
            accs.append(evaluate(run.model, loss, data.x_test.to(device), data.y_test.to(device),
                                 normalizer=run.normalizer)[1])
        assert abs(accs[0] - accs[1]) <= 1e-6
    resumed = train_from_config({"epochs": 2, "device": "cuda"}, resume=cpu.run_dir, display="none")
    assert len(resumed.history) == 2
