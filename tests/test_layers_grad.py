"""Every layer's backward against float64 central finite differences and against torch autograd.

For each layer, N_CONFIGS configurations are drawn from a seeded RNG (batch sizes, channel counts, odd and
even spatial sizes, every stride and padding mode, with and without bias, train and eval mode); each is its
own test id. The scalar loss is L = sum(y * R) with a random R, so dL/dy = R.

- Finite differences: ``check_layer`` on every element of the input and of every parameter, float64, relative
  error (as defined in convdescent.diagnostics.gradcheck) at most 1e-7. Inputs of ReLU-like layers are drawn
  at least 0.1 away from 0 and max-pool inputs are distinct values spaced far more than the step apart, so
  no finite difference straddles a kink (and the test asserts none did).
- Autograd: the same layer against the equivalent torch.nn.functional computation, outputs and gradients,
  relative error max|a - b| / max|b| at most 1e-10 in float64 and 1e-4 in float32.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from convdescent import native
from convdescent.diagnostics import check_layer
from convdescent.layers import (GELU, AvgPool2D, BatchNorm1D, BatchNorm2D, ClassToken, Conv2D, Dense, Dropout,
                                Flatten, GlobalAvgPool2D, Layer, LayerNorm, LeakyReLU, MaxPool2D,
                                MultiHeadSelfAttention, PatchEmbed, PositionEmbedding, ReLU, Residual, Sigmoid,
                                SiLU, Softmax, Tanh, TokenPool, TorchModule)
from convdescent.layers.norm import _BatchNorm

N_CONFIGS = 50
FD_TOL = 1e-7
AUTOGRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# Kinks are kept >= 0.01 away, so a step of 1e-5 never crosses one; it has 10x less rounding error than 1e-6.
EPS = 1e-5


@dataclass
class Case:
    id: str
    make: Callable[[], Layer]
    input_shape: tuple
    batch: int
    train: bool
    x_kind: str = "normal"  # "normal", "away" (|x| >= 0.1) or "distinct" (all values distinct)
    max_kinks: int = 0      # only branches with hidden ReLUs, whose pre-activations are not controlled
    seed: int = 0
    extra: dict = field(default_factory=dict)


# -- drawing configurations ----------------------------------------------------------------------------
def _spatial(rng, lo=1, hi=7):
    return rng.randint(lo, hi), rng.randint(lo, hi)


def conv_cases():
    rng = random.Random(1001)
    paddings = ["valid", "same", "int", "pair"]
    strides = [(1, 1), (2, 2), (3, 3), (1, 2), (2, 1), (3, 2)]
    cases = []
    while len(cases) < N_CONFIGS:
        i = len(cases)
        kind = paddings[i % 4]
        stride = strides[(i // 4) % len(strides)]
        k = (rng.randint(1, 3), rng.randint(1, 3))
        padding = {"valid": "valid", "same": "same", "int": rng.randint(0, 2),
                   "pair": (rng.randint(0, 2), rng.randint(0, 2))}[kind]
        h, w = _spatial(rng, 1, 7)
        c, f, n = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3)
        bias = i % 3 != 2
        try:
            Conv2D(f, k, stride, padding).compute_output_shape((c, h, w))
        except ValueError:
            continue  # kernel larger than the padded input: drawn again
        cases.append(Case(f"conv{i}-n{n}c{c}f{f}-{h}x{w}-k{k[0]}x{k[1]}-s{stride[0]}x{stride[1]}-p{padding}-b{int(bias)}",
                          lambda f=f, k=k, s=stride, p=padding, b=bias: Conv2D(f, k, s, p, use_bias=b),
                          (c, h, w), n, train=bool(i % 2), seed=i))
    return cases


def conv_grouped_cases():
    """Groups (depthwise included) and dilation, with every padding mode and stride."""
    rng = random.Random(1017)
    paddings = ["valid", "same", "int", "pair"]
    cases = []
    while len(cases) < N_CONFIGS:
        i = len(cases)
        g = rng.randint(1, 3)
        c = g * rng.randint(1, 2)
        depthwise = i % 3 == 0
        if depthwise:
            g = c
        f = g * rng.randint(1, 2)
        k = (rng.randint(1, 3), rng.randint(1, 3))
        d = (rng.randint(1, 3), rng.randint(1, 2)) if i % 4 else (1, 1)
        stride = (rng.randint(1, 2), rng.randint(1, 3))
        kind = paddings[i % 4]
        padding = {"valid": "valid", "same": "same", "int": rng.randint(0, 2),
                   "pair": (rng.randint(0, 2), rng.randint(0, 3))}[kind]
        h, w = _spatial(rng, 2, 8)
        n, bias = rng.randint(1, 3), i % 3 != 2
        make = lambda f=f, k=k, s=stride, p=padding, b=bias, g=g, d=d: Conv2D(f, k, s, p, use_bias=b, groups=g,
                                                                              dilation=d)
        try:
            make().compute_output_shape((c, h, w))
        except ValueError:
            continue
        cases.append(Case(f"convg{i}-n{n}c{c}f{f}g{g}-{h}x{w}-k{k[0]}x{k[1]}-d{d[0]}x{d[1]}-s{stride[0]}x{stride[1]}"
                          f"-p{padding}-b{int(bias)}", make, (c, h, w), n, train=bool(i % 2), seed=i))
    return cases


def dense_token_cases():
    rng = random.Random(1018)
    cases = []
    for i in range(N_CONFIGS):
        n, t, d_in, units, bias = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 5), i % 3 != 2
        cases.append(Case(f"dense-tokens{i}-n{n}-t{t}-in{d_in}-out{units}-b{int(bias)}",
                          lambda u=units, b=bias: Dense(u, use_bias=b), (t, d_in), n, train=bool(i % 2), seed=i))
    return cases


def layernorm_cases():
    """Groups of at least 3 normalized values: with 2, xhat is +-1 and dL/dx is eps's tiny correction alone, a
    cancellation that float32 cannot resolve to the tolerance (in torch either)."""
    rng = random.Random(1019)
    cases = []
    for i in range(N_CONFIGS):
        n = rng.randint(1, 3)
        kind = i % 3
        if kind == 0:
            shape, dims = (rng.randint(1, 5), rng.randint(3, 6)), 1
        elif kind == 1:
            shape, dims = (rng.randint(3, 7),), 1
        else:
            shape = (rng.randint(1, 3),) + _spatial(rng, 1, 4)
            dims = rng.randint(1, 3)
            if math.prod(shape[3 - dims:]) < 3:
                shape = (shape[0], shape[1] + 2, shape[2] + 2)
        affine, eps = i % 4 != 3, [1e-5, 1e-3][i % 2]
        cases.append(Case(f"ln{i}-n{n}-{'x'.join(map(str, shape))}-dims{dims}-affine{int(affine)}-e{eps}",
                          lambda d=dims, a=affine, e=eps: LayerNorm(e, d, a), shape, n, train=bool(i % 2), seed=i))
    return cases


def attention_cases():
    rng = random.Random(1025)
    cases = []
    for i in range(N_CONFIGS):
        n, t, heads, width = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 3), rng.randint(1, 3)
        causal, bias = i % 2 == 1, i % 5 != 4
        cases.append(Case(f"mhsa{i}-n{n}-t{t}-h{heads}-e{width}-causal{int(causal)}-b{int(bias)}",
                          lambda h=heads, c=causal, b=bias: MultiHeadSelfAttention(h, causal=c, use_bias=b),
                          (t, heads * width), n, train=bool(i % 3 == 0), seed=i))
    return cases


def token_layer_cases():
    """PatchEmbed (patch sizes that do and do not tile the image), PositionEmbedding, ClassToken, TokenPool."""
    rng = random.Random(1026)
    cases = []
    for i in range(N_CONFIGS):
        n = rng.randint(1, 3)
        kind = i % 5
        if kind == 0:
            p = (rng.randint(1, 3), rng.randint(1, 3))
            c, h, w, d = rng.randint(1, 3), rng.randint(p[0], 7), rng.randint(p[1], 7), rng.randint(1, 5)
            bias = i % 3 != 2
            cases.append(Case(f"patch{i}-n{n}c{c}-{h}x{w}-p{p[0]}x{p[1]}-d{d}-b{int(bias)}",
                              lambda d=d, p=p, b=bias: PatchEmbed(d, p, use_bias=b), (c, h, w), n,
                              train=bool(i % 2), seed=i))
            continue
        shape = (rng.randint(1, 5), rng.randint(1, 5))
        make, label = {1: (PositionEmbedding, "pos"), 2: (ClassToken, "cls"),
                       3: (lambda: TokenPool("mean"), "pool-mean"), 4: (lambda: TokenPool("cls"), "pool-cls")}[kind]
        cases.append(Case(f"{label}{i}-n{n}-{shape[0]}x{shape[1]}", make, shape, n, train=bool(i % 2), seed=i))
    return cases


def dense_cases():
    rng = random.Random(1002)
    cases = []
    for i in range(N_CONFIGS):
        n, d_in, units, bias = rng.randint(1, 4), rng.randint(1, 7), rng.randint(1, 5), i % 3 != 2
        cases.append(Case(f"dense{i}-n{n}-in{d_in}-out{units}-b{int(bias)}",
                          lambda u=units, b=bias: Dense(u, use_bias=b), (d_in,), n, train=bool(i % 2), seed=i))
    return cases


def maxpool_cases():
    rng = random.Random(1003)
    paddings = ["valid", "same", "int"]
    cases = []
    while len(cases) < N_CONFIGS:
        i = len(cases)
        pool = (rng.randint(1, 3), rng.randint(1, 3))
        stride = None if i % 4 == 0 else (rng.randint(1, 3), rng.randint(1, 3))
        kind = paddings[i % 3]
        padding = {"valid": "valid", "same": "same",
                   "int": (rng.randint(0, pool[0] // 2), rng.randint(0, pool[1] // 2))}[kind]
        h, w = _spatial(rng, 1, 7)
        c, n = rng.randint(1, 3), rng.randint(1, 3)
        try:
            MaxPool2D(pool, stride, padding=padding).compute_output_shape((c, h, w))
        except ValueError:
            continue
        cases.append(Case(f"maxpool{i}-n{n}c{c}-{h}x{w}-p{pool[0]}x{pool[1]}-s{stride}-pad{padding}",
                          lambda p=pool, s=stride, pad=padding: MaxPool2D(p, s, padding=pad), (c, h, w), n,
                          train=bool(i % 2), x_kind="distinct", seed=i))
    return cases


def maxpool_dilated_cases():
    rng = random.Random(1020)
    paddings = ["valid", "same", "int"]
    cases = []
    while len(cases) < N_CONFIGS:
        i = len(cases)
        pool = (rng.randint(1, 3), rng.randint(1, 3))
        dil = (rng.randint(1, 3), rng.randint(1, 3))
        stride = None if i % 4 == 0 else (rng.randint(1, 3), rng.randint(1, 3))
        padding = {"valid": "valid", "same": "same",
                   "int": (rng.randint(0, pool[0] // 2), rng.randint(0, pool[1] // 2))}[paddings[i % 3]]
        h, w = _spatial(rng, 2, 9)
        c, n = rng.randint(1, 3), rng.randint(1, 3)
        make = lambda p=pool, s=stride, pad=padding, d=dil: MaxPool2D(p, s, padding=pad, dilation=d)
        try:
            make().compute_output_shape((c, h, w))
        except ValueError:
            continue
        cases.append(Case(f"maxpool-dil{i}-n{n}c{c}-{h}x{w}-p{pool[0]}x{pool[1]}-d{dil[0]}x{dil[1]}-s{stride}"
                          f"-pad{padding}", make, (c, h, w), n, train=bool(i % 2), x_kind="distinct", seed=i))
    return cases


def avgpool_padded_cases():
    rng = random.Random(1021)
    cases = []
    while len(cases) < N_CONFIGS:
        i = len(cases)
        pool = (rng.randint(1, 4), rng.randint(1, 4))
        pad = (rng.randint(0, pool[0] // 2), rng.randint(0, pool[1] // 2))
        stride = None if i % 4 == 0 else (rng.randint(1, 3), rng.randint(1, 3))
        include = i % 2 == 0
        h, w = _spatial(rng, 1, 7)
        c, n = rng.randint(1, 3), rng.randint(1, 3)
        make = lambda p=pool, s=stride, pad=pad, inc=include: AvgPool2D(p, s, padding=pad, count_include_pad=inc)
        try:
            make().compute_output_shape((c, h, w))
        except ValueError:
            continue
        cases.append(Case(f"avgpool-pad{i}-n{n}c{c}-{h}x{w}-p{pool[0]}x{pool[1]}-s{stride}-pad{pad}-inc{int(include)}",
                          make, (c, h, w), n, train=bool(i % 3 == 1), seed=i))
    return cases


def avgpool_cases():
    rng = random.Random(1004)
    cases = []
    while len(cases) < N_CONFIGS:
        i = len(cases)
        pool = (rng.randint(1, 3), rng.randint(1, 3))
        stride = None if i % 4 == 0 else (rng.randint(1, 3), rng.randint(1, 3))
        h, w = _spatial(rng, 1, 7)
        c, n = rng.randint(1, 3), rng.randint(1, 3)
        if h < pool[0] or w < pool[1]:
            continue
        cases.append(Case(f"avgpool{i}-n{n}c{c}-{h}x{w}-p{pool[0]}x{pool[1]}-s{stride}",
                          lambda p=pool, s=stride: AvgPool2D(p, s), (c, h, w), n, train=bool(i % 2), seed=i))
    return cases


def shape_cases(name, make, rng_seed, x_kind="normal", flat_ok=True, maps_only=False):
    """Configurations for layers that take any shape: flat (F,) or maps (C, H, W)."""
    rng = random.Random(rng_seed)
    cases = []
    for i in range(N_CONFIGS):
        n = rng.randint(1, 4)
        if maps_only or not flat_ok or i % 2:
            shape = (rng.randint(1, 3),) + _spatial(rng, 1, 5)
        else:
            shape = (rng.randint(1, 8),)
        cases.append(Case(f"{name}{i}-n{n}-{'x'.join(map(str, shape))}", make(rng), shape, n,
                          train=bool(i % 3 == 1), x_kind=x_kind, seed=i))
    return cases


def dropout_cases():
    rng = random.Random(1010)
    rates = [0.0, 0.1, 0.3, 0.5, 0.9]
    cases = []
    for i in range(N_CONFIGS):
        rate = rates[i % len(rates)]
        n = rng.randint(1, 4)
        shape = (rng.randint(1, 8),) if i % 2 else (rng.randint(1, 3),) + _spatial(rng, 1, 5)
        cases.append(Case(f"dropout{i}-r{rate}-n{n}-{'x'.join(map(str, shape))}",
                          lambda r=rate, s=i: Dropout(r, seed=s), shape, n, train=(i // 5) % 2 == 0, seed=i))
    return cases


def bn2d_cases():
    rng = random.Random(1011)
    momenta = [0.1, 0.5, None, 1.0]
    cases = []
    for i in range(N_CONFIGS):
        n, c = rng.randint(2, 3), rng.randint(1, 3)
        h, w = _spatial(rng, 1, 4)
        if n * h * w < 4:
            h, w = h + 1, w + 1  # at least 4 values per channel so the batch variance is not degenerate
        mom, eps = momenta[i % 4], [1e-5, 1e-3][i % 2]
        cases.append(Case(f"bn2d{i}-n{n}c{c}-{h}x{w}-m{mom}-e{eps}", lambda m=mom, e=eps: BatchNorm2D(m, e),
                          (c, h, w), n, train=(i // 2) % 2 == 0, seed=i))
    return cases


def bn1d_cases():
    rng = random.Random(1012)
    momenta = [0.1, 0.5, None]
    cases = []
    for i in range(N_CONFIGS):
        n = rng.randint(4, 6)
        shape = (rng.randint(1, 5),) if i % 3 else (rng.randint(1, 3), rng.randint(1, 3))
        mom, eps = momenta[i % 3], [1e-5, 1e-3][i % 2]
        cases.append(Case(f"bn1d{i}-n{n}-{'x'.join(map(str, shape))}-m{mom}-e{eps}",
                          lambda m=mom, e=eps: BatchNorm1D(m, e), shape, n, train=(i // 2) % 2 == 0, seed=i))
    return cases


def residual_cases():
    rng = random.Random(1013)
    cases = []
    for i in range(N_CONFIGS):
        n = rng.randint(2, 3)
        kind = i % 5
        if kind == 4:  # dense block on flat features
            d_in, d_out = rng.randint(1, 5), rng.randint(1, 5)
            proj = "auto" if d_in != d_out else rng.choice([None, "auto", True])
            make = lambda d=d_out, p=proj: Residual([Dense(d), Tanh(), Dense(d)], projection=p)
            shape, hidden = (d_in,), 0
        else:
            c, f = rng.randint(1, 2), rng.randint(1, 3)
            h, w = _spatial(rng, 2, 5)
            s = rng.choice([1, 2]) if kind >= 2 else 1
            proj = "auto" if (f != c or s != 1) else rng.choice([None, "auto", True])
            if kind == 0:
                make = lambda f=f, p=proj: Residual([Conv2D(f, 3, padding="same")], projection=p)
            elif kind == 1:
                make = lambda f=f, p=proj: Residual([Conv2D(f, 3, padding="same"), Tanh(),
                                                     Conv2D(f, (1, 3), padding="same")], projection=p)
            elif kind == 2:
                make = lambda f=f, s=s, p=proj: Residual([Conv2D(f, 3, stride=s, padding="same", use_bias=False),
                                                          BatchNorm2D(), ReLU(),
                                                          Conv2D(f, 3, padding="same")], projection=p)
            else:
                make = lambda f=f, s=s, p=proj: Residual([Conv2D(f, 2, stride=s, padding="same"), Sigmoid()],
                                                         projection=p)
            shape, hidden = (c, h, w), kind == 2
        cases.append(Case(f"residual{i}-kind{kind}-n{n}-{'x'.join(map(str, shape))}-proj{proj}", make, shape, n,
                          train=bool(i % 2), max_kinks=2 if hidden else 0, seed=i))
    return cases


def torch_module_cases():
    rng = random.Random(1014)
    cases = []
    for i in range(N_CONFIGS):
        n = rng.randint(2, 3)
        kind = i % 6
        c, h, w = rng.randint(1, 3), *_spatial(rng, 3, 5)
        if kind == 0:
            f, k = rng.randint(1, 3), rng.randint(1, 3)
            make, shape = (lambda c=c, f=f, k=k: TorchModule(torch.nn.Conv2d(c, f, k, padding=k // 2))), (c, h, w)
        elif kind == 1:
            d_in, d_out = rng.randint(1, 6), rng.randint(1, 4)
            make, shape = (lambda a=d_in, b=d_out: TorchModule("torch.nn.Linear", {"in_features": a,
                                                                                  "out_features": b})), (d_in,)
        elif kind == 2:
            make, shape = (lambda: TorchModule("torch.nn.GELU")), (c, h, w)
        elif kind == 3:
            make, shape = (lambda c=c: TorchModule(torch.nn.GroupNorm(1, c))), (c, h, w)
        elif kind == 4:
            make, shape = (lambda c=c: TorchModule(torch.nn.BatchNorm2d(c))), (c, h, w)
        else:
            make, shape = (lambda c=c: TorchModule(torch.nn.Sequential(torch.nn.Conv2d(c, 2, 3), torch.nn.Tanh(),
                                                                       torch.nn.Flatten()))), (c, h, w)
        cases.append(Case(f"torch{i}-kind{kind}-n{n}-{'x'.join(map(str, shape))}", make, shape, n,
                          train=bool(i % 2), seed=i))
    return cases


CASES = {
    "Conv2D": conv_cases(),
    "Dense": dense_cases(),
    "MaxPool2D": maxpool_cases(),
    "AvgPool2D": avgpool_cases(),
    "GlobalAvgPool2D": shape_cases("gap", lambda rng: GlobalAvgPool2D, 1005, maps_only=True),
    "Flatten": shape_cases("flatten", lambda rng: Flatten, 1006),
    "ReLU": shape_cases("relu", lambda rng: ReLU, 1007, x_kind="away"),
    "LeakyReLU": shape_cases("leaky", lambda rng: (lambda a=rng.choice([0.0, 0.01, 0.2, 1.5]): LeakyReLU(a)),
                             1008, x_kind="away"),
    "Tanh": shape_cases("tanh", lambda rng: Tanh, 1009),
    "Sigmoid": shape_cases("sigmoid", lambda rng: Sigmoid, 1015),
    "Softmax": shape_cases("softmax", lambda rng: Softmax, 1016, flat_ok=True),
    "Dropout": dropout_cases(),
    "BatchNorm2D": bn2d_cases(),
    "BatchNorm1D": bn1d_cases(),
    "Residual": residual_cases(),
    "Conv2D (groups, dilation)": conv_grouped_cases(),
    "MaxPool2D (dilation)": maxpool_dilated_cases(),
    "AvgPool2D (padding)": avgpool_padded_cases(),
    "Dense (tokens)": dense_token_cases(),
    "LayerNorm": layernorm_cases(),
    "GELU": shape_cases("gelu", lambda rng: GELU, 1022),
    "GELU (tanh)": shape_cases("gelu-tanh", lambda rng: (lambda: GELU("tanh")), 1023),
    "SiLU": shape_cases("silu", lambda rng: SiLU, 1024),
    "MultiHeadSelfAttention": attention_cases(),
    "PatchEmbed, PositionEmbedding, ClassToken, TokenPool": token_layer_cases(),
    "TorchModule": torch_module_cases(),
}
# Softmax is defined over the class axis of (N, K) inputs.
CASES["Softmax"] = [c for c in CASES["Softmax"] if len(c.input_shape) == 1] + [
    Case(f"softmax-extra{i}-n{1 + i % 4}-{2 + i % 7}", Softmax, (2 + i % 7,), 1 + i % 4, train=bool(i % 2), seed=100 + i)
    for i in range(N_CONFIGS - sum(len(c.input_shape) == 1 for c in CASES["Softmax"]))]

# Max pooling without padding and Conv2D's im2col run in native kernels when they are available; the same
# cases run again on the torch-op path (the reference and fallback) with the kernels turned off.
TORCH_OPS = {f"{name} (torch ops)": name for name in ("MaxPool2D", "Conv2D")}
for _label, _name in TORCH_OPS.items():
    CASES[_label] = [Case(c.id + "-torchops", c.make, c.input_shape, c.batch, c.train, c.x_kind, c.max_kinks,
                          c.seed, c.extra) for c in CASES[_name]]
# Conv2D runs on torch's convolution primitives; the same cases run again on its patches-only reference.
PATCHES = {f"{name} (patches)": name for name in ("Conv2D", "Conv2D (groups, dilation)")}
for _label, _name in PATCHES.items():
    CASES[_label] = [Case(c.id + "-patches", c.make, c.input_shape, c.batch, c.train, c.x_kind, c.max_kinks,
                          c.seed, c.extra) for c in CASES[_name]]
# Dense runs its products in native kernels only for large weights; these cases lower that threshold to zero
# so the same small shapes go through the native path too.
CASES["Dense (native)"] = [Case(c.id + "-native", c.make, c.input_shape, c.batch, c.train, c.x_kind, c.max_kinks,
                                c.seed, c.extra) for c in CASES["Dense"]]

ALL = [pytest.param(layer_name, case, id=case.id) for layer_name, cases in CASES.items() for case in cases]


# CI runs these tests once more with CONVDESCENT_NATIVE=0: then every case must take the torch-op path.
NATIVE_OFF = os.environ.get("CONVDESCENT_NATIVE") == "0"


@pytest.fixture(autouse=True)
def kernels_for_case(request, monkeypatch):
    """Turn the native kernels off for the torch-op cases, and require them everywhere else; the native
    Dense cases also require the BLAS the dense kernels call. With CONVDESCENT_NATIVE=0 require them absent."""
    params = getattr(request.node, "callspec", None)
    name = params.params.get("layer_name") if params is not None else None
    torch_ops = name in TORCH_OPS
    if name in PATCHES:
        monkeypatch.setattr(Conv2D, "USE_PRIMITIVES", False)
    if NATIVE_OFF:
        assert native.library() is None and "CONVDESCENT_NATIVE=0" in native.status()
        if name == "Dense (native)":
            assert native.gemm(torch.float64) is None
            monkeypatch.setattr(Dense, "NATIVE_MIN_WEIGHT", 0)
        yield
        return
    if not torch_ops:
        assert native.library() is not None, native.status()
    previous = native.set_enabled(not torch_ops)
    if name == "Dense (native)":
        assert native.gemm(torch.float64) is not None and native.gemm(torch.float32) is not None
        monkeypatch.setattr(Dense, "NATIVE_MIN_WEIGHT", 0)
    yield
    native.set_enabled(previous)


def assert_path(layer_name, layer, x):
    """The native Dense cases must really take the native path (the torch path when switched off)."""
    if layer_name == "Dense (native)":
        assert (layer._native("cd_dense_fwd", x) is None) == NATIVE_OFF


# -- building a case ---------------------------------------------------------------------------------
def _walk(layer):
    yield layer
    for sub in layer.sublayers():
        yield from _walk(sub)


def build_case(case: Case, dtype=torch.float64):
    """The built layer (random biases and batch-norm state), its input x and the upstream gradient R."""
    gen = torch.Generator().manual_seed(10_000 + case.seed)
    layer = case.make()
    layer.name = "layer"
    layer.build(case.input_shape, generator=gen, dtype=dtype)
    with torch.no_grad():
        for sub in _walk(layer):
            if isinstance(sub, _BatchNorm):
                sub.params["weight"].copy_(torch.rand(sub.num_features, generator=gen, dtype=dtype) + 0.5)
                sub.params["bias"].copy_(torch.randn(sub.num_features, generator=gen, dtype=dtype))
                sub.running_mean.copy_(torch.randn(sub.num_features, generator=gen, dtype=dtype) * 0.5)
                sub.running_var.copy_(torch.rand(sub.num_features, generator=gen, dtype=dtype) + 0.5)
                sub.num_batches_tracked.fill_(3)
            elif not isinstance(sub, TorchModule):
                # biases start at zero and LayerNorm's weight at one: random values so that no term of their
                # gradients hides behind a zero or a one
                for key, value in sub.params.items():
                    if key.endswith("bias"):
                        value.copy_(torch.randn(value.shape, generator=gen, dtype=dtype) * 0.5)
                    elif isinstance(sub, LayerNorm):
                        value.copy_(torch.rand(value.shape, generator=gen, dtype=dtype) + 0.5)
    shape = (case.batch,) + tuple(case.input_shape)
    if case.x_kind == "away":
        mag = torch.rand(shape, generator=gen, dtype=dtype) * 1.4 + 0.1
        sign = torch.randint(0, 2, shape, generator=gen).to(dtype) * 2 - 1
        x = mag * sign
    elif case.x_kind == "distinct":
        numel = math.prod(shape)
        x = (torch.randperm(numel, generator=gen).to(dtype) / numel - 0.5).reshape(shape) * 4  # spacing 4/numel
    else:
        x = torch.randn(shape, generator=gen, dtype=dtype)
    out_shape = (case.batch,) + tuple(layer.output_shape)
    r = torch.randn(out_shape, generator=gen, dtype=dtype)
    return layer, x, r


# -- the torch.nn.functional references --------------------------------------------------------------
def same_pads(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def explicit_pads(padding, kernel, stride, h, w):
    """(left, right, top, bottom) for F.pad, recomputed here from the padding argument."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        (pt, pb), (pl, pr) = same_pads(h, kernel[0], stride[0]), same_pads(w, kernel[1], stride[1])
        return pl, pr, pt, pb
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return pw, pw, ph, ph


