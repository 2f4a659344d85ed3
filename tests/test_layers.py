"""Behaviour of Dropout, BatchNorm, Residual, TorchModule and MaxPool2D padding beyond their gradients:
randomness and its state, running statistics, naming, torch export, configs and error messages."""

from __future__ import annotations

import copy
import json
import pickle
import re

import pytest
import torch

from convdescent.layers import (LAYERS, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D,
                                ReLU, Residual, Tanh, TorchModule)
from convdescent.layers.dropout import rng_states, set_rng_states
from convdescent.model import Sequential


def build(layer, shape, dtype=torch.float32, seed=0, name="layer"):
    layer.name = layer.name or name
    layer.build(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return layer


# -- Dropout --------------------------------------------------------------------------------------------
def test_dropout_eval_is_identity_and_train_is_inverted():
    layer = build(Dropout(0.3), (1000,))
    x = torch.rand(20, 1000) + 0.5
    assert layer.forward(x, train=False) is x
    y = layer.forward(x, train=True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01  # 20000 draws: the std of the rate is 0.003
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.02  # expectation kept by the 1/(1-p) scale
    dy = torch.randn_like(y)
    torch.testing.assert_close(layer.backward(dy), dy * kept / 0.7)


def test_dropout_rate_zero_and_backward_after_eval():
    layer = build(Dropout(0.0), (5,))
    x = torch.randn(3, 5)
    assert torch.equal(layer.forward(x, train=True), x)
    layer = build(Dropout(0.5), (5,))
    layer.forward(x, train=False)
    dy = torch.randn(3, 5)
    assert torch.equal(layer.backward(dy), dy)


def test_dropout_is_reproducible_and_resumable():
    a = build(Dropout(0.5), (50,), seed=1)
    b = build(Dropout(0.5), (50,), seed=1)
    c = build(Dropout(0.5), (50,), seed=2)
    x = torch.ones(4, 50)
    ya, yb, yc = a.forward(x, True), b.forward(x, True), c.forward(x, True)
    assert torch.equal(ya, yb) and not torch.equal(ya, yc)
    state = a.get_rng_state()
    first = a.forward(x, True)
    assert not torch.equal(first, ya)  # the stream moves on
    a.set_rng_state(state)
    assert torch.equal(a.forward(x, True), first)
    fixed = build(Dropout(0.5, seed=123), (50,), seed=9)
    other = build(Dropout(0.5, seed=123), (50,), seed=10)
    assert torch.equal(fixed.forward(x, True), other.forward(x, True))  # an explicit seed wins


def test_dropout_state_survives_pickle_and_deepcopy():
    layer = build(Dropout(0.5), (30,))
    x = torch.ones(2, 30)
    layer.forward(x, True)
    clone, loaded = copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))
    expect = layer.forward(x, True)
    assert torch.equal(clone.forward(x, True), expect) and torch.equal(loaded.forward(x, True), expect)


def test_model_rng_states_round_trip():
    model = Sequential([Flatten(), Dense(8), Dropout(0.5), Residual([Dense(8), Dropout(0.2)]), Dense(2)],
                       input_shape=(2, 2, 2), seed=0)
    states = rng_states(model)
    assert sorted(states) == ["dropout1", "residual1.dropout1"]
    x = torch.randn(5, 2, 2, 2)
    first = model.forward(x, train=True)
    set_rng_states(model, states)
    assert torch.equal(model.forward(x, train=True), first)
    with pytest.raises(ValueError, match=r"rng states do not match the model: missing \['residual1.dropout1'\]"):
        set_rng_states(model, {"dropout1": states["dropout1"]})
    with pytest.raises(ValueError, match="rng state must be a uint8 tensor from get_rng_state"):
        model.layers[2].set_rng_state(torch.zeros(3))


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.5", True])
def test_dropout_bad_rate(rate):
    with pytest.raises(ValueError, match=re.escape(f"rate must be a number in [0, 1), got {rate!r}")):
        Dropout(rate)


def test_dropout_unbuilt_and_export():
    with pytest.raises(RuntimeError, match="Dropout 'd' is not built"):
        Dropout(0.5, name="d").get_rng_state()
    with pytest.raises(ValueError, match="seed must be a non-negative int or None, got -1"):
        Dropout(0.5, seed=-1)
    module = build(Dropout(0.25), (3,)).to_torch()
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.25


