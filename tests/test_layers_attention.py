"""Self-attention and the token layers beyond their gradients (tests/test_layers_grad.py has those): the fast
layers against their naive twins (the softmax through its full Jacobian), the twins against torch, export to
torch.nn.MultiheadAttention and friends with the same numbers and state_dict, a pre-LayerNorm transformer
written with Residual blocks, config round trips by name, and error messages."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from convdescent.layers import (GELU, LAYERS, ClassToken, Dense, LayerNorm, MultiHeadSelfAttention, PatchEmbed,
                                PositionEmbedding, Residual, TokenPool)
from convdescent.layers import naive
from convdescent.layers.attention import SelfAttentionModule
from convdescent.model import Sequential

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-12


def close(a, b, tol=TOL):
    scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
    return a.shape == b.shape and float((a - b).abs().max() if a.numel() else 0.0) <= tol * scale


def built(layer, shape, seed=0):
    layer.name = layer.name or "layer"
    layer.build(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return layer


def attention_configs(count=30):
    rng = random.Random(12)
    return [pytest.param((rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 4), rng.randint(1, 3), i % 2 == 1,
                          i % 4 != 3), id=f"cfg{i}") for i in range(count)]


@pytest.mark.parametrize("cfg", attention_configs())
def test_attention_matches_naive(cfg):
    n, t, heads, width, causal, bias = cfg
    d = heads * width
    layer = built(MultiHeadSelfAttention(heads, causal=causal, use_bias=bias), (t, d), seed=t * 7 + d)
    gen = torch.Generator().manual_seed(13)
    params = dict(layer.named_params())
    with torch.no_grad():
        for key, value in params.items():
            if key.endswith("bias"):
                value.normal_(generator=gen)
    w_in, b_in = params["in_proj_weight"], params.get("in_proj_bias")
    w_out, b_out = params["out_proj.weight"], params.get("out_proj.bias")
    x = torch.randn((n, t, d), generator=gen, dtype=torch.float64) * 1.5
    y = layer.forward(x, train=True)
    assert close(y, naive.attention_forward(x, w_in, b_in, w_out, b_out, heads, causal))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    grads = dict(layer.named_grads())
    dx_n, dw_in, db_in, dw_out, db_out = naive.attention_backward(x, w_in, b_in, w_out, dy, heads, causal)
    assert close(dx, dx_n) and close(grads["in_proj_weight"], dw_in) and close(grads["out_proj.weight"], dw_out)
    if bias:
        assert close(grads["in_proj_bias"], db_in) and close(grads["out_proj.bias"], db_out)
    else:
        assert set(grads) == {"in_proj_weight", "out_proj.weight"}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_naive_attention_matches_torch(causal):
    gen = torch.Generator().manual_seed(14)
    n, t, d, heads = 2, 5, 6, 3
    x = torch.randn((n, t, d), generator=gen, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn((3 * d, d), generator=gen, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(3 * d, generator=gen, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn((d, d), generator=gen, dtype=torch.float64, requires_grad=True)
    b_out = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.ones((t, t), dtype=torch.bool).triu(1) if causal else None
    y, _ = F.multi_head_attention_forward(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), d, heads,
                                          w_in, b_in, None, None, False, 0.0, w_out, b_out, training=False,
                                          need_weights=False, attn_mask=mask)
    y = y.transpose(0, 1)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(dy)
    with torch.no_grad():
        assert close(naive.attention_forward(x, w_in, b_in, w_out, b_out, heads, causal), y)
        dx, dwi, dbi, dwo, dbo = naive.attention_backward(x, w_in, b_in, w_out, dy, heads, causal)
    for ours, ref in [(dx, x.grad), (dwi, w_in.grad), (dbi, b_in.grad), (dwo, w_out.grad), (dbo, b_out.grad)]:
        assert close(ours, ref)


def test_causal_attention_does_not_look_ahead():
    layer = built(MultiHeadSelfAttention(2, causal=True), (5, 4))
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    y = layer.forward(x)
    x2 = x.clone()
    x2[:, 3:] += 10.0
    y2 = layer.forward(x2)
    assert torch.equal(y[:, :3], y2[:, :3]) and not torch.allclose(y[:, 3:], y2[:, 3:])


@pytest.mark.parametrize("patch,size", [((2, 2), (6, 8)), ((3, 2), (7, 5)), ((1, 1), (3, 2))],
                         ids=["tiles", "remainder", "pixels"])
def test_patch_embed_matches_naive(patch, size):
    gen = torch.Generator().manual_seed(15)
    layer = built(PatchEmbed(5, patch), (3,) + size)
    layer.params["bias"].normal_(generator=gen)
    x = torch.randn((2, 3) + size, generator=gen, dtype=torch.float64)
    y = layer.forward(x)
    assert close(y, naive.patch_embed_forward(x, layer.params["weight"], layer.params["bias"]))
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dx = layer.backward(dy)
    dx_n, dw_n, db_n = naive.patch_embed_backward(x, layer.params["weight"], dy)
    assert close(dx, dx_n) and close(layer.grads["weight"], dw_n) and close(layer.grads["bias"], db_n)
    # the twin against the conv it amounts to
    xr, wr = x.clone().requires_grad_(), layer.params["weight"].clone().requires_grad_()
    with torch.enable_grad():
        ref = F.conv2d(xr, wr, stride=patch).flatten(2).transpose(1, 2)
        ref.backward(dy)
    assert close(naive.patch_embed_forward(x, layer.params["weight"], None), ref.detach())
    assert close(dx_n, xr.grad) and close(dw_n, wr.grad)


def vit(dtype=torch.float64, pool="cls", causal=False):
    """A two-block pre-LayerNorm Vision Transformer, written with the library's layers only."""
    def block():
        return [Residual([LayerNorm(), MultiHeadSelfAttention(2, causal=causal)]),
                Residual([LayerNorm(), Dense(16), GELU(), Dense(8)])]

    head = [ClassToken()] if pool == "cls" else []
    return Sequential([PatchEmbed(8, 2), *head, PositionEmbedding(), *block(), *block(), LayerNorm(),
                       TokenPool(pool), Dense(3)], input_shape=(2, 6, 4), seed=5, dtype=dtype)


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.params().values():
            value.add_(torch.randn(value.shape, generator=gen, dtype=value.dtype) * 0.2)