def reference(layer, x, params, buffers, train, y_engine, prefix=""):
    """The layer's computation in torch.nn.functional, differentiable by autograd."""
    p = lambda key: params.get(prefix + key)
    if isinstance(layer, Conv2D):
        reach = tuple(d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation))
        pads = explicit_pads(layer.padding, reach, layer.stride, x.shape[2], x.shape[3])
        return F.conv2d(F.pad(x, pads), p("weight"), p("bias"), stride=layer.stride, groups=layer.groups,
                        dilation=layer.dilation)
    if isinstance(layer, Dense):
        return F.linear(x, p("weight"), p("bias"))
    if isinstance(layer, MaxPool2D):
        reach = tuple(d * (k - 1) + 1 for k, d in zip(layer.pool_size, layer.dilation))
        pads = explicit_pads(layer.padding, reach, layer.stride, x.shape[2], x.shape[3])
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), layer.pool_size, layer.stride,
                            dilation=layer.dilation)
    if isinstance(layer, AvgPool2D):
        return F.avg_pool2d(x, layer.pool_size, layer.stride, padding=layer.padding,
                            count_include_pad=layer.count_include_pad)
    if isinstance(layer, LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, p("weight"), p("bias"), eps=layer.eps)
    if isinstance(layer, MultiHeadSelfAttention):
        n, t, d = x.shape
        h = layer.num_heads
        q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2)
                   for z in F.linear(x, p("in_proj_weight"), p("in_proj_bias")).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=layer.causal).transpose(1, 2).reshape(n, t, d)
        return F.linear(o, p("out_proj.weight"), p("out_proj.bias"))
    if isinstance(layer, PatchEmbed):
        return F.conv2d(x, p("weight"), p("bias"), stride=layer.patch_size).flatten(2).transpose(1, 2)
    if isinstance(layer, PositionEmbedding):
        return x + p("weight")
    if isinstance(layer, ClassToken):
        return torch.cat([p("token").expand(x.shape[0], 1, -1), x], dim=1)
    if isinstance(layer, TokenPool):
        return x.mean(dim=1) if layer.mode == "mean" else x[:, 0]
    if isinstance(layer, GELU):
        return F.gelu(x, approximate=layer.approximate)
    if isinstance(layer, SiLU):
        return F.silu(x)
    if isinstance(layer, GlobalAvgPool2D):
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
    if isinstance(layer, Flatten):
        return torch.flatten(x, 1)
    if isinstance(layer, LeakyReLU):
        return F.leaky_relu(x, layer.negative_slope)
    if isinstance(layer, ReLU):
        return F.relu(x)
    if isinstance(layer, Tanh):
        return torch.tanh(x)
    if isinstance(layer, Sigmoid):
        return torch.sigmoid(x)
    if isinstance(layer, Softmax):
        return F.softmax(x, dim=1)
    if isinstance(layer, Dropout):
        if not train or layer.rate == 0:
            return x
        kept = (y_engine != 0).to(x.dtype)  # inputs are nonzero, so a zero output means a dropped unit
        return x * kept / (1 - layer.rate)
    if isinstance(layer, _BatchNorm):
        rm, rv = buffers[prefix + "running_mean"], buffers[prefix + "running_var"]
        nbt = buffers[prefix + "num_batches_tracked"]
        momentum = layer.momentum if layer.momentum is not None else 1.0 / (float(nbt) + 1)
        return F.batch_norm(x, rm, rv, p("weight"), p("bias"), training=train, momentum=momentum, eps=layer.eps)
    if isinstance(layer, Residual):
        h = x
        for sub in layer.layers:
            h = reference(sub, h, params, buffers, train, None, f"{prefix}{sub.name}.")
        skip = x if layer.projection is None else reference(layer.projection, x, params, buffers, train, None,
                                                            f"{prefix}projection.")
        return h + skip
    if isinstance(layer, TorchModule):
        layer.module.train(train)
        own = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        return torch.func.functional_call(layer.module, own, (x,))
    raise AssertionError(f"no reference for {type(layer).__name__}")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    return float((a - b).abs().max()) / scale if a.numel() else 0.0


