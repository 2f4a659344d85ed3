"""The layers of the second generation beyond their gradients: grouped and dilated convolution, dilated max
pooling, padded average pooling, LayerNorm, GELU, SiLU and token-wise Dense. Export to standard torch.nn
modules with the same numbers, config round trips through a model, registration by name, the native and
fused paths staying out of cases they do not handle, and error messages."""

from __future__ import annotations

import json
import os

import pytest
import torch

from convdescent import native
from convdescent.layers import (GELU, LAYERS, AvgPool2D, Conv2D, Dense, Flatten, LayerNorm, MaxPool2D, ReLU,
                                Residual, SiLU)
from convdescent.model import Sequential

pytestmark = pytest.mark.usefixtures("one_thread")


def cnn_model(dtype=torch.float64):
    """A small net with every new option of the image layers."""
    return Sequential([
        Conv2D(6, 3, padding="same", dilation=2),
        Conv2D(6, 3, padding=1, groups=6),                      # depthwise
        GELU(),
        Conv2D(4, (1, 3), stride=(1, 2), groups=2, dilation=(1, 2), padding=(0, 2)),
        MaxPool2D(2, stride=1, dilation=2, padding="same"),
        SiLU(),
        AvgPool2D(3, stride=2, padding=1, count_include_pad=False),
        AvgPool2D(2, stride=1, padding=1),
        LayerNorm(normalized_dims=3),
        GELU("tanh"),
        Flatten(),
        Dense(5),
    ], input_shape=(2, 11, 10), seed=3, dtype=dtype)


def token_model(dtype=torch.float64):
    """Token-wise layers on (N, T, D): a pre-LayerNorm MLP block with a residual connection."""
    return Sequential([
        Dense(8),
        Residual([LayerNorm(), Dense(16), GELU(), Dense(8)]),
        LayerNorm(),
        SiLU(),
        Dense(3),
    ], input_shape=(5, 4), seed=4, dtype=dtype)


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.params().values():
            value.copy_(torch.randn(value.shape, generator=gen, dtype=value.dtype) * 0.5 + (value == 1).to(value.dtype))


@pytest.mark.parametrize("make,shape", [(cnn_model, (3, 2, 11, 10)), (token_model, (3, 5, 4))],
                         ids=["maps", "tokens"])
