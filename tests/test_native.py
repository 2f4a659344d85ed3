"""The native max-pool kernel against the torch-op path and torch, and the build's fallbacks."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from convdescent import allocator, native
from convdescent.layers import MaxPool2D

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def kernels_on():
    assert native.library() is not None, native.status()
    previous = native.set_enabled(True)
    yield
    native.set_enabled(previous)


def _run(layer, x, dy, enabled):
    previous = native.set_enabled(enabled)
    try:
        y = layer.forward(x, True)
        kind = "native" if layer._cache[0] == "native" else "torch"
        dx = layer.backward(dy)
    finally:
        native.set_enabled(previous)
    return y, dx, kind


def _cases(count=60):
    rng = random.Random(7)
    out = []
    while len(out) < count:
        i = len(out)
        pool = (rng.randint(1, 4), rng.randint(1, 4))
        stride = pool if i % 3 == 0 else (rng.randint(1, 4), rng.randint(1, 4))
        c = rng.choice([1, 2, 3, 8, 32, 257, 300])  # past the kernel's 256-channel block
        h, w = rng.randint(pool[0], 12), rng.randint(pool[1], 12)
        n = rng.randint(1, 4)
        dtype = torch.float64 if i % 2 else torch.float32
        x_layout = rng.choice(["nchw", "channels_last", "strided"])
        dy_layout = rng.choice(["nchw", "channels_last", "transposed"])
        ties = i % 5 == 0
        out.append(pytest.param(pool, stride, (n, c, h, w), dtype, x_layout, dy_layout, ties,
                                id=f"case{i}-p{pool}-s{stride}-{n}x{c}x{h}x{w}-{str(dtype)[6:]}-{x_layout}-"
                                   f"{dy_layout}{'-ties' if ties else ''}"))
    return out


def _layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # every other element of a wider tensor
        wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "transposed":  # the layout Flatten's backward hands over from Dense: (C*H*W, N) in memory
        n = t.shape[0]
        return t.reshape(n, -1).t().contiguous().t().unflatten(1, t.shape[1:])
    return t.contiguous()


@pytest.mark.parametrize("pool,stride,shape,dtype,x_layout,dy_layout,ties", _cases())
def test_native_maxpool_matches_torch_ops_and_torch(kernels_on, pool, stride, shape, dtype, x_layout, dy_layout,
                                                    ties):
    gen = torch.Generator().manual_seed(hash((pool, stride, shape)) % 2**31)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if ties:
        x = x.round()  # many equal values: the first maximum in row-major window order must win, as in torch
    x = _layout(x, x_layout)
    layer = MaxPool2D(pool, stride)
    layer.build(shape[1:])
    dy = _layout(torch.randn(layer.compute_output_shape(shape[1:]) and (shape[0], *layer.output_shape),
                             generator=gen, dtype=dtype), dy_layout)
    y_nat, dx_nat, kind_nat = _run(layer, x, dy, True)
    y_ref, dx_ref, kind_ref = _run(layer, x, dy, False)
    assert (kind_nat, kind_ref) == ("native", "torch")
    assert torch.equal(y_nat, y_ref)
    torch.testing.assert_close(dx_nat, dx_ref, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    xr = x.detach().clone().requires_grad_()
    with torch.enable_grad():
        yr = F.max_pool2d(xr, pool, stride)
        (yr * dy).sum().backward()
    assert torch.equal(y_nat, yr.detach())
    torch.testing.assert_close(dx_nat, xr.grad, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    if pool[0] <= stride[0] and pool[1] <= stride[1]:
        # no overlap: every input element receives at most one window's gradient, so the values are exact
        assert torch.equal(dx_nat, xr.grad)


def test_native_maxpool_propagates_nan_like_torch(kernels_on):
    x = torch.randn(2, 3, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    x[1, 2, 1, 1] = float("nan")  # two NaNs in one window: the first one wins
    layer = MaxPool2D(2)
    layer.build((3, 6, 6))
    y = layer.forward(x, True)
    assert layer._cache[0] == "native"
    ref, idx = F.max_pool2d_with_indices(x, 2)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())
    dx = layer.backward(torch.ones_like(y))
    expected = torch.zeros(2, 3, 36).scatter_(2, idx.flatten(2), 1.0).view(2, 3, 6, 6)
    assert torch.equal(dx, expected)


def test_padded_pooling_keeps_the_torch_op_path(kernels_on):
    layer = MaxPool2D(3, stride=2, padding=1)
    layer.build((2, 7, 7))
    layer.forward(torch.randn(1, 2, 7, 7), True)
    assert layer._cache[0] != "native"


def test_backward_after_the_kernels_are_turned_off_uses_the_recorded_winners(kernels_on):
    x = torch.randn(3, 5, 9, 8, dtype=torch.float64)
    layer = MaxPool2D((3, 2), stride=(2, 3))
    layer.build((5, 9, 8))
    y = layer.forward(x, True)
    dy = torch.randn_like(y)
    native.set_enabled(False)
    dx = layer.backward(dy)
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        (F.max_pool2d(xr, (3, 2), (2, 3)) * dy).sum().backward()
    torch.testing.assert_close(dx, xr.grad, rtol=0, atol=1e-12)


def test_kernels_can_be_turned_off_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_ERROR", None)
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setenv("CONVDESCENT_NATIVE", "0")
    assert native.library() is None
    assert "CONVDESCENT_NATIVE=0" in native.status()


def test_other_dtypes_and_devices_use_the_torch_op_path(kernels_on):
    assert native.kernel("cd_maxpool_fwd", torch.zeros(2, dtype=torch.float16)) is None
    assert native.kernel("cd_maxpool_fwd", torch.zeros(2, device="meta")) is None
    assert native.kernel("cd_maxpool_fwd", torch.zeros(2)) is not None


_RETAINED = """
import os, torch
from convdescent import allocator
applied = allocator.tune()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
x = torch.empty(4 * 2**20).fill_(1.0)  # 16 MB, above glibc's default mmap threshold
before = rss()
del x
print(applied, before - rss())
"""


def _released_mb(tuning: str) -> tuple[str, float]:
    """(whether the tuning was applied, MB the resident size fell by when a 16 MB tensor was freed); a few
    pages the interpreter takes meanwhile can make it slightly negative."""
    env = dict(os.environ, CONVDESCENT_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", _RETAINED], env=env, capture_output=True, text=True, check=True)
    applied, released = out.stdout.split()
    return applied, int(released) / 2**20


def test_allocator_tuning_keeps_freed_blocks_in_the_process():
    """Freeing a 16 MB tensor: with glibc's defaults its pages go back to the kernel at once (and the next
    step's allocation faults them in again, hundreds of pages per training step); tuned, they stay."""
    applied, kept = _released_mb("1")
    off, released = _released_mb("0")
    assert (applied, off) == ("True", "False")
    assert released >= 15, f"untuned: freeing 16 MB gave back only {released:.2f} MB"
    assert kept < 1, f"tuned: freeing 16 MB gave back {kept:.2f} MB"  # 0, give or take a few pages
    assert allocator.tune() is allocator.tune()  # once per process; asking again changes nothing