@pytest.mark.parametrize("pool,causal", [("cls", False), ("mean", True)], ids=["cls", "mean-causal"])
def test_vit_to_torch_same_outputs_gradients_and_state(pool, causal):
    model = vit(pool=pool, causal=causal)
    randomize(model)
    net = model.to_torch()
    assert list(net.state_dict()) == list(model.state_dict())
    assert any(type(m) is SelfAttentionModule for m in net.modules())
    assert all(isinstance(m, torch.nn.MultiheadAttention) and m.batch_first
               for m in net.modules() if isinstance(m, SelfAttentionModule))
    x = torch.randn(3, 2, 6, 4, dtype=torch.float64)
    model.set_input_grad(True)
    y = model.forward(x, train=True)
    dy = torch.randn(y.shape, dtype=torch.float64)
    dx = model.backward(dy)
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        yr = net.train()(xr)
        yr.backward(dy)
    torch.testing.assert_close(y, yr.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-10, atol=1e-12)
    torch_grads = dict(net.named_parameters())
    for name, g in model.grads().items():
        torch.testing.assert_close(g, torch_grads[name].grad, rtol=1e-10, atol=1e-12)


def test_vit_config_round_trip_by_name():
    model = vit(dtype=torch.float32)
    randomize(model)
    config = json.loads(json.dumps(model.get_config()))
    rebuilt = Sequential.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 6, 4)
    torch.testing.assert_close(rebuilt.forward(x), model.forward(x))
    assert rebuilt.get_config() == config
    for cls in (MultiHeadSelfAttention, PatchEmbed, PositionEmbedding, ClassToken, TokenPool):
        assert LAYERS[cls.__name__] is cls
    names = list(model.params())
    assert "residual1.attention1.in_proj_weight" in names and "residual1.attention1.out_proj.weight" in names
    assert "cls1.token" in names and model.params()["pos1.weight"].shape == (7, 8)


def test_attention_layer_moves_with_its_projection():
    layer = built(MultiHeadSelfAttention(2), (3, 4))
    layer.to(dtype=torch.float32)
    assert all(p.dtype == torch.float32 for _, p in layer.named_params())
    assert layer.forward(torch.randn(2, 3, 4)).dtype == torch.float32


@pytest.mark.parametrize("make,match", [
    (lambda: MultiHeadSelfAttention(0), "num_heads must be a positive int"),
    (lambda: MultiHeadSelfAttention(2, causal="yes"), "causal must be True or False"),
    (lambda: PatchEmbed(0), "dim must be a positive int"),
    (lambda: PatchEmbed(4, patch_size=0), "patch_size must be positive"),
    (lambda: PositionEmbedding(init_std=-1), "init_std must be a non-negative number"),
    (lambda: TokenPool("max"), "mode must be 'mean' or 'cls'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_heads=3 does not divide the token width 8"):
        Sequential([MultiHeadSelfAttention(3)], input_shape=(4, 8))
    with pytest.raises(ValueError, match=r"expects tokens of shape \(T, D\), got \(1, 8, 8\); put a PatchEmbed"):
        Sequential([MultiHeadSelfAttention(2)], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"patch_size \(4, 4\) is larger than its input 3x8"):
        Sequential([PatchEmbed(8, 4)], input_shape=(1, 3, 8))
    with pytest.raises(ValueError, match=r"TokenPool expects tokens of shape \(T, D\), got \(5,\)"):
        Sequential([TokenPool()], input_shape=(5,))
    layer = Sequential([PositionEmbedding()], input_shape=(4, 5)).layers[0]
    with pytest.raises(ValueError, match=r"expects tokens of shape \(N, 4, 5\), got \(2, 3, 5\)"):
        layer.forward(torch.randn(2, 3, 5))
