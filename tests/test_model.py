"""Sequential and the named models: torch export, summary, state_dict and config round trips, naming,
initialization as documented, and clear errors for bad arguments and wrong shapes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from convdescent.layers import (BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU,
                                Residual)
from convdescent.model import Sequential
from convdescent.models import MODELS, deepobs_2c2d, deepobs_3c3d, make_model, seed_cnn, seed_cnn_bn

NAMED = [("seed_cnn", (1, 28, 28)), ("seed_cnn", (3, 32, 32)), ("seed_cnn_bn", (1, 28, 28)),
         ("2c2d", (1, 28, 28)), ("3c3d", (3, 32, 32)), ("resnet8", (1, 28, 28)), ("resnet8", (3, 32, 32)),
         ("mobilenet_tiny", (1, 28, 28)), ("mobilenet_tiny", (3, 32, 32)), ("vit_tiny", (1, 28, 28))]
IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, shape in NAMED]


# tiny shapes: one thread is as fast, and immune to a busy machine's thread contention
pytestmark = pytest.mark.usefixtures("one_thread")


def warm_up(model, shape, steps=2):
    """Move batch-norm statistics away from their initial values so exported state is non-trivial."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model.forward(torch.randn((8,) + shape, generator=gen, dtype=model.dtype) * 2 + 0.5, train=True)
    for _, layer in model.all_layers():
        layer.clear_cache()