def _conv_cases(count=40):
    rng = random.Random(11)
    out = []
    for i in range(count):
        k = (rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        padding = rng.choice(["valid", "same", (rng.randint(0, 2), rng.randint(0, 2))])
        c, f = rng.choice([1, 2, 3, 8]), rng.choice([1, 4, 16])
        h, w = rng.randint(k[0], 12), rng.randint(k[1], 12)
        n = rng.randint(1, 4)
        layout = rng.choice(["nchw", "channels_last", "strided"])
        dtype = torch.float64 if i % 2 else torch.float32
        out.append(pytest.param(k, stride, padding, (n, c, h, w), f, layout, dtype,
                                id=f"conv{i}-k{k}-s{stride}-{padding}-{n}x{c}x{h}x{w}-f{f}-{layout}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("kernel,stride,padding,shape,filters,layout,dtype", _conv_cases())
def test_native_im2col_gives_the_same_convolution(kernels_on, kernel, stride, padding, shape, filters, layout,
                                                  dtype):
    from convdescent.layers import Conv2D

    layer = Conv2D(filters, kernel, stride, padding)
    layer.build(shape[1:], generator=torch.Generator().manual_seed(3), dtype=dtype)
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=dtype), layout)
    dy = torch.randn((shape[0], *layer.output_shape), generator=torch.Generator().manual_seed(5), dtype=dtype)
    results = []
    for enabled in (True, False):
        native.set_enabled(enabled)
        y = layer.forward(x, True)
        dx = layer.backward(dy)
        results.append((y, dx, {k: g.clone() for k, g in layer.grads.items()}))
    native.set_enabled(True)
    (y1, dx1, g1), (y2, dx2, g2) = results
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)  # the same matrix products on the same cols
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def _fusion_cases(count=30):
    from convdescent.layers import Conv2D

    rng = random.Random(23)
    out = []
    while len(out) < count:
        i = len(out)
        k = (rng.randint(1, 3), rng.randint(1, 3))
        c = rng.choice([1, 2, 3])
        f = rng.choice([1, 5, 16, 32, 33, 70])  # whole vector blocks, partial ones, both
        pool = (rng.randint(1, 3), rng.randint(1, 3))
        pstride = pool if i % 2 else (rng.randint(1, 3), rng.randint(1, 3))
        cstride = rng.choice([1, 1, 2])
        padding = rng.choice(["valid", "same"])
        relu = i % 3 != 0
        h, w = rng.randint(6, 13), rng.randint(6, 13)
        conv_out = Conv2D(f, k, cstride, padding).compute_output_shape((c, h, w))
        if conv_out[1] < pool[0] or conv_out[2] < pool[1]:
            continue  # the pool would not fit: draw again
        out.append(pytest.param(k, c, f, pool, pstride, cstride, padding, relu, (h, w),
                                id=f"fuse{i}-k{k}-c{c}-f{f}-p{pool}-ps{pstride}-cs{cstride}-{padding}"
                                   f"{'-relu' if relu else ''}-{h}x{w}"))
    return out