# -- the tests -----------------------------------------------------------------------------------------
# tiny shapes: one thread is as fast, and immune to a busy machine's thread contention
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layer_name,case", ALL)
def test_backward_matches_finite_differences(layer_name, case):
    layer, x, r = build_case(case)
    assert_path(layer_name, layer, x)
    results = check_layer(layer, case.input_shape, batch_size=case.batch, train=case.train, x=x, upstream=r,
                          eps=EPS, max_elements=None)
    assert {res.name for res in results} == {"input"} | {f"layer.{n}" for n, _ in layer.named_params()}
    for res in results:
        assert res.checked == math.prod(res.shape), f"{case.id}: {res.name} not fully checked"
        assert res.kinks <= case.max_kinks, f"{case.id}: {res.name} crossed {res.kinks} kinks"
        assert res.max_rel_error <= FD_TOL, f"{case.id}: {res.name} finite-difference error {res}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layer_name,case", ALL)
def test_backward_matches_autograd(layer_name, case, dtype):
    layer, x, r = build_case(case, dtype=dtype)
    assert_path(layer_name, layer, x)
    tol = AUTOGRAD_TOL[dtype]
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    y = layer.forward(x, case.train)
    dx = layer.backward(r)
    grads = {n: g.clone() for n, g in layer.named_grads()}
    leaves = {n: p.detach().clone().requires_grad_() for n, p in layer.named_params()}
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        yr = reference(layer, xr, leaves, buffers, case.train, y)
        assert yr.shape == y.shape, f"{case.id}: output shape {tuple(y.shape)} vs torch {tuple(yr.shape)}"
        (yr * r).sum().backward()
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_error(y, yr.detach()) <= tol, f"{case.id}: forward differs from torch"
    assert rel_error(dx, xr.grad) <= tol, f"{case.id}: dL/dx differs from autograd"
    assert set(grads) == set(leaves)
    for name, leaf in leaves.items():
        assert grads[name].shape == leaf.shape
        assert rel_error(grads[name], leaf.grad) <= tol, f"{case.id}: dL/d{name} differs from autograd"
    # Batch norm's running statistics move as torch's. A running mean can land near 0 by cancellation, so its
    # error is measured against the statistics' unit scale rather than its own size.
    for name, buf in layer.named_buffers():
        if not isinstance(layer, TorchModule) and name in buffers and buf.is_floating_point():
            err = float((buf - buffers[name]).abs().max())
            assert err <= tol * max(1.0, float(buffers[name].abs().max())), \
                f"{case.id}: buffer {name} differs from torch by {err}"