@pytest.mark.parametrize("name,shape", NAMED, ids=IDS)
def test_to_torch_matches_outputs_and_state_dict(name, shape):
    model = make_model(name, shape, seed=0, dtype=torch.float64)
    warm_up(model, shape)
    net = model.to_torch()
    ours, theirs = model.state_dict(), net.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand((3,) + shape, dtype=torch.float64)
    torch.testing.assert_close(net.eval()(x), model.forward(x, train=False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,shape", [("seed_cnn", (1, 28, 28)), ("2c2d", (1, 28, 28)), ("3c3d", (3, 32, 32))])
def test_to_torch_matches_in_training_mode_and_gradients(name, shape):
    model = make_model(name, shape, seed=0, dtype=torch.float64)
    net = model.to_torch().train()
    x = torch.rand((2,) + shape, dtype=torch.float64)
    out = model.forward(x, train=True)
    ref = net(x)
    torch.testing.assert_close(ref, out, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    model.backward(dout)
    (ref * dout).sum().backward()
    grads = model.grads()
    for key, param in net.named_parameters():
        torch.testing.assert_close(grads[key], param.grad, rtol=1e-9, atol=1e-12)


def test_seed_cnn_bn_structure_and_train_mode_statistics():
    model = seed_cnn_bn(seed=0, dtype=torch.float64)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "BatchNorm2D", "ReLU", "MaxPool2D", "Flatten", "Dense", "BatchNorm1D", "ReLU", "Dropout", "Dense"]
    assert "conv1.bias" not in model.params() and "dense1.bias" not in model.params()
    net = model.to_torch()
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    model.forward(x, train=True)
    net.train()(x)
    for key, value in model.buffers().items():
        torch.testing.assert_close(net.state_dict()[key], value)


def test_named_model_sizes_and_initialization():
    assert set(MODELS) >= {"2c2d", "3c3d", "seed_cnn", "seed_cnn_bn", "resnet8", "mobilenet_tiny", "vit_tiny"}
    small = deepobs_2c2d(seed=0)
    assert small.num_params() == 3_274_634
    assert small.output_shape == (10,) and small.layers[2].output_shape == (32, 14, 14)
    for key, value in small.params().items():
        if key.endswith("bias"):
            assert torch.all(value == 0.05), key
        else:
            assert value.abs().max() <= 0.1 and abs(value.std().item() - 0.05 * 0.88) < 0.005, key
    big = deepobs_3c3d(seed=0)
    assert big.num_params() == 895_210
    assert big.layers[9].output_shape == (1152,)
    assert all(torch.all(v == 0) for k, v in big.params().items() if k.endswith("bias"))
    assert seed_cnn(seed=0).num_params() == 693_962
    # stem 144 + 32; blocks 4,672, 14,464 (512 of them the 1x1 projection) and 57,600 (2,048); head 650
    res = make_model("resnet8", (1, 28, 28))
    assert res.num_params() == 77_562 and res.layers[7].output_shape == (64, 7, 7)
    assert res.layers[5].projection is not None and res.layers[3].projection is None
    # stem 176; separable blocks 16->32, 32->64, 64->128, 128->128: depthwise C*9 + pointwise C*F + 2 norms
    mobile = make_model("mobilenet_tiny", (1, 28, 28))
    assert mobile.num_params() == 31_946 and mobile.layers[3].groups == 16
    # patches 16*64 + 64, positions 49*64; per depth: attention 2*64 + 4*64*64 + 4*64, MLP 2*64 + 2*64*128 + 128 + 64
    vit = make_model("vit_tiny", (1, 28, 28))
    assert vit.num_params() == 138_890 and vit.layers[1].output_shape == (49, 64)
    cifar = make_model("3c3d", (3, 32, 32), num_classes=100)
    assert cifar.output_shape == (100,)


def test_same_seed_same_model_and_dtype():
    a, b = seed_cnn_bn(seed=5), seed_cnn_bn(seed=5)
    assert all(torch.equal(a.params()[k], b.params()[k]) for k in a.params())
    c = seed_cnn_bn(seed=6)
    assert not torch.equal(a.params()["conv1.weight"], c.params()["conv1.weight"])
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(a.forward(x, train=True), b.forward(x, train=True))  # dropout masks too
    d = seed_cnn(seed=0, dtype=torch.float64)
    assert all(v.dtype == torch.float64 for v in d.params().values())
    assert d.forward(torch.rand(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64


def test_naming():
    model = seed_cnn(seed=0)
    assert list(model.params()) == ["conv1.weight", "conv1.bias", "dense1.weight", "dense1.bias", "dense2.weight",
                                    "dense2.bias"]
    assert [layer.name for layer in model.layers] == ["conv1", "relu1", "pool1", "flatten1", "dense1", "relu2",
                                                      "dense2"]
    custom = Sequential([Dense(3, name="dense2"), Dense(2)], input_shape=(4,))
    assert [layer.name for layer in custom.layers] == ["dense2", "dense1"]
    assert list(seed_cnn_bn(seed=0).buffers()) == [
        "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
        "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked"]


def test_summary():
    text = seed_cnn_bn(seed=0).summary()
    lines = text.splitlines()
    assert lines[0] == 'Model "seed_cnn_bn"  input (None, 1, 28, 28)'
    assert any(re.match(r"conv1 \(Conv2D\)\s+\(None, 32, 26, 26\)\s+288$", line) for line in lines)
    assert any(re.match(r"bn1 \(BatchNorm2D\)\s+\(None, 32, 26, 26\)\s+64$", line) for line in lines)
    assert any(re.match(r"dropout1 \(Dropout\)\s+\(None, 128\)\s+0$", line) for line in lines)
    assert lines[-1].startswith("Total params: 694,122 (")
    with pytest.raises(RuntimeError, match="the model is not built"):
        Sequential([Dense(2)]).summary()


@pytest.mark.parametrize("name,shape", NAMED, ids=IDS)
def test_state_dict_round_trip_through_a_file(name, shape, tmp_path):
    model = make_model(name, shape, seed=0)
    warm_up(model, shape, steps=1)
    path = tmp_path / "weights.pt"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
    other = make_model(name, shape, seed=1)
    x = torch.rand((2,) + shape)
    assert not torch.allclose(other.forward(x), model.forward(x))
    other.load_state_dict(torch.load(path))
    assert torch.equal(other.forward(x), model.forward(x))
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())


def test_load_state_dict_errors():
    model = seed_cnn(seed=0)
    state = dict(model.state_dict())
    state.pop("dense2.bias")
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=re.escape("state_dict does not match the model: missing ['dense2.bias'], "
                                                   "unexpected ['extra']")):
        model.load_state_dict(state)
    bad = dict(model.state_dict())
    bad["dense2.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=re.escape("state_dict entry 'dense2.bias' has shape (3,), the model "
                                                   "expects (10,)")):
        model.load_state_dict(bad)


@pytest.mark.parametrize("name,shape", NAMED, ids=IDS)
def test_config_round_trip(name, shape):
    model = make_model(name, shape, seed=0)
    config = json.loads(json.dumps(model.get_config()))
    assert config["name"] == model.name and config["input_shape"] == list(shape)
    rebuilt = Sequential.from_config(config, seed=3)
    assert rebuilt.get_config() == model.get_config()
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand((2,) + shape)
    assert torch.equal(rebuilt.forward(x), model.forward(x))


def test_config_round_trip_keeps_deepobs_initializers():
    config = json.loads(json.dumps(deepobs_2c2d(seed=0).get_config()))
    assert config["layers"][0]["config"]["kernel_init"] == "deepobs_truncated_normal"
    rebuilt = Sequential.from_config(config, seed=0)
    assert torch.all(rebuilt.params()["conv1.bias"] == 0.05)


@pytest.mark.parametrize("make,message", [
    (lambda: Conv2D(32, kernel_size=-3), "kernel_size must be positive, got -3"),
    (lambda: Conv2D(32, kernel_size=(3, 0)), "kernel_size must be positive, got (3, 0)"),
    (lambda: Conv2D(0, 3), "filters must be a positive int, got 0"),
    (lambda: Conv2D(8, 3, stride=0), "stride must be positive, got 0"),
    (lambda: Conv2D(8, 3, padding="full"), "padding must be 'valid', 'same', an int or a pair, got 'full'"),
    (lambda: Conv2D(8, 3, padding=-1), "padding must be non-negative, got -1"),
    (lambda: Conv2D(8, 3, kernel_init="nope"), "unknown initializer 'nope'"),
    (lambda: Dense(0), "units must be a positive int, got 0"),
    (lambda: Dense(2.5), "units must be a positive int, got 2.5"),
    (lambda: MaxPool2D(0), "pool_size must be positive, got 0"),
    (lambda: make_model("resnet9000", (1, 28, 28)), "unknown model 'resnet9000'; choose one of"),
    (lambda: Sequential.from_config({"layers": [{"class": "Conv3D", "config": {}}]}),
     "unknown layer class 'Conv3D' in model config"),
    (lambda: Sequential([Dense(2, name="a"), Dense(2, name="a")]), "layer names must be unique, got duplicates ['a']"),
    (lambda: Sequential([Dense(2)], input_shape=(0, 3)), "input_shape must be positive sizes like (1, 28, 28)"),
    (lambda: Sequential([Conv2D(2, 5)], input_shape=(1, 3, 3)), "Conv2D 'conv1': kernel (5, 5) does not fit input 3x3"),
    (lambda: Sequential([Conv2D(2, 3), Dense(3)], input_shape=(1, 5, 5)),
     "Dense expects flat inputs of shape (features,), got (2, 3, 3); put a Flatten() before it"),
    (lambda: Sequential([BatchNorm2D()], input_shape=(4,)), "BatchNorm2D expects inputs of shape (N, C, H, W)"),
])
def test_bad_arguments_have_clear_errors(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_wrong_inputs_have_clear_errors():
    model = seed_cnn(seed=0)
    with pytest.raises(ValueError, match=re.escape("model 'seed_cnn' expects inputs of shape (N, 1, 28, 28), "
                                                   "got (2, 3, 28, 28)")):
        model.forward(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=re.escape("Conv2D 'conv1' expects input of shape (N, C, H, W), got "
                                                   "shape (28, 28)")):
        model.layers[0].forward(torch.zeros(28, 28))
    with pytest.raises(ValueError, match=re.escape("Dense 'dense1' expects 5408 input features, got input of "
                                                   "shape (2, 7)")):
        model.layers[4].forward(torch.zeros(2, 7))
    with pytest.raises(TypeError, match="item 1 is Linear. Wrap torch modules in TorchModule"):
        Sequential([Dense(2), torch.nn.Linear(2, 2)])
    with pytest.raises(RuntimeError, match="the model is not built"):
        Sequential([Dense(2)]).forward(torch.zeros(1, 3))


def test_model_with_every_new_layer_trains_a_step():
    model = Sequential([Conv2D(4, 3, padding="same"), BatchNorm2D(), ReLU(), MaxPool2D(3, 2, padding="same"),
                        Residual([Conv2D(4, 3, padding="same"), ReLU()]), Flatten(), Dropout(0.2), Dense(8),
                        BatchNorm1D(), ReLU(), Dense(3)], input_shape=(1, 8, 8), seed=0)
    g = torch.Generator().manual_seed(0)  # its own data: the global generator depends on the tests before
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    from convdescent.losses import SoftmaxCrossEntropy

    loss = SoftmaxCrossEntropy()
    first, _ = loss(model.forward(x, train=False), y)
    for _ in range(30):
        _, dout = loss(model.forward(x, train=True), y)
        model.backward(dout)
        with torch.no_grad():
            for p, g in zip(model.params().values(), model.grads().values()):
                p.sub_(0.1 * g)
    last, _ = loss(model.forward(x, train=False), y)
    assert float(last) < float(first) * 0.5