@pytest.mark.parametrize("input_grad", [True, False], ids=["with-dx", "first-layer"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kernel,c,filters,pool,pstride,cstride,padding,relu,hw", _fusion_cases())
def test_conv_then_maxpool_fused_passes_match_the_layers_one_by_one(kernels_on, monkeypatch, kernel, c, filters,
                                                                    pool, pstride, cstride, padding, relu, hw,
                                                                    dtype, input_grad):
    """The fused node's forward (ConvPool) and, for a first layer, its fused backward against the same layers
    run one by one (fusion off)."""
    from convdescent import Flatten, ReLU, Sequential, SoftmaxCrossEntropy
    from convdescent.layers import Conv2D, Dense
    from convdescent.plan import ConvPool

    layers = [Conv2D(filters, kernel, cstride, padding)] + ([ReLU()] if relu else []) + [MaxPool2D(pool, pstride)]
    model = Sequential(layers + [Flatten(), Dense(4)], input_shape=(c, *hw), seed=2, dtype=dtype)
    with torch.no_grad():
        model.params()["conv1.bias"].normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, c, *hw, generator=torch.Generator().manual_seed(9), dtype=dtype)
    y = torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(10))
    runs = []
    forward_calls, backward_calls = [], []
    fused_forward, fused_backward = ConvPool._fused_forward, ConvPool._fused_backward

    def counted_forward(self, *args):
        out = fused_forward(self, *args)
        forward_calls.append(out is not None)
        return out

    def counted_backward(self, *args):
        done = fused_backward(self, *args)
        backward_calls.append(done)
        return done

    monkeypatch.setattr(ConvPool, "_fused_forward", counted_forward)
    monkeypatch.setattr(ConvPool, "_fused_backward", counted_backward)
    for fused in (True, False):
        model.set_fusion(fused)
        assert isinstance(model.plan().nodes[0], ConvPool) == fused
        model.chunk_size = 2  # fused: one pass (nothing left to chunk); unfused: chunks of 2
        logits = model.forward(x, train=True)
        loss, dlogits = SoftmaxCrossEntropy()(logits, y)
        model.set_input_grad(input_grad)
        dx = model.backward(dlogits)
        runs.append((logits, dx, {k: g.clone() for k, g in model.grads().items()}))
        if fused:
            assert forward_calls and all(forward_calls), "the fused forward did not run"
            assert any(backward_calls) == (not input_grad), "the fused backward ran when it should not, or not"
            forward_calls.clear()
    assert not any(forward_calls), "the fused forward ran with fusion turned off"
    (l1, dx1, g1), (l2, dx2, g2) = runs
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(l1, l2, rtol=tol, atol=tol)
    if input_grad:
        torch.testing.assert_close(dx1, dx2, rtol=tol, atol=tol)
    else:
        assert dx1 is None and dx2 is None
    for k in g1:
        if k.startswith("conv"):  # the weight's own layout on both paths (size-1 axes may differ in stride)
            assert g1[k].is_contiguous() and g2[k].is_contiguous(), k
        else:
            assert g1[k].stride() == g2[k].stride(), k
        torch.testing.assert_close(g1[k], g2[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("filters,by_filters", [(32, True), (16, True), (5, False)])
def test_fused_conv_pool_gives_the_same_numbers_on_any_thread_count(kernels_on, filters, by_filters, dtype):
    """The fused passes give threads runs of filters where the filters split evenly over them and runs of
    samples otherwise; ``by_filters`` says which the backward takes on 2 and 3 threads (32 or 16 filters:
    filters; 5: samples). The forward is the same bit for bit on 1, 2 and 3 threads either way; dW and db are
    too when the backward splits by filters (each filter summed over every sample by one thread, as one thread
    sums it), and equal to rounding when it splits by samples."""
    from convdescent.layers import Conv2D, ReLU
    from convdescent.plan import ConvPool

    x = torch.randn(7, 1, 14, 12, generator=torch.Generator().manual_seed(3), dtype=dtype)
    conv, pool = Conv2D(filters, 3), MaxPool2D(2)
    conv.build((1, 14, 12), generator=torch.Generator().manual_seed(4), dtype=dtype)
    pool.build(conv.output_shape)
    conv.params["bias"].normal_(generator=torch.Generator().manual_seed(5))
    conv.needs_input_grad = False
    node = ConvPool(("conv1", conv), ("relu1", ReLU()), ("pool1", pool))
    dy = torch.randn(7, filters, 6, 5, generator=torch.Generator().manual_seed(6), dtype=dtype)
    previous = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = node.forward(x, True).clone()
            assert node._cache[0] == "fused"
            assert node.backward(dy) is None
            runs.append((y, conv.grads["weight"].clone(), conv.grads["bias"].clone()))
    finally:
        torch.set_num_threads(previous)
    (y1, w1, b1), *others = runs
    for y, w, b in others:
        assert torch.equal(y, y1)
        if by_filters:
            assert torch.equal(w, w1) and torch.equal(b, b1)
        else:
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(w, w1, rtol=tol, atol=tol)
            torch.testing.assert_close(b, b1, rtol=tol, atol=tol)


def test_a_hook_on_the_conv_splits_its_fused_node(kernels_on):
    from convdescent import Flatten, ReLU, Sequential
    from convdescent.layers import Conv2D, Dense

    model = Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(3)], input_shape=(1, 10, 10), seed=0)
    model.set_fusion(True)  # about the fused nodes, whatever CONVDESCENT_FUSION says
    assert model.plan().nodes[0].label == "conv1+relu1+pool1"
    seen = []
    handle = model.register_hook("after_forward", lambda name, layer, out: seen.append((name, out.shape)),
                                 layer="conv1")
    assert model.plan().nodes[0].label == "conv1"
    assert "conv1+relu1+pool1: not fused" in str(model.plan())
    model.forward(torch.randn(2, 1, 10, 10), train=True)
    assert seen == [("conv1", (2, 4, 8, 8))]
    handle.remove()
    # a hook that must not split sees nothing of the conv, and the node stays fused
    model.register_hook("after_forward", lambda name, layer, out: seen.append((name, out.shape)), layer="conv1",
                        split=False)
    assert model.plan().nodes[0].label == "conv1+relu1+pool1"
    assert "are not called" in str(model.plan())
    model.forward(torch.randn(2, 1, 10, 10), train=True)
    assert len(seen) == 1