def test_to_torch_same_outputs_and_gradients(make, shape):
    model = make()
    randomize(model)
    net = model.to_torch()
    assert set(net.state_dict()) == set(model.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    y = model.forward(x, train=True)
    dy = torch.randn(y.shape, dtype=torch.float64)
    model.set_input_grad(True)
    dx = model.backward(dy)
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        yr = net(xr)
        yr.backward(dy)
    torch.testing.assert_close(y, yr.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-10, atol=1e-12)
    torch_grads = {k: p.grad for k, p in net.named_parameters()}
    for name, g in model.grads().items():
        torch.testing.assert_close(g, torch_grads[name], rtol=1e-10, atol=1e-12)


def test_exported_modules_are_the_standard_ones():
    model = cnn_model()
    net = model.to_torch()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.groups, c.dilation) for c in convs] == [(1, (2, 2)), (6, (1, 1)), (2, (1, 2))]
    pool = next(m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d))
    assert pool.dilation == (2, 2)
    avgs = [m for m in net.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert [(a.padding, a.count_include_pad) for a in avgs] == [((1, 1), False), ((1, 1), True)]
    gelus = [m.approximate for m in net.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus == ["none", "tanh"]
    assert any(isinstance(m, torch.nn.SiLU) for m in net.modules())
    ln = next(m for m in net.modules() if isinstance(m, torch.nn.LayerNorm))
    assert ln.normalized_shape == model.layers[8].input_shape and len(ln.normalized_shape) == 3


@pytest.mark.parametrize("make,shape", [(cnn_model, (2, 2, 11, 10)), (token_model, (2, 5, 4))],
                         ids=["maps", "tokens"])
def test_config_round_trip_by_name(make, shape):
    model = make(dtype=torch.float32)
    randomize(model)
    config = json.loads(json.dumps(model.get_config()))
    rebuilt = Sequential.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(rebuilt.forward(x), model.forward(x))
    assert rebuilt.get_config() == config
    for cls in (GELU, SiLU, LayerNorm):
        assert LAYERS[cls.__name__] is cls


def test_config_keeps_every_option():
    conv = Conv2D(4, 3, groups=2, dilation=(2, 1))
    assert Conv2D.from_config(conv.get_config()).get_config() == conv.get_config()
    assert conv.get_config()["groups"] == 2 and conv.get_config()["dilation"] == (2, 1)
    pool = MaxPool2D(3, 1, padding=1, dilation=2)
    assert MaxPool2D.from_config(pool.get_config()).dilation == (2, 2)
    avg = AvgPool2D(3, 2, padding=(1, 0), count_include_pad=False)
    back = AvgPool2D.from_config(avg.get_config())
    assert back.padding == (1, 0) and back.count_include_pad is False
    ln = LayerNorm(1e-3, 2, False)
    assert LayerNorm.from_config(ln.get_config()).get_config() == ln.get_config()
    assert GELU.from_config(GELU("tanh").get_config()).approximate == "tanh"


def test_plain_paths_are_left_for_grouped_and_dilated_layers():
    """The native im2col, the native max-pool and the fused conv + pool pass handle neither groups nor
    dilation: such layers must take the torch-op path (and still give torch's numbers). With the kernels
    switched off (the CI's fallback run) every layer takes that path."""
    kernels = os.environ.get("CONVDESCENT_NATIVE", "1") != "0"
    assert (native.library() is not None) == kernels, native.status()
    x = torch.randn(4, 2, 12, 12)  # patches of 2*3*3 entries: small enough for the fused pass
    for conv in (Conv2D(4, 3, groups=2), Conv2D(4, 3, dilation=2), Conv2D(4, 3)):
        pool = MaxPool2D(2)
        model = Sequential([conv, pool], input_shape=(2, 12, 12), seed=0)
        model.set_fusion(True)
        assert conv.fuses_with(pool) == (conv.plain() and kernels)
        assert (model.plan().nodes[0].label == "conv1+pool1") == (conv.plain() and kernels)
        y = model.forward(x, train=True)
        torch.testing.assert_close(y, model.to_torch()(x), rtol=1e-5, atol=1e-5)
    dilated = MaxPool2D(2, dilation=2)
    dilated.build((4, 12, 12))
    assert not dilated.native_ready((4, 12, 12)) and MaxPool2D(2).native_ready((4, 12, 12))
    dilated.forward(x)
    assert dilated._cache[0] != "native"


def test_dense_tokens_shapes_and_flat_still_refuses_maps():
    layer = Dense(3)
    assert layer.compute_output_shape((7, 5)) == (7, 3)
    with pytest.raises(ValueError, match=r"put a Flatten\(\) before it"):
        Dense(3).compute_output_shape((2, 4, 4))
    model = Sequential([Dense(3)], input_shape=(7, 5), seed=0)
    assert model.params()["dense1.weight"].shape == (3, 5)
    assert model.forward(torch.randn(2, 7, 5)).shape == (2, 7, 3)


@pytest.mark.parametrize("make,match", [
    (lambda: Conv2D(4, 3, groups=3), r"filters \(4\) must be divisible by groups \(3\)"),
    (lambda: Conv2D(4, 3, groups=0), "groups must be a positive int"),
    (lambda: Conv2D(4, 3, dilation=0), "dilation must be positive"),
    (lambda: MaxPool2D(2, dilation=(1, -1)), "dilation must be positive"),
    (lambda: AvgPool2D(2, padding=2), "padding must be at most half of pool_size"),
    (lambda: AvgPool2D(2, count_include_pad="yes"), "count_include_pad must be True or False"),
    (lambda: LayerNorm(eps=0), "eps must be a positive number"),
    (lambda: LayerNorm(normalized_dims=0), "normalized_dims must be a positive int"),
    (lambda: GELU("fast"), "approximate must be 'none' or 'tanh'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="groups=2, which does not divide its 3 input channels"):
        Sequential([Conv2D(4, 3, groups=2)], input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"kernel \(3, 3\) at dilation \(4, 4\) does not fit input 8x8"):
        Sequential([Conv2D(4, 3, dilation=4)], input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"pool_size \(3, 3\) at dilation \(3, 3\) is larger"):
        Sequential([MaxPool2D(3, dilation=3)], input_shape=(3, 6, 6))
    with pytest.raises(ValueError, match="normalizes the last 3 axes"):
        Sequential([LayerNorm(normalized_dims=3)], input_shape=(4, 5))
    ln = Sequential([LayerNorm()], input_shape=(4, 5)).layers[0]
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 4, 5\), got \(2, 4, 6\)"):
        ln.forward(torch.randn(2, 4, 6))