# -- BatchNorm --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_batchnorm_running_statistics_follow_torch(momentum):
    ours = build(BatchNorm2D(momentum=momentum, eps=1e-3), (3, 4, 4), dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=momentum).double()
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(ours.forward(x, train=True), ref.train()(x))
    for key, value in ref.state_dict().items():
        mine = {**ours.params, **ours.buffers()}[key]
        torch.testing.assert_close(mine, value, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 4 and ours.num_batches_tracked.dtype == torch.long
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ours.forward(x, train=False), ref.eval()(x))


def test_batchnorm_to_torch_identical_state_dict():
    for layer, shape in [(BatchNorm2D(), (4, 3, 3)), (BatchNorm1D(), (6,)), (BatchNorm1D(), (3, 5))]:
        build(layer, shape)
        layer.forward(torch.randn((4,) + shape), train=True)
        module = layer.to_torch()
        assert type(module) is (torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d)
        theirs = module.state_dict()
        ours = {**dict(layer.named_params()), **dict(layer.named_buffers())}
        assert list(theirs) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        x = torch.randn((3,) + shape)
        torch.testing.assert_close(module.eval()(x), layer.forward(x, train=False))


def test_batchnorm_moves_its_buffers():
    layer = build(BatchNorm2D(), (2, 3, 3))
    layer.to(dtype=torch.float64)
    assert layer.running_mean.dtype == torch.float64 and layer.params["weight"].dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.long
    model = Sequential([Conv2D(2, 3), BatchNorm2D()], input_shape=(1, 5, 5), seed=0).to(dtype=torch.float64)
    assert all(v.dtype == torch.float64 for k, v in model.state_dict().items() if "num_batches" not in k)


def test_batchnorm_errors():
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\] or None .*, got 1.5"):
        BatchNorm2D(momentum=1.5)
    with pytest.raises(ValueError, match="eps must be a positive number, got 0"):
        BatchNorm1D(eps=0)
    with pytest.raises(ValueError, match="num_features must be a positive int, got -2"):
        BatchNorm2D(num_features=-2)
    layer = build(BatchNorm2D(), (3, 2, 2), name="bn")
    with pytest.raises(ValueError, match=re.escape("BatchNorm2D 'bn' needs more than one value per channel in "
                                                   "training mode, got input of shape (1, 3, 1, 1)")):
        layer.forward(torch.zeros(1, 3, 1, 1), train=True)
    layer.forward(torch.zeros(1, 3, 1, 1), train=False)  # evaluation needs no batch statistics
    with pytest.raises(ValueError, match=re.escape("BatchNorm2D 'bn' expects input of shape (N, C, H, W) with "
                                                   "C=3, got shape (2, 4, 2, 2)")):
        layer.forward(torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match=re.escape("BatchNorm1D expects inputs of shape (N, C) or (N, C, L), "
                                                   "got per-sample shape (1, 2, 3)")):
        Sequential([BatchNorm1D()], input_shape=(1, 2, 3))
    with pytest.raises(ValueError, match="was given num_features=5, but its input has 3 channels"):
        Sequential([BatchNorm2D(num_features=5)], input_shape=(3, 4, 4))


# -- Residual -----------------------------------------------------------------------------------------------
def resnet_block_model(dtype=torch.float32):
    return Sequential([
        Conv2D(4, 3, padding="same"), ReLU(),
        Residual([Conv2D(4, 3, padding="same", use_bias=False), BatchNorm2D(), ReLU(),
                  Conv2D(4, 3, padding="same", use_bias=False), BatchNorm2D()]),
        Residual([Conv2D(8, 3, stride=2, padding="same"), ReLU(), Conv2D(8, 3, padding="same")],
                 projection="auto"),
        Flatten(), Dense(3),
    ], input_shape=(2, 9, 9), seed=0, dtype=dtype)