def test_a_hook_on_the_pool_keeps_the_node_fused(kernels_on):
    """The fused node's output is the pool's (written order): a hook there sees pool(relu(conv(x)))."""
    from convdescent import Flatten, ReLU, Sequential
    from convdescent.layers import Conv2D, Dense

    model = Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(3)], input_shape=(1, 10, 10), seed=0)
    model.set_fusion(True)
    seen = []
    model.register_hook("after_forward", lambda name, layer, out: seen.append(out.clone()), layer=model.layers[2])
    assert model.plan().nodes[0].label == "conv1+relu1+pool1"
    x = torch.randn(3, 1, 10, 10)
    model.forward(x, train=True)
    net = model.to_torch()
    with torch.no_grad():
        want = net[2](net[1](net[0](x)))
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-6)


def test_large_patches_are_not_fused(kernels_on, monkeypatch):
    from convdescent import Flatten, Sequential
    from convdescent.layers import Conv2D, Dense

    model = Sequential([Conv2D(8, 3), MaxPool2D(2), Flatten(), Dense(3)], input_shape=(4, 9, 9), seed=0)
    conv, pool = model.layers[:2]  # 4*3*3 = 36 > FUSE_MAX_PATCH
    assert not conv.fuses_with(pool)
    assert [node.label for node in model.plan().nodes[:2]] == ["conv1", "pool1"]


