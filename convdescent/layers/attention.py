"""Multi-head self-attention (Vaswani et al. 2017, "Attention Is All You Need") with its backward written out.

For tokens x of shape (N, T, D), H heads of width e = D / H, the input projection W_in (3D, D), b_in (3D,)
and the output projection (a Dense sublayer, ``out_proj``):

    [q | k | v] = x W_in^T + b_in                each (N, T, D), split into heads (N, H, T, e)
    S = q k^T / sqrt(e)                           (N, H, T, T); S[.., i, j] = -inf for j > i when causal
    P = softmax(S) over the last axis             each row sums to 1
    O = P v                                       (N, H, T, e), heads merged back to (N, T, D)
    y = out_proj(O) = O W_out^T + b_out

Backward, with delta = dL/dy (derived in docs/gradients.md):

    dO = out_proj.backward(delta)                 (dW_out, db_out as in Dense)
    dP = dO v^T,   dv = P^T dO
    dS = P * (dP - rowsum(dP * P))                the softmax's Jacobian applied row by row
    dq = dS k / sqrt(e),   dk = dS^T q / sqrt(e)
    dW_in = [dq | dk | dv]^T x,   db_in = sum [dq | dk | dv],   dx = [dq | dk | dv] W_in

A masked entry has P = 0, so its dS is 0 and no gradient flows through it. Parameter names and layouts are
``torch.nn.MultiheadAttention``'s (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
``out_proj.bias``), so ``to_torch()`` gives one with an identical state_dict.
"""

from __future__ import annotations

import math

import torch

from .. import init as initializers
from .base import Layer
from .dense import Dense


class SelfAttentionModule(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` (batch first) used as self-attention: forward(x) = attn(x, x, x)[0]."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, causal: bool = False):
        super().__init__(embed_dim, num_heads, bias=bias, batch_first=True)
        self.causal = causal

    def forward(self, x):  # noqa: D102 - the class docstring says it
        mask = None
        if self.causal:
            t = x.shape[1]
            mask = torch.ones((t, t), dtype=torch.bool, device=x.device).triu(1)  # True: not attended
        return super().forward(x, x, x, need_weights=False, attn_mask=mask)[0]


class MultiHeadSelfAttention(Layer):
    """Scaled dot-product self-attention over tokens with ``num_heads`` heads and q/k/v/output projections.

    Args:
        num_heads: H; must divide the token width D.
        causal: when True, token i attends only to tokens j <= i.
        use_bias: whether the projections have biases.
        kernel_init, bias_init: initializers of the projections' weights and biases (default Glorot
            uniform / zeros; the input projection's (3D, D) weight is drawn as one matrix, as torch does).

    Shapes: (N, T, D) -> (N, T, D); params ``in_proj_weight`` (3D, D), ``in_proj_bias`` (3D,),
    ``out_proj.weight`` (D, D), ``out_proj.bias`` (D,).
    """

    kind = "attention"
    samplewise = True

    def __init__(self, num_heads: int, causal: bool = False, use_bias: bool = True,
                 kernel_init="glorot_uniform", bias_init="zeros", name: str | None = None):
        super().__init__(name)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        self.num_heads = num_heads
        self.causal = causal
        self.use_bias = bool(use_bias)
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        initializers.get_initializer(kernel_init)
        initializers.get_initializer(bias_init)
        self.out_proj: Dense | None = None  # built with the token width

    def sublayers(self):
        return [self.out_proj] if self.out_proj is not None else []

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"MultiHeadSelfAttention expects tokens of shape (T, D), got {tuple(input_shape)}; "
                             f"put a PatchEmbed before it")
        d = input_shape[1]
        if d % self.num_heads:
            raise ValueError(f"MultiHeadSelfAttention '{self.name}': num_heads={self.num_heads} does not divide "
                             f"the token width {d}; pick a width that is a multiple of the heads")
        return tuple(input_shape)

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        d = input_shape[1]
        self.params["in_proj_weight"] = initializers.get_initializer(self.kernel_init)((3 * d, d), generator,
                                                                                        dtype, device)
        if self.use_bias:
            self.params["in_proj_bias"] = initializers.get_initializer(self.bias_init)((3 * d,), generator,
                                                                                        dtype, device)
        self.out_proj = Dense(d, use_bias=self.use_bias, kernel_init=self.kernel_init, bias_init=self.bias_init,
                              name="out_proj")
        self.out_proj.build((input_shape[0], d), generator=generator, dtype=dtype, device=device)
        return out

    def to(self, device=None, dtype=None):
        super().to(device=device, dtype=dtype)
        self.out_proj.to(device=device, dtype=dtype)
        return self

    def forward(self, x, train=False):
        if x.dim() != 3 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"MultiHeadSelfAttention '{self.name}' expects tokens of shape (N, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        n, t, d = x.shape
        h = self.num_heads
        e = d // h
        x2 = x.reshape(n * t, d)
        w = self.params["in_proj_weight"]
        qkv = torch.addmm(self.params["in_proj_bias"], x2, w.t()) if self.use_bias else x2 @ w.t()
        q, k, v = qkv.view(n, t, 3, h, e).permute(2, 0, 3, 1, 4)  # each (N, H, T, e)
        scale = 1.0 / math.sqrt(e)
        s = (q @ k.transpose(-1, -2)).mul_(scale)  # (N, H, T, T)
        if self.causal:
            s.masked_fill_(torch.ones((t, t), dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = (p @ v).permute(0, 2, 1, 3).reshape(n, t, d)
        self.out_proj.training = train
        self._cache = (x2, q, k, v, p)
        return self.out_proj.forward(o, train)

    def backward(self, dy):
        x2, q, k, v, p = self._cache
        self._cache = None
        n, h, t, e = q.shape
        d = h * e
        do = self.out_proj.backward(dy)                      # (N, T, D)
        do = do.reshape(n, t, h, e).permute(0, 2, 1, 3)      # (N, H, T, e)
        dp = do @ v.transpose(-1, -2)                        # (N, H, T, T)
        dv = p.transpose(-1, -2) @ do
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
        scale = 1.0 / math.sqrt(e)
        dq = (ds @ k).mul_(scale)
        dk = (ds.transpose(-1, -2) @ q).mul_(scale)
        dqkv = torch.stack((dq, dk, dv)).permute(1, 3, 0, 2, 4).reshape(n * t, 3 * d)
        if self.trainable:  # frozen: dL/dx only (out_proj follows its own flag)
            self.grads["in_proj_weight"] = dqkv.t() @ x2
            if self.use_bias:
                self.grads["in_proj_bias"] = dqkv.sum(0)
        if not self.needs_input_grad:
            return None
        return (dqkv @ self.params["in_proj_weight"]).view(n, t, d)

    def get_config(self):
        return {"num_heads": self.num_heads, "causal": self.causal, "use_bias": self.use_bias,
                "kernel_init": initializers.initializer_name(self.kernel_init),
                "bias_init": initializers.initializer_name(self.bias_init), "name": self.name}

    def to_torch(self):
        d = self.input_shape[1]
        w = self.params["in_proj_weight"]
        module = SelfAttentionModule(d, self.num_heads, bias=self.use_bias, causal=self.causal)
        module = module.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.in_proj_weight.copy_(w)
            module.out_proj.weight.copy_(self.out_proj.params["weight"])
            if self.use_bias:
                module.in_proj_bias.copy_(self.params["in_proj_bias"])
                module.out_proj.bias.copy_(self.out_proj.params["bias"])
        return module
