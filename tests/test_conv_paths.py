"""Conv2D's evaluations of the same sums: torch's convolution primitives with the weight gradient chosen by the
conv's shape (pointwise product, depthwise taps, batch correlation, patches), and the patches-only reference.
Each is checked against autograd in float64 and against finite differences on the smallest shapes."""

from __future__ import annotations

import pytest
import torch

from convdescent.diagnostics.gradcheck import check_layer
from convdescent.layers import Conv2D

pytestmark = pytest.mark.usefixtures("one_thread")

# (id, constructor kwargs, input shape (C, H, W), the weight-gradient evaluation the primitives path takes)
SHAPES = [
    ("pointwise", dict(filters=6, kernel_size=1), (4, 5, 5), "_pointwise"),
    ("pointwise-strided", dict(filters=6, kernel_size=1, stride=2), (4, 5, 5), "_weight_grad_by_patches"),
    ("depthwise", dict(filters=4, kernel_size=3, padding=1, groups=4), (4, 6, 6), "_weight_grad_by_taps"),
    ("depthwise-strided-dilated", dict(filters=4, kernel_size=3, stride=2, padding="same", groups=4, dilation=2),
     (4, 7, 7), "_weight_grad_by_taps"),
    ("depthwise-multiplier", dict(filters=8, kernel_size=3, groups=4), (4, 6, 6), "_weight_grad_by_patches"),
    ("plain", dict(filters=5, kernel_size=3, padding=1), (12, 6, 6), "_weight_grad_by_correlation"),
    ("plain-small-patch", dict(filters=5, kernel_size=3, padding=1), (3, 6, 6), "_weight_grad_by_patches"),
    ("plain-same-odd", dict(filters=5, kernel_size=2, padding="same"), (25, 5, 5), "_weight_grad_by_correlation"),
    ("plain-dilated", dict(filters=3, kernel_size=3, dilation=2, padding=2), (12, 7, 7), "_weight_grad_by_correlation"),
    ("plain-dilated-small-patch", dict(filters=3, kernel_size=3, dilation=2, padding=2), (2, 7, 7),
     "_weight_grad_by_patches"),
    ("strided", dict(filters=5, kernel_size=3, stride=2, padding=1), (3, 7, 7), "_weight_grad_by_patches"),
    ("strided-same", dict(filters=4, kernel_size=3, stride=2, padding="same"), (3, 8, 8), "_weight_grad_by_patches"),
    ("grouped", dict(filters=6, kernel_size=3, groups=2, padding=1), (4, 5, 5), "_weight_grad_by_patches"),
    ("rect-valid", dict(filters=3, kernel_size=(2, 3), stride=(1, 2)), (2, 6, 7), "_weight_grad_by_patches"),
]


def _conv(kwargs, shape):
    conv = Conv2D(**kwargs)
    conv.build(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return conv


def _autograd(conv, x, dy):
    t = conv.to_torch().double()
    xr = x.clone().requires_grad_(True)
    y = t(xr)
    y.backward(dy)
    weight = t[-1].weight if isinstance(t, torch.nn.Sequential) else t.weight
    bias = t[-1].bias if isinstance(t, torch.nn.Sequential) else t.bias
    return y.detach(), xr.grad, weight.grad, bias.grad


@pytest.mark.parametrize("primitives", [True, False], ids=["primitives", "patches"])
@pytest.mark.parametrize("name,kwargs,shape,path", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_conv_path_matches_autograd(name, kwargs, shape, path, primitives, layout, monkeypatch):
    monkeypatch.setattr(Conv2D, "USE_PRIMITIVES", primitives)
    conv = _conv(kwargs, shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, *shape), generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    taken = []
    for method in ("_weight_grad_by_patches", "_weight_grad_by_taps", "_weight_grad_by_correlation"):
        original = getattr(Conv2D, method)

        def spy(self, *args, _m=method, _o=original):
            taken.append(_m)
            return _o(self, *args)

        monkeypatch.setattr(Conv2D, method, spy)
    y = conv.forward(x, train=True)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    conv.needs_input_grad = True
    dx = conv.backward(dy)
    ref_y, ref_dx, ref_dw, ref_db = _autograd(conv, x, dy)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.grads["weight"], ref_dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.grads["bias"], ref_db, rtol=1e-12, atol=1e-12)
    expected = path if primitives else "_weight_grad_by_patches"
    assert taken == ([] if expected == "_pointwise" else [expected])


@pytest.mark.parametrize("name,kwargs,shape,path", SHAPES[:6], ids=[s[0] for s in SHAPES[:6]])
def test_conv_paths_match_finite_differences(name, kwargs, shape, path):
    results = check_layer(Conv2D(**kwargs), shape, batch_size=2, seed=3)
    assert {r.param for r in results} == {"input", "weight", "bias"}
    for r in results:
        assert r.passed(), r