def test_a_fused_pair_inside_chunks_next_to_an_unfused_conv(kernels_on):
    """conv1 (1x3x3 patches) fuses with its pool; conv2 (4x3x3 = 36 > FUSE_MAX_PATCH) writes its map, so the
    conv block still runs in chunks, each chunk through the fused pass; gradients equal autograd's."""
    from convdescent import Flatten, ReLU, Sequential, SoftmaxCrossEntropy
    from convdescent.layers import Conv2D, Dense

    model = Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Conv2D(6, 3, padding="same"), ReLU(), MaxPool2D(2),
                        Flatten(), Dense(5)], input_shape=(1, 14, 14), seed=4, dtype=torch.float64)
    model.set_fusion(True)
    model.chunk_size = 3
    plan = model.plan()
    assert sum(len(node.members) for node in plan.head) == 7
    assert plan.nodes[0].label == "conv1+relu1+pool1" and plan.nodes[1].label == "conv2"
    x = torch.randn(8, 1, 14, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(3))
    model.set_input_grad(True)
    loss, dlogits = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
    dx = model.backward(dlogits)
    net = model.to_torch()
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        F.cross_entropy(net(xr), y).backward()
    torch.testing.assert_close(dx, xr.grad, rtol=1e-10, atol=1e-13)
    for (name, g), (tname, p) in zip(model.grads().items(), net.named_parameters()):
        assert name == tname
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-13)


# -- Dense through the native kernels -------------------------------------------------------------------
def _dense_cases(count=40):
    rng = random.Random(11)
    cases = []
    for i in range(count):
        cases.append(pytest.param(
            rng.randint(1, 40), rng.randint(1, 300), rng.randint(1, 70), i % 4 != 3,
            (torch.float32, torch.float64)[i % 2], ("contiguous", "transposed", "strided")[i % 3],
            1 + i % 3, i % 5 != 4, id=f"dense{i}"))
    return cases


def _dense_pass(layer, x, dy, input_grad):
    layer.needs_input_grad = input_grad
    y = layer.forward(x, True)
    dx = layer.backward(dy)
    return y, dx, {k: g.clone() for k, g in layer.grads.items()}


@pytest.mark.parametrize("n,k,o,bias,dtype,dy_layout,threads,input_grad", _dense_cases())
def test_native_dense_matches_torch_ops(kernels_on, monkeypatch, n, k, o, bias, dtype, dy_layout, threads,
                                        input_grad):
    """The three products through the native kernels, split over 1-3 threads (more threads than input
    features included), equal the torch-op path and the formulas, for every layout of the upstream gradient."""
    from convdescent.layers import Dense

    assert native.gemm(dtype) is not None
    monkeypatch.setattr(Dense, "NATIVE_MIN_WEIGHT", 0)
    gen = torch.Generator().manual_seed(n * 1000 + k * 10 + o)
    layer = Dense(o, use_bias=bias)
    layer.build((k,), generator=gen, dtype=dtype)
    if bias:
        layer.params["bias"].copy_(torch.randn(o, generator=gen, dtype=dtype))
    x = torch.randn(n, k, generator=gen, dtype=dtype)
    dy = torch.randn(n, o, generator=gen, dtype=dtype)
    if dy_layout == "transposed":
        dy = dy.t().contiguous().t()
    elif dy_layout == "strided":
        dy = torch.randn(n, 2 * o, generator=gen, dtype=dtype)[:, ::2]
    torch.set_num_threads(threads)
    assert layer._native("cd_dense_fwd", x) is not None
    y, dx, grads = _dense_pass(layer, x, dy, input_grad)
    monkeypatch.setattr(Dense, "NATIVE_MIN_WEIGHT", 1 << 62)
    assert layer._native("cd_dense_fwd", x) is None
    y_ref, dx_ref, grads_ref = _dense_pass(layer, x, dy, input_grad)
    torch.set_num_threads(1)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}[dtype]
    w = layer.params["weight"]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(y, x @ w.t() + (layer.params["bias"] if bias else 0), **tol)
    torch.testing.assert_close(grads["weight"], dy.t() @ x, **tol)
    if min(w.shape) > 1:  # the gradient comes in the weight's layout (ambiguous for a single row or column)
        assert grads["weight"].stride() == w.stride()
    assert set(grads) == set(grads_ref)
    for key in grads:
        torch.testing.assert_close(grads[key], grads_ref[key], **tol)
    if input_grad:
        torch.testing.assert_close(dx, dx_ref, **tol)
        torch.testing.assert_close(dx, dy @ w, **tol)
    else:
        assert dx is None and dx_ref is None


