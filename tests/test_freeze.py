"""Frozen layers: their backward computes only dL/dx, the plan stops the backward before them, batch norm
normalizes with its running statistics, and the optimizer leaves their parameters alone."""

from __future__ import annotations

import pytest
import torch

from convdescent.cli import main as convdescent_main
from convdescent.layers import BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU
from convdescent.layers.norm import _BatchNorm
from convdescent.losses import SoftmaxCrossEntropy
from convdescent.model import Sequential
from convdescent.models import make_model
from convdescent.optim import make_optimizer
from convdescent.optim.masked import freeze as freeze_optimizer
from convdescent.train.step import train_step

pytestmark = pytest.mark.usefixtures("one_thread")

# model, input shape, what to freeze
CASES = [
    ("resnet8", (1, 12, 12), "conv1,bn1,residual1"),
    ("resnet8", (1, 12, 12), "residual2.conv1,residual2.projection,bn1"),  # inside a block, a trainable stem
    ("mobilenet_tiny", (1, 12, 12), "conv1,bn1,conv2,bn2,conv3"),
    ("vit_tiny", (1, 8, 8), "patch1,pos1,residual1"),
    ("vit_tiny", (1, 8, 8), "residual3.attention1,residual4.ln1,residual5.attention1.out_proj"),
]


def _batch(shape, n=6, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, *shape), generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def _model(name, shape, fusion=True):
    model = make_model(name, shape, 10, seed=3, dtype=torch.float64)
    model.set_fusion(fusion)
    return model


def _torch_twin(model, frozen):
    """The model in torch.nn with the frozen parameters' requires_grad off and frozen batch norms in eval()."""
    net = model.to_torch().double()
    net.train()
    params = dict(net.named_parameters())
    assert set(params) == set(model.params())  # the names match, so the comparison below is by name
    for name in frozen:
        params[name].requires_grad_(False)
    for name, layer in model.all_layers():
        if isinstance(layer, _BatchNorm) and not layer.trainable:
            net.get_submodule(name).eval()
    return net


@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("name,shape,patterns", CASES)
def test_trainable_gradients_match_autograd_with_frozen_layers(name, shape, patterns, fusion):
    model = _model(name, shape, fusion)
    frozen = model.freeze(patterns)
    assert frozen and model.frozen_layers()
    net = _torch_twin(model, frozen)
    x, y = _batch(shape)
    loss_fn = SoftmaxCrossEntropy()
    with torch.no_grad():
        logits = model.forward(x, train=True)
        _, dlogits = loss_fn(logits, y)
        assert model.backward(dlogits) is None
    with torch.enable_grad():
        out = net(x)
        torch.nn.functional.cross_entropy(out, y).backward()
    torch.testing.assert_close(logits, out.detach(), rtol=1e-10, atol=1e-12)
    torch_grads = {n: p.grad for n, p in net.named_parameters()}
    for key, g in model.grads().items():
        if key in frozen:
            assert torch_grads[key] is None
            assert not g.any(), f"{key} is frozen and reports a non-zero gradient"
        else:
            torch.testing.assert_close(g, torch_grads[key], rtol=1e-9, atol=1e-11, msg=key)


def _fused_middle_model(seed=0):
    """A trainable conv, then a conv + ReLU + max-pool the plan fuses into one node, then a dense head."""
    return Sequential([Conv2D(3, 3, padding=1), ReLU(), Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(5)],
                      input_shape=(1, 10, 10), seed=seed, dtype=torch.float64)