def test_residual_naming_and_sublayers():
    model = resnet_block_model()
    names = list(model.params())
    assert names[:6] == ["conv1.weight", "conv1.bias", "residual1.conv1.weight", "residual1.bn1.weight",
                         "residual1.bn1.bias", "residual1.conv2.weight"]
    assert "residual2.projection.weight" in names and "residual2.projection.bias" not in names
    assert "residual1.projection.weight" not in names  # identity skip: shapes match
    assert model.params()["residual2.projection.weight"].shape == (8, 4, 1, 1)
    assert model.layers[3].projection.stride == (2, 2)
    assert [layer.name for layer in model.layers[2].sublayers()] == ["conv1", "bn1", "relu1", "conv2", "bn2"]
    assert list(model.buffers())[0] == "residual1.bn1.running_mean"
    assert [n for n, _ in model.all_layers()][2:5] == ["residual1", "residual1.conv1", "residual1.bn1"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_residual_to_torch_same_outputs_and_state(train):
    model = resnet_block_model(dtype=torch.float64)
    net = model.to_torch()
    assert isinstance(net[2], torch.nn.Module) and net[2].projection is None
    assert isinstance(net[3].projection, torch.nn.Conv2d)
    assert set(net.state_dict()) == set(model.state_dict())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.state_dict().items())
    x = torch.randn(4, 2, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(net.train(train)(x), model.forward(x, train=train))
    if train:  # running statistics moved the same way
        for k, v in model.buffers().items():
            torch.testing.assert_close(net.state_dict()[k], v)


def test_residual_backward_is_the_sum_of_both_paths():
    block = build(Residual([Dense(3), Tanh()]), (3,), dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    branch = copy.deepcopy(block.layers)
    y = block.forward(x)
    h = x
    for layer in branch:
        h = layer.forward(h)
    torch.testing.assert_close(y, h + x)
    dy = torch.randn(2, 3, dtype=torch.float64)
    dh = dy
    for layer in reversed(branch):
        dh = layer.backward(dh)
    torch.testing.assert_close(block.backward(dy), dh + dy)


def test_residual_config_round_trip():
    model = resnet_block_model()
    config = json.loads(json.dumps(model.get_config()))
    assert config["layers"][3]["class"] == "Residual" and config["layers"][3]["config"]["projection"] == "auto"
    rebuilt = Sequential.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 9, 9)
    torch.testing.assert_close(rebuilt.forward(x), model.forward(x))
    assert "Residual" in LAYERS and repr(model.layers[3]).startswith("Residual([Conv2D(")


def test_residual_needs_input_grad_propagates():
    model = Sequential([Residual([Dense(4), ReLU()], projection=True), Dense(2)], input_shape=(3,), seed=0)
    x = torch.randn(5, 3)
    model.forward(x, train=True)
    assert model.backward(torch.randn(5, 2)) is None  # first layer: dL/dx not wanted
    assert model.grads()["residual1.projection.weight"].shape == (4, 3)
    model.set_input_grad(True)
    model.forward(x, train=True)
    assert model.backward(torch.randn(5, 2)).shape == (5, 3)


def test_residual_errors():
    with pytest.raises(ValueError, match=re.escape("Residual 'residual1': the branch maps (2, 5, 5) to "
                                                   "(3, 5, 5), so x + f(x) is undefined; pass projection='auto'")):
        Sequential([Residual([Conv2D(3, 3, padding="same")])], input_shape=(2, 5, 5))
    with pytest.raises(ValueError, match="projection must be None, 'auto' or True, got 'yes'"):
        Residual([ReLU()], projection="yes")
    with pytest.raises(ValueError, match="needs at least one layer"):
        Residual([])
    with pytest.raises(TypeError, match="item 0 is Linear. Wrap torch modules in TorchModule"):
        Residual([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="the name 'projection' is reserved"):
        Residual([ReLU(name="projection")])
    with pytest.raises(ValueError, match="cannot project \\(2, 4, 4\\) to \\(32,\\)"):
        Sequential([Residual([Flatten()], projection="auto")], input_shape=(2, 4, 4))
    model = Sequential([Residual([ReLU()])], input_shape=(4,))
    with pytest.raises(ValueError, match=re.escape("Residual 'residual1' expects inputs of shape (N, 4), "
                                                   "got (2, 5)")):
        model.layers[0].forward(torch.zeros(2, 5))


# -- TorchModule --------------------------------------------------------------------------------------------
def test_torch_module_params_grads_and_updates():
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.GELU())
    model = Sequential([TorchModule(module), Flatten(), Dense(2)], input_shape=(2, 5, 5), seed=0)
    assert [n for n in model.params()][:4] == ["torch1.0.weight", "torch1.0.bias", "torch1.1.weight",
                                               "torch1.1.bias"]
    assert "torch1.1.running_mean" in model.buffers()
    model.set_input_grad(True)
    x = torch.randn(4, 2, 5, 5)
    out = model.forward(x, train=True)
    dx = model.backward(torch.randn(4, 2))
    grads = model.grads()
    assert dx.shape == x.shape and grads["torch1.0.weight"].shape == (3, 2, 3, 3)
    # No graph leaks out of the adapter: the rest of the engine sees plain tensors.
    assert not out.requires_grad and not dx.requires_grad
    assert not any(g.requires_grad for g in grads.values())
    before = module[0].weight.detach().clone()
    with torch.no_grad():
        model.params()["torch1.0.weight"].sub_(0.1 * grads["torch1.0.weight"])  # an optimizer step, in place
    torch.testing.assert_close(module[0].weight.detach(), before - 0.1 * grads["torch1.0.weight"])
    assert module[0].weight.grad is None  # gradients went to grads, not into .grad


def test_torch_module_frozen_params_and_no_input_grad():
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    layer = build(TorchModule(lin), (3,))
    assert list(layer.params) == ["weight"] and "bias" in layer.buffers()
    layer.needs_input_grad = False
    layer.forward(torch.randn(4, 3), train=True)
    assert layer.backward(torch.randn(4, 2)) is None and layer.grads["weight"].shape == (2, 3)


def test_torch_module_config_round_trip_and_export():
    model = Sequential([TorchModule("torch.nn.Conv2d", {"in_channels": 1, "out_channels": 2, "kernel_size": 3}),
                        TorchModule("torch.nn.ReLU"), Flatten(), Dense(2)], input_shape=(1, 5, 5), seed=0)
    config = json.loads(json.dumps(model.get_config()))
    rebuilt = Sequential.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(rebuilt.forward(x), model.forward(x))
    net = model.to_torch()
    torch.testing.assert_close(net(x), model.forward(x))
    assert net[0] is not model.layers[0].module  # a copy


def test_torch_module_errors():
    with pytest.raises(ValueError, match="module must be a torch.nn.Module or the dotted path of a torch.nn.Module "
                                         "class such as 'torch.nn.GELU', got 'torch.nn.Nope'"):
        TorchModule("torch.nn.Nope")
    with pytest.raises(ValueError, match="got 'os.path'"):
        TorchModule("os.path")
    with pytest.raises(ValueError, match="module must be a torch.nn.Module or a dotted class path, got int"):
        TorchModule(3)
    with pytest.raises(ValueError, match="kwargs are only used with a module path"):
        TorchModule(torch.nn.ReLU(), kwargs={"inplace": True})
    with pytest.raises(ValueError, match="TorchModule 'torch1' \\(Linear\\) fails on inputs of shape \\(N, 3\\)"):
        Sequential([TorchModule(torch.nn.Linear(4, 2))], input_shape=(3,))
    config = Sequential([TorchModule(torch.nn.Tanh())], input_shape=(3,)).get_config()
    with pytest.raises(ValueError, match="wraps a module instance of torch.nn.modules.activation.Tanh, which cannot "
                                         "be rebuilt from a config; build it as TorchModule\\('torch.nn.modules"):
        Sequential.from_config(config)


# -- MaxPool2D padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [5, 6, 7, 28])
def test_maxpool_same_padding_matches_tensorflow_rule(size):
    layer = build(MaxPool2D(3, 2, padding="same"), (2, size, size))
    assert layer.output_shape == (2, -(-size // 2), -(-size // 2))
    x = -torch.rand(1, 2, size, size) - 1  # all negative: zero padding would win, -inf padding must not
    y = layer.forward(x)
    assert (y < 0).all()
    net = layer.to_torch()
    torch.testing.assert_close(net(x), y)


def test_maxpool_padding_errors_and_config():
    with pytest.raises(ValueError, match=re.escape("padding must be at most half of pool_size (2, 2), got 2")):
        MaxPool2D(2, padding=2)
    with pytest.raises(ValueError, match="padding must be 'valid', 'same', an int or a pair, got 'full'"):
        MaxPool2D(2, padding="full")
    layer = MaxPool2D(3, 2, padding=(1, 0))
    assert layer.get_config()["padding"] == (1, 0)
    assert MaxPool2D.from_config(layer.get_config()).padding == (1, 0)