def test_dense_keeps_the_torch_path_where_the_kernels_do_not_apply(kernels_on, monkeypatch):
    from convdescent.layers import Dense

    layer = Dense(3)
    layer.build((5,))
    x = torch.randn(4, 5)
    assert layer._native("cd_dense_fwd", x) is None  # below NATIVE_MIN_WEIGHT
    monkeypatch.setattr(Dense, "NATIVE_MIN_WEIGHT", 0)
    assert layer._native("cd_dense_fwd", x) is not None
    assert layer._native("cd_dense_fwd", torch.randn(5, 4).t()) is None  # a non-contiguous input
    assert layer._native("cd_dense_fwd", torch.randn(0, 5)) is None  # an empty batch
    assert layer._native("cd_dense_fwd", x.half()) is None  # another dtype
    layer.params["weight"] = layer.params["weight"].contiguous()  # a row-major weight (e.g. assigned)
    assert layer._native("cd_dense_fwd", x) is None
    y = layer.forward(x, True)
    torch.testing.assert_close(y, x @ layer.params["weight"].t() + layer.params["bias"])


def test_gemm_is_checked_before_use_and_can_be_turned_off(kernels_on, monkeypatch):
    """A BLAS symbol that computes something else fails the check against torch and is never used; a
    library without the symbol, or CONVDESCENT_NATIVE_BLAS=0, leaves the dense kernels unused."""
    import ctypes

    i64p = ctypes.POINTER(ctypes.c_int64)
    fake_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, i64p, i64p, i64p, ctypes.c_void_p,
                                 ctypes.c_void_p, i64p, ctypes.c_void_p, i64p, ctypes.c_void_p, ctypes.c_void_p,
                                 i64p, ctypes.c_size_t, ctypes.c_size_t)
    calls = []
    fake = fake_type(lambda *args: calls.append(args[0]))  # writes nothing: the outputs stay NaN

    class FakeBlas:
        sgemm_ = fake

    class NoBlas:
        pass

    monkeypatch.setattr(native, "_GEMMS", {})
    monkeypatch.setattr(native, "_torch_blas_libraries", lambda: iter([FakeBlas()]))
    assert native.gemm(torch.float32) is None
    assert calls  # the check ran the fake
    monkeypatch.setattr(native, "_GEMMS", {})
    monkeypatch.setattr(native, "_torch_blas_libraries", lambda: iter([NoBlas()]))
    assert native.gemm(torch.float32) is None
    monkeypatch.undo()
    monkeypatch.setattr(native, "_GEMMS", {})
    monkeypatch.setenv("CONVDESCENT_NATIVE_BLAS", "0")
    assert native.gemm(torch.float32) is None
    monkeypatch.delenv("CONVDESCENT_NATIVE_BLAS")
    monkeypatch.setattr(native, "_GEMMS", {})
    assert native.gemm(torch.float32) is not None