@pytest.mark.parametrize("fusion", [True, False])
def test_a_frozen_conv_inside_a_fused_node_passes_the_gradient_on(fusion):
    model = _fused_middle_model()
    model.set_fusion(fusion)
    frozen = model.freeze("conv2")
    described = str(model.plan())
    if fusion:
        assert "conv2+relu2+pool1: fused native pass" in described or "not fused" not in described
    net = _torch_twin(model, frozen)
    x, y = _batch((1, 10, 10), classes=5)
    with torch.no_grad():
        _, d = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
        model.backward(d)
    with torch.enable_grad():
        torch.nn.functional.cross_entropy(net(x), y).backward()
    for key, p in net.named_parameters():
        if key in frozen:
            assert not model.grads()[key].any()
        else:
            torch.testing.assert_close(model.grads()[key], p.grad, rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize("chunk", [0, 4])
def test_frozen_layers_in_the_chunked_stage(chunk):
    """The backward's stop inside the chunked stage: the chunks run back to the first trainable conv only."""
    model = Sequential([Conv2D(6, 3, padding=1), ReLU(), Conv2D(5, 3), ReLU(), Flatten(), Dense(4)],
                       input_shape=(2, 8, 8), seed=1, dtype=torch.float64)
    model.chunk_size = chunk
    frozen = model.freeze("conv1")
    if chunk:
        assert "[chunked]" in str(model.plan())
    net = _torch_twin(model, frozen)
    x, y = _batch((2, 8, 8), n=10, classes=4)
    with torch.no_grad():
        _, d = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
        model.backward(d)
    with torch.enable_grad():
        torch.nn.functional.cross_entropy(net(x), y).backward()
    for key, p in net.named_parameters():
        if key not in frozen:
            torch.testing.assert_close(model.grads()[key], p.grad, rtol=1e-9, atol=1e-11, msg=key)


def _layer(model, qualified):
    return dict(model.all_layers())[qualified]


def _count_backwards(model, monkeypatch):
    """Count each layer's backward calls (every layer, nested ones included)."""
    calls: dict[str, int] = {name: 0 for name, _ in model.all_layers()}
    for name, layer in model.all_layers():
        original = layer.backward

        def counted(dy, _name=name, _original=original):
            calls[_name] += 1
            return _original(dy)

        monkeypatch.setattr(layer, "backward", counted)
    return calls


def _frozen_grad_tensors(model):
    """The zero tensors a frozen layer reports: a backward that wrote dL/dparams would replace them."""
    return {f"{name}.{key}": g for name, layer in model.all_layers() if not layer.trainable
            for key, g in layer.param_grads().items()}


def test_backward_stops_at_the_first_trainable_layer(monkeypatch):
    model = _model("resnet8", (1, 12, 12))
    model.freeze("conv1,bn1,residual1")
    calls = _count_backwards(model, monkeypatch)
    x, y = _batch((1, 12, 12))
    needs = {}
    block, first = _layer(model, "residual2"), _layer(model, "residual2.conv1")
    original = first.backward

    def spy(dy):  # the first trainable conv is asked for no dL/dx
        needs["residual2"], needs["residual2.conv1"] = block.needs_input_grad, first.needs_input_grad
        return original(dy)

    monkeypatch.setattr(first, "backward", spy)
    with torch.no_grad():
        _, d = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
        assert model.backward(d) is None
    skipped = [n for n in calls if n.split(".")[0] in ("conv1", "bn1", "relu1", "residual1", "relu2")]
    assert skipped and all(calls[n] == 0 for n in skipped), {n: calls[n] for n in skipped}
    ran = [n for n in calls if n.startswith(("residual2.", "residual3.", "dense")) and n != "residual2.conv1"]
    assert ran and all(calls[n] == 1 for n in ran), {n: calls[n] for n in ran}
    assert needs == {"residual2": False, "residual2.conv1": False}
    assert block.needs_input_grad is True  # restored after the backward
    described = str(model.plan())
    assert "backward stops at residual2" in described
    assert "conv1: layer (Conv2D), frozen (dL/dx only)" in described
    # dL/dinput, when asked for, still flows through the frozen layers
    model.set_input_grad(True)
    with torch.no_grad():
        _, d = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
        dx = model.backward(d)
    assert dx is not None and dx.shape == x.shape and calls["conv1"] == 1


@pytest.mark.parametrize("name,shape,patterns", CASES + [("seed_cnn_bn", (1, 10, 10), "dense1,bn2")])
def test_frozen_layers_write_no_parameter_gradients(name, shape, patterns):
    model = _model(name, shape)
    model.freeze(patterns)
    model.set_input_grad(True)  # every frozen layer runs its backward (for dL/dx)
    zeros = _frozen_grad_tensors(model)
    assert zeros
    x, y = _batch(shape)
    with torch.no_grad():
        _, d = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
        model.backward(d)
    after = _frozen_grad_tensors(model)
    for key, g in zeros.items():
        assert after[key] is g and not g.any(), f"the backward wrote a gradient for frozen {key}"


def test_frozen_batch_norm_uses_and_keeps_its_running_statistics():
    model = _model("resnet8", (1, 12, 12))
    bn = _layer(model, "bn1")
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.freeze("bn1")
    stats = {k: v.clone() for k, v in model.buffers().items() if k.startswith("bn1.")}
    x, _ = _batch((1, 12, 12))
    h = _layer(model, "conv1").forward(x, train=True)
    out_train = bn.forward(h, train=True)
    out_eval = bn.forward(h, train=False)
    torch.testing.assert_close(out_train, out_eval, rtol=0, atol=0)
    opt = freeze_optimizer(make_optimizer("adam", lr=1e-2), model.select_params("bn1"))
    state = opt.init(model.params())
    for _ in range(3):
        train_step(model, SoftmaxCrossEntropy(), opt, state, x, _batch((1, 12, 12))[1])
    for k, v in model.buffers().items():
        if k.startswith("bn1."):
            assert torch.equal(v, stats[k]), k
    assert not torch.equal(model.buffers()["residual1.bn1.running_mean"], torch.zeros(16, dtype=torch.float64))


def test_after_backward_hooks_see_every_parameter_once_frozen_ones_as_zeros():
    model = _model("resnet8", (1, 12, 12))
    frozen = model.freeze("conv1,bn1,residual1")
    seen: dict[str, int] = {}

    def hook(name, layer, grads):
        for key, g in grads.items():
            seen[key] = seen.get(key, 0) + 1
            if key in frozen:
                assert not g.any()

    model.register_hook("after_backward", hook)
    x, y = _batch((1, 12, 12))
    with torch.no_grad():
        _, d = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
        model.backward(d)
    assert seen == {k: 1 for k in model.params()}


def test_thawing_restores_full_backward():
    model = _model("mobilenet_tiny", (1, 12, 12))
    ref = _model("mobilenet_tiny", (1, 12, 12))
    model.freeze("conv1,bn1")
    x, y = _batch((1, 12, 12))
    with torch.no_grad():
        _, d = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
        model.backward(d)
    model.unfreeze()
    assert "frozen" not in str(model.plan()) and not model.frozen_layers()
    grads = []
    for m in (model, ref):
        with torch.no_grad():
            _, d = SoftmaxCrossEntropy()(m.forward(x, train=True), y)
            m.backward(d)
        grads.append(m.grads())
    for key in grads[1]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", [("adamw", "0.1"), ("sgd", "0.05")])
def test_cli_freeze_keeps_weights_and_statistics_with_weight_decay(tmp_path, bands_npz, optimizer, capsys):
    from convdescent.train.run import load_run

    name, wd = optimizer
    extra = ["--momentum", "0.9"] if name == "sgd" else []
    args = ["train", "--model", "resnet8", "--dataset", bands_npz, "--steps", "4",
            "--batch-size", "16", "--val-split", "0", "--log-every", "0", "--no-report", "--quiet",
            "--optimizer", name, "--weight-decay", wd, "--lr", "0.01", "--freeze", "conv1,bn1,residual1",
            "--checkpoint-every", "0", "--out", str(tmp_path / "runs"), *extra]
    assert convdescent_main(args) == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()
    trained = load_run(run, "last").model
    start = make_model("resnet8", trained.input_shape, trained.output_shape[-1], seed=0)
    for key, value in trained.state_dict().items():
        if key.split(".")[0] in ("conv1", "bn1", "residual1"):
            assert torch.equal(value, start.state_dict()[key]), key
    assert not torch.equal(trained.params()["dense1.weight"], start.params()["dense1.weight"])
    assert not torch.equal(trained.buffers()["residual2.bn1.running_mean"], start.buffers()["residual2.bn1.running_mean"])
