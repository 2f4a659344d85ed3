"""The fast layers against their naive twins written from the formulas (convdescent.layers.naive).

The naive conv backward computes dL/dx as the full convolution of the (dilated) delta with the flipped
kernel, a different route from the fast layer's scatter-add (col2im), so agreement checks the formula of
docs/gradients.md as well as the code. The twins themselves are pinned to torch on a few shapes.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from convdescent.layers import GELU, AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, LayerNorm, MaxPool2D, SiLU
from convdescent.layers import naive

TOL = 1e-12  # float64; both sides sum the same products in different orders


# tiny shapes: one thread is as fast, and immune to a busy machine's thread contention
pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, tol=TOL):
    scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
    return a.shape == b.shape and float((a - b).abs().max() if a.numel() else 0.0) <= tol * scale


def built(layer, shape, seed):
    layer.name = "layer"
    layer.build(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return layer


def conv_configs(count=50):
    rng = random.Random(7)
    out = []
    while len(out) < count:
        i = len(out)
        k = (rng.randint(1, 4), rng.randint(1, 4))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        padding = ["valid", "same", rng.randint(0, 2), (rng.randint(0, 3), rng.randint(0, 1))][i % 4]
        c, f, n = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 3)
        h, w = rng.randint(1, 9), rng.randint(1, 9)
        try:
            Conv2D(f, k, s, padding).compute_output_shape((c, h, w))
        except ValueError:
            continue
        out.append(pytest.param((n, c, h, w, f, k, s, padding, i % 3 != 0),
                                id=f"n{n}c{c}-{h}x{w}-f{f}-k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-p{padding}"))
    return out


@pytest.mark.parametrize("cfg", conv_configs())
def test_conv_matches_naive_forward_and_backward(cfg):
    n, c, h, w, f, k, s, padding, bias = cfg
    layer = built(Conv2D(f, k, s, padding, use_bias=bias), (c, h, w), seed=h * 31 + w)
    gen = torch.Generator().manual_seed(5)
    if bias:
        layer.params["bias"].normal_(generator=gen)
    x = torch.randn((n, c, h, w), generator=gen, dtype=torch.float64)
    pads = layer.pads(h, w)
    y = layer.forward(x, train=True)
    y_naive = naive.conv2d_forward(x, layer.params["weight"], layer.params.get("bias"), s, pads)
    assert close(y, y_naive)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    dx_n, dw_n, db_n = naive.conv2d_backward(x, layer.params["weight"], dy, s, pads)
    assert close(dx, dx_n)
    assert close(layer.grads["weight"], dw_n)
    if bias:
        assert close(layer.grads["bias"], db_n)


def test_naive_conv_matches_torch():
    gen = torch.Generator().manual_seed(0)
    for (k, s, pads) in [((3, 3), (1, 1), (1, 1, 1, 1)), ((2, 3), (2, 1), (0, 1, 2, 0)), ((1, 1), (3, 2), (0, 0, 0, 0))]:
        x = torch.randn((2, 3, 7, 6), generator=gen, dtype=torch.float64, requires_grad=True)
        wt = torch.randn((4, 3) + k, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
        pt, pb, pl, pr = pads
        y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), wt, b, stride=s)
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        y.backward(dy)
        with torch.no_grad():
            assert close(naive.conv2d_forward(x, wt, b, s, pads), y)
            dx, dw, db = naive.conv2d_backward(x, wt, dy, s, pads)
        assert close(dx, x.grad) and close(dw, wt.grad) and close(db, b.grad)


def pool_configs(count=40):
    rng = random.Random(8)
    out = []
    while len(out) < count:
        i = len(out)
        p = (rng.randint(1, 3), rng.randint(1, 3))
        s = None if i % 3 == 0 else (rng.randint(1, 3), rng.randint(1, 3))
        padding = ["valid", "same", (p[0] // 2, p[1] // 2)][i % 3]
        n, c, h, w = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 8), rng.randint(1, 8)
        try:
            MaxPool2D(p, s, padding=padding).compute_output_shape((c, h, w))
            AvgPool2D(p, s).compute_output_shape((c, h, w))
        except ValueError:
            continue
        out.append(pytest.param((n, c, h, w, p, s, padding), id=f"n{n}c{c}-{h}x{w}-p{p[0]}x{p[1]}-s{s}-pad{padding}"))
    return out


@pytest.mark.parametrize("cfg", pool_configs())
def test_pools_match_naive(cfg):
    n, c, h, w, p, s, padding = cfg
    gen = torch.Generator().manual_seed(h * 10 + w)
    # Small integers make ties common: the first arg-max (row-major) must receive the gradient, as in torch.
    x = torch.randint(-3, 4, (n, c, h, w), generator=gen).to(torch.float64)
    stride = p if s is None else s
    mp = built(MaxPool2D(p, s, padding=padding), (c, h, w), 0)
    y = mp.forward(x)
    pads = mp.pads(h, w)
    assert close(y, naive.maxpool2d_forward(x, p, stride, pads))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    assert close(mp.backward(dy), naive.maxpool2d_backward(x, dy, p, stride, pads))
    ap = built(AvgPool2D(p, s), (c, h, w), 0)
    y = ap.forward(x)
    assert close(y, naive.avgpool2d_forward(x, p, stride))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    assert close(ap.backward(dy), naive.avgpool2d_backward(x, dy, p, stride))


def test_naive_maxpool_ties_match_torch():
    x = torch.tensor([[[[1.0, 1.0, 0.0], [1.0, 0.0, 2.0], [2.0, 2.0, 2.0]]]], dtype=torch.float64,
                     requires_grad=True)
    y = F.max_pool2d(x, 2, 1)
    y.backward(torch.ones_like(y))
    with torch.no_grad():
        assert close(naive.maxpool2d_forward(x, (2, 2), (1, 1)), y)
        assert close(naive.maxpool2d_backward(x, torch.ones_like(y), (2, 2), (1, 1)), x.grad)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 1, 1), (6,), (2, 3)], ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_matches_naive_long_form(shape, train):
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[0])
    layer = built((BatchNorm2D if len(shape) == 3 else BatchNorm1D)(), shape, 0)
    c = shape[0]
    layer.params["weight"].copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    layer.params["bias"].copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    layer.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    layer.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    x = torch.randn((5,) + shape, generator=gen, dtype=torch.float64) * 2 + 1
    stats = {} if train else {"mean": layer.running_mean.clone(), "var": layer.running_var.clone()}
    y = layer.forward(x, train=train)
    assert close(y, naive.batchnorm_forward(x, layer.params["weight"], layer.params["bias"], layer.eps, **stats))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    dx_n, dw_n, db_n = naive.batchnorm_backward(x, layer.params["weight"], dy, layer.eps, **stats)
    assert close(dx, dx_n) and close(layer.grads["weight"], dw_n) and close(layer.grads["bias"], db_n)


def test_dense_matches_naive():
    gen = torch.Generator().manual_seed(3)
    layer = built(Dense(4), (6,), 0)
    layer.params["bias"].normal_(generator=gen)
    x = torch.randn((3, 6), generator=gen, dtype=torch.float64)
    y = layer.forward(x)
    assert close(y, naive.dense_forward(x, layer.params["weight"], layer.params["bias"]))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    dx_n, dw_n, db_n = naive.dense_backward(x, layer.params["weight"], dy)
    assert close(dx, dx_n) and close(layer.grads["weight"], dw_n) and close(layer.grads["bias"], db_n)


def grouped_configs(count=40):
    rng = random.Random(9)
    out = []
    while len(out) < count:
        i = len(out)
        g = rng.randint(1, 3)
        c = g * rng.randint(1, 2)
        f = g * rng.randint(1, 3)
        k = (rng.randint(1, 3), rng.randint(1, 3))
        s = (rng.randint(1, 2), rng.randint(1, 3))
        d = (rng.randint(1, 3), rng.randint(1, 3))
        padding = ["valid", "same", rng.randint(0, 2), (rng.randint(0, 3), rng.randint(0, 1))][i % 4]
        n, h, w = rng.randint(1, 3), rng.randint(2, 10), rng.randint(2, 10)
        try:
            Conv2D(f, k, s, padding, groups=g, dilation=d).compute_output_shape((c, h, w))
        except ValueError:
            continue
        out.append(pytest.param((n, c, h, w, f, k, s, padding, g, d, i % 3 != 0),
                                id=f"n{n}c{c}-{h}x{w}-f{f}g{g}-k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-d{d[0]}x{d[1]}-p{padding}"))
    return out


@pytest.mark.parametrize("cfg", grouped_configs())
def test_grouped_dilated_conv_matches_naive(cfg):
    n, c, h, w, f, k, s, padding, g, d, bias = cfg
    layer = built(Conv2D(f, k, s, padding, use_bias=bias, groups=g, dilation=d), (c, h, w), seed=h * 31 + w)
    gen = torch.Generator().manual_seed(6)
    if bias:
        layer.params["bias"].normal_(generator=gen)
    x = torch.randn((n, c, h, w), generator=gen, dtype=torch.float64)
    pads = layer.pads(h, w)
    y = layer.forward(x, train=True)
    assert close(y, naive.conv2d_forward(x, layer.params["weight"], layer.params.get("bias"), s, pads, g, d))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    dx_n, dw_n, db_n = naive.conv2d_backward(x, layer.params["weight"], dy, s, pads, g, d)
    assert close(dx, dx_n) and close(layer.grads["weight"], dw_n)
    if bias:
        assert close(layer.grads["bias"], db_n)


def test_naive_grouped_dilated_conv_matches_torch():
    gen = torch.Generator().manual_seed(1)
    for (c, f, g, k, s, d, pads) in [(4, 4, 4, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),
                                     (6, 4, 2, (2, 3), (2, 1), (1, 3), (0, 1, 2, 0)),
                                     (3, 6, 3, (1, 2), (1, 2), (1, 2), (0, 0, 0, 0))]:
        x = torch.randn((2, c, 9, 8), generator=gen, dtype=torch.float64, requires_grad=True)
        wt = torch.randn((f, c // g) + k, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(f, generator=gen, dtype=torch.float64, requires_grad=True)
        pt, pb, pl, pr = pads
        y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), wt, b, stride=s, groups=g, dilation=d)
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        y.backward(dy)
        with torch.no_grad():
            assert close(naive.conv2d_forward(x, wt, b, s, pads, g, d), y)
            dx, dw, db = naive.conv2d_backward(x, wt, dy, s, pads, g, d)
        assert close(dx, x.grad) and close(dw, wt.grad) and close(db, b.grad)


def pool_extra_configs(count=40):
    rng = random.Random(10)
    out = []
    while len(out) < count:
        i = len(out)
        p = (rng.randint(1, 3), rng.randint(1, 3))
        s = None if i % 3 == 0 else (rng.randint(1, 3), rng.randint(1, 3))
        d = (rng.randint(1, 3), rng.randint(1, 2))
        padding = ["valid", "same", (p[0] // 2, p[1] // 2)][i % 3]
        avg_pad = (rng.randint(0, p[0] // 2), rng.randint(0, p[1] // 2))
        n, c, h, w = rng.randint(1, 3), rng.randint(1, 3), rng.randint(2, 9), rng.randint(2, 9)
        try:
            MaxPool2D(p, s, padding=padding, dilation=d).compute_output_shape((c, h, w))
            AvgPool2D(p, s, padding=avg_pad).compute_output_shape((c, h, w))
        except ValueError:
            continue
        out.append(pytest.param((n, c, h, w, p, s, padding, d, avg_pad, i % 2 == 0),
                                id=f"n{n}c{c}-{h}x{w}-p{p[0]}x{p[1]}-s{s}-pad{padding}-d{d[0]}x{d[1]}-avgpad{avg_pad}"))
    return out


@pytest.mark.parametrize("cfg", pool_extra_configs())
def test_dilated_maxpool_and_padded_avgpool_match_naive(cfg):
    n, c, h, w, p, s, padding, d, avg_pad, include = cfg
    gen = torch.Generator().manual_seed(h * 10 + w + 1)
    x = torch.randint(-3, 4, (n, c, h, w), generator=gen).to(torch.float64)  # ties: the first arg-max wins
    stride = p if s is None else s
    mp = built(MaxPool2D(p, s, padding=padding, dilation=d), (c, h, w), 0)
    y = mp.forward(x)
    pads = mp.pads(h, w)
    assert close(y, naive.maxpool2d_forward(x, p, stride, pads, d))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    assert close(mp.backward(dy), naive.maxpool2d_backward(x, dy, p, stride, pads, d))
    ap = built(AvgPool2D(p, s, padding=avg_pad, count_include_pad=include), (c, h, w), 0)
    y = ap.forward(x)
    assert close(y, naive.avgpool2d_forward(x, p, stride, avg_pad, include))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    assert close(ap.backward(dy), naive.avgpool2d_backward(x, dy, p, stride, avg_pad, include))


def test_naive_pools_with_dilation_and_padding_match_torch():
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (2, 3, 9, 8), generator=gen).to(torch.float64).requires_grad_()
    y = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), (3, 2), (2, 1), dilation=(2, 3))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(dy)
    with torch.no_grad():
        assert close(naive.maxpool2d_forward(x, (3, 2), (2, 1), (1, 1, 1, 1), (2, 3)), y)
        assert close(naive.maxpool2d_backward(x, dy, (3, 2), (2, 1), (1, 1, 1, 1), (2, 3)), x.grad)
    for include in (True, False):
        xa = x.detach().clone().requires_grad_()
        y = F.avg_pool2d(xa, (3, 4), (2, 3), padding=(1, 2), count_include_pad=include)
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        y.backward(dy)
        with torch.no_grad():
            assert close(naive.avgpool2d_forward(xa, (3, 4), (2, 3), (1, 2), include), y)
            assert close(naive.avgpool2d_backward(xa, dy, (3, 4), (2, 3), (1, 2), include), xa.grad)


def test_dense_on_tokens_matches_naive():
    gen = torch.Generator().manual_seed(4)
    layer = built(Dense(3), (5, 6), 0)
    layer.params["bias"].normal_(generator=gen)
    x = torch.randn((2, 5, 6), generator=gen, dtype=torch.float64)
    y = layer.forward(x)
    assert close(y, naive.dense_forward(x, layer.params["weight"], layer.params["bias"]))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    dx_n, dw_n, db_n = naive.dense_backward(x, layer.params["weight"], dy)
    assert close(dx, dx_n) and close(layer.grads["weight"], dw_n) and close(layer.grads["bias"], db_n)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape,dims", [((4, 6), 1), ((5,), 1), ((2, 3, 4), 2), ((2, 3, 4), 3)],
                         ids=["tokens", "flat", "maps-2", "maps-3"])
def test_layernorm_matches_naive_long_form(shape, dims, affine):
    gen = torch.Generator().manual_seed(len(shape) * 5 + dims)
    layer = built(LayerNorm(1e-5, dims, affine), shape, 0)
    if affine:
        layer.params["weight"].copy_(torch.rand(layer.normalized_shape, generator=gen, dtype=torch.float64) + 0.5)
        layer.params["bias"].copy_(torch.randn(layer.normalized_shape, generator=gen, dtype=torch.float64))
    weight, bias = layer.params.get("weight"), layer.params.get("bias")
    x = torch.randn((3,) + shape, generator=gen, dtype=torch.float64) * 2 + 1
    y = layer.forward(x, train=True)
    assert close(y, naive.layernorm_forward(x, weight, bias, dims, layer.eps))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    dx_n, dw_n, db_n = naive.layernorm_backward(x, weight, dy, dims, layer.eps)
    assert close(dx, dx_n)
    if affine:
        assert close(layer.grads["weight"], dw_n) and close(layer.grads["bias"], db_n)
    else:
        assert layer.grads == {} and dw_n is None


@pytest.mark.parametrize("make,fwd,bwd", [
    (lambda: GELU(), naive.gelu_forward, naive.gelu_backward),
    (lambda: GELU("tanh"), lambda x: naive.gelu_forward(x, "tanh"), lambda x, d: naive.gelu_backward(x, d, "tanh")),
    (lambda: SiLU(), naive.silu_forward, naive.silu_backward),
], ids=["gelu", "gelu-tanh", "silu"])
def test_smooth_activations_match_naive(make, fwd, bwd):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn((4, 3, 5), generator=gen, dtype=torch.float64) * 3
    layer = make()
    y = layer.forward(x)
    assert close(y, fwd(x))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    assert close(layer.backward(dy), bwd(x, dy))
    # the twins themselves against torch's autograd
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        ref = layer.to_torch()(xr)
        ref.backward(dy)
    assert close(fwd(x), ref.detach()) and close(bwd(x, dy), xr.grad)