@pytest.mark.parametrize("c,padding,cstride", [(1, "valid", 1), (3, "same", 1), (2, 1, 2)])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_fused_conv_pool_reads_any_input_layout(kernels_on, c, padding, cstride, layout):
    """The fused passes read the patches from the input through its strides: a channels-last or a sliced
    input gives bit-identical outputs and gradients to a contiguous one."""
    from convdescent import Flatten, Sequential, SoftmaxCrossEntropy
    from convdescent.layers import Conv2D, Dense

    model = Sequential([Conv2D(5, 3, cstride, padding), MaxPool2D(2), Flatten(), Dense(3)],
                       input_shape=(c, 11, 9), seed=3, dtype=torch.float64)
    model.set_fusion(True)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, c, 11, 9, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    if layout == "channels_last":
        other = x.to(memory_format=torch.channels_last)
    else:
        big = torch.randn(6, c + 1, 13, 12, generator=gen, dtype=torch.float64)
        big[:, 1:, 1:12, 2:11] = x
        other = big[:, 1:, 1:12, 2:11]
    assert other.stride() != x.stride() and torch.equal(other, x)
    results = []
    for inp in (x, other):
        logits = model.forward(inp, train=True)
        assert model.plan().nodes[0]._cache[0] == "fused"  # the fused forward ran
        _, dlogits = SoftmaxCrossEntropy()(logits, y)
        model.backward(dlogits)
        results.append((logits, {k: g.clone() for k, g in model.grads().items()}))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_conv_pool_node_without_its_kernel_runs_the_layers_and_gives_the_same_gradients(kernels_on):
    """With the kernels off during its forward the node runs its layers one by one (their own caches); its
    backward then takes their backwards, and the gradients equal those of the fused passes."""
    from convdescent.layers import Conv2D, ReLU
    from convdescent.plan import ConvPool

    conv, relu, pool = Conv2D(4, 3, padding="same"), ReLU(), MaxPool2D(2)
    conv.build((2, 10, 10), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pool.build(conv.output_shape)
    node = ConvPool(("conv1", conv), ("relu1", relu), ("pool1", pool))
    gen = torch.Generator().manual_seed(6)
    conv.params["bias"].normal_(generator=gen)
    x = torch.randn(4, 2, 10, 10, generator=gen, dtype=torch.float64)
    dy = torch.randn(4, 4, 5, 5, generator=gen, dtype=torch.float64)
    results = []
    for first_layer in (True, False):
        conv.needs_input_grad = not first_layer
        for kernel_forward in (True, False):
            previous = native.set_enabled(kernel_forward)
            try:
                y = node.forward(x, True)
            finally:
                native.set_enabled(previous)
            assert node._cache[0] == ("fused" if kernel_forward else "layers")
            dx = node.backward(dy)
            assert (dx is None) == first_layer
            results.append((y, dx, {k: g.clone() for k, g in conv.grads.items()}))
    for y, dx, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-12, atol=1e-12)
        for k in grads:
            torch.testing.assert_close(grads[k], results[0][2][k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[2][1], results[3][1], rtol=1e-12, atol=1e-12)


def test_native_dense_rejects_a_mismatched_gradient_like_the_torch_path(kernels_on, monkeypatch):
    """A dy of the wrong shape or dtype is never read by pointer: the torch path runs and raises."""
    from convdescent.layers import Dense

    monkeypatch.setattr(Dense, "NATIVE_MIN_WEIGHT", 0)
    layer = Dense(4)
    layer.build((6,))
    x = torch.randn(3, 6)
    for bad in (torch.randn(3, 5), torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64)):
        layer.forward(x, True)
        with pytest.raises(RuntimeError):
            layer.backward(bad)


def test_a_variant_library_runs_only_inside_using(kernels_on, tmp_path, monkeypatch):
    """``load_variant`` builds another source beside the real kernels and ``using`` swaps it in for a block: a
    variant whose fused conv + pool forward adds 1 to every output is what runs inside, the real one after."""
    from convdescent.model import Sequential
    from convdescent.layers import Conv2D, Flatten, ReLU

    source = native._SOURCE.read_text()
    marker = "                        cdl_put_##SUF(out + n * on + f * oc + a * oh + b0 * ow, ow, best[u], cnt);"
    assert source.count(marker) == 1, "the test's edit no longer finds the forward's store"
    shifted = marker.replace("best[u], cnt", "best[u] + (T)1, cnt")
    variant = tmp_path / "kernels_variant.c"
    variant.write_text(source.replace(marker, shifted))
    model = Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten()])
    model.build((1, 10, 10), seed=0)
    x = torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    real = model.forward(x, train=False).clone()
    monkeypatch.setenv("CONVDESCENT_CACHE_DIR", str(tmp_path / "cache"))  # the variant's build stays here
    lib = native.load_variant(variant)
    assert lib is not native.library()
    with native.using(lib):
        assert native.library() is lib
        inside = model.forward(x, train=False).clone()
    after = model.forward(x, train=False)
    assert "fused native pass" in str(model.plan())
    torch.testing.assert_close(inside, real + 1)
    assert torch.equal(after, real)
