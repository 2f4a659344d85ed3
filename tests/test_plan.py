"""The execution plan and its hooks: nodes, fusion on and off, splits, hook order, the fused node's gradients."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convdescent import (BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Residual, Sequential,
                         SoftmaxCrossEntropy, Tanh, native, seed_cnn)
from convdescent.model import fusion_default
from convdescent.plan import ConvPool, LayerNode, PoolReLU, ResidualNode



def step(model, x, y):
    model.set_input_grad(True)
    logits = model.forward(x, train=True)
    loss, dlogits = SoftmaxCrossEntropy()(logits, y)
    dx = model.backward(dlogits)
    return logits, dx, {k: g.clone() for k, g in model.grads().items()}


def zoo_model(seed: int) -> Sequential:
    """A model with every kind of node: a fused conv+pool, a reordered pair, a residual with a fused pair."""
    return Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2),
                       Residual([Conv2D(4, 3, padding="same"), ReLU(), MaxPool2D(1), BatchNorm2D()]),
                       Conv2D(6, 3, padding="same"), ReLU(), MaxPool2D(2), Tanh(), Flatten(), Dense(5)],
                      input_shape=(1, 14, 14), seed=seed, dtype=torch.float64)


def test_the_plan_names_its_nodes_and_shows_in_the_summary():
    model = zoo_model(0)
    model.set_fusion(True)
    plan = model.plan()
    kinds = [type(node) for node in plan.nodes]
    assert native.library() is not None, native.status()
    if native.enabled():
        assert kinds[:3] == [ConvPool, ResidualNode, LayerNode] and plan.nodes[0].label == "conv1+relu1+pool1"
        assert "conv1+relu1+pool1: fused native pass" in model.summary()
    # conv2 (6x4x3x3 patches) writes its map: its ReLU still moves after the pool
    assert any(isinstance(node, PoolReLU) and node.label == "relu2+pool2" for node in plan.nodes)
    inner = plan.nodes[1].body.nodes
    assert [node.label for node in inner][0].startswith("residual1.conv1")
    model.set_fusion(False)
    assert all(type(node) in (LayerNode, ResidualNode) for node in model.plan().nodes)
    assert "fusion off" in str(model.plan())


def test_fusion_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONVDESCENT_FUSION", "0")
    assert not fusion_default() and not seed_cnn(seed=0).fusion
    monkeypatch.setenv("CONVDESCENT_FUSION", "1")
    assert fusion_default() and seed_cnn(seed=0).fusion


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_fusion_off_gives_the_same_numbers_as_fusion_on(seed, chunk_size):
    model = zoo_model(seed)
    model.chunk_size = chunk_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 1, 14, 14, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=gen)
    runs = []
    for fused in (True, False):
        model.set_fusion(fused)
        runs.append(step(model, x, y))
    (l1, dx1, g1), (l2, dx2, g2) = runs
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx2, rtol=1e-12, atol=1e-12)
    assert list(g1) == list(g2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-10, atol=1e-12, msg=k)
    # and both against autograd on the exported network (batch norm in training mode in both)
    net = model.to_torch().train()
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        F.cross_entropy(net(xr), y).backward()
    torch.testing.assert_close(dx1, xr.grad, rtol=1e-9, atol=1e-12)
    for (name, g), (tname, p) in zip(g1.items(), net.named_parameters()):
        assert name == tname
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_after_backward_fires_per_layer_in_backward_order_while_the_backward_runs(chunk_size):
    model = zoo_model(1)
    model.chunk_size = chunk_size
    model.set_fusion(chunk_size == 0)  # unfused, conv1 writes its map and the leading stage runs in chunks
    if chunk_size:
        assert model.plan().head
    events = []
    first = model.layers[0]

    def hook(name, layer, grads):
        # the first layer runs its backward last: while later layers report, its gradients are not written
        events.append((name, sorted(grads), "weight" in first.grads))
        for key, g in grads.items():
            assert g is model.grads()[key] if "weight" in first.grads else g.shape == model.params()[key].shape

    handle = model.register_hook("after_backward", hook)
    x = torch.randn(5, 1, 14, 14, dtype=torch.float64)
    y = torch.randint(0, 5, (5,))
    model.forward(x, train=True)
    for layer in model.layers:
        layer.grads = {}
    _, dlogits = SoftmaxCrossEntropy()(model.forward(x, train=True), y)
    model.backward(dlogits)
    names = [name for name, _, _ in events]
    expected = [name for name, _ in model.all_layers()]
    # every layer once; nested layers before their block; top-level layers in reverse
    assert sorted(names) == sorted(expected)
    top = [n for n in names if "." not in n]
    assert top == [layer.name for layer in reversed(model.layers)]
    assert names.index("residual1.conv1") < names.index("residual1") < names.index("pool1")
    assert [written for name, _, written in events if name == "dense1"] == [False]
    assert events[-1][0] == "conv1" and events[-1][1] == ["conv1.bias", "conv1.weight"]
    assert dict((n, k) for n, k, _ in events)["residual1"] == []  # its parameters are its layers' to report
    reported = [k for _, keys, _ in events for k in keys]
    assert sorted(reported) == sorted(model.params())  # each parameter exactly once
    handle.remove()
    handle.remove()
    assert len(model.hooks) == 0


def test_hooks_do_not_change_the_numbers_and_forward_hooks_see_each_output():
    model = zoo_model(2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 14, 14, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=gen)
    plain = step(model, x, y)
    outputs, inputs = {}, {}
    handles = [model.register_hook("after_forward", lambda n, l, out: outputs.__setitem__(n, out.clone())),
               model.register_hook("before_forward", lambda n, l, inp: inputs.__setitem__(n, inp.clone()))]
    hooked = step(model, x, y)
    for h in handles:
        h.remove()
    torch.testing.assert_close(plain[0], hooked[0], rtol=1e-12, atol=1e-12)
    for k in plain[2]:
        torch.testing.assert_close(plain[2][k], hooked[2][k], rtol=1e-10, atol=1e-12)
    assert set(outputs) == {name for name, _ in model.all_layers()}
    # each layer's output is the next one's input
    names = [layer.name for layer in model.layers]
    for a, b in zip(names, names[1:]):
        assert torch.equal(outputs[a], inputs[b]), (a, b)
    assert torch.equal(outputs["dense1"], hooked[0])


def test_register_hook_errors_name_what_was_wrong():
    model = seed_cnn(seed=0)
    with pytest.raises(ValueError, match="hook event must be one of"):
        model.register_hook("after_step", lambda *a: None)
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        model.register_hook("after_forward", lambda *a: None, layer="conv9")
    with pytest.raises(ValueError, match="is not part of model"):
        model.register_hook("after_forward", lambda *a: None, layer=Conv2D(3))
    with pytest.raises(TypeError, match="must be callable"):
        model.register_hook("after_forward", 3)
    handle = model.register_hook("after_forward", lambda *a: None, layer=model.layers[4])
    assert "after_forward on dense1" in model.hooks.describe()[0]
    handle.remove()


# -- the fused node's gradients: finite differences in float64 and autograd, random shapes --------------------

def _fused_cases(count=24):
    rng = random.Random(5)
    cases = []
    while len(cases) < count:
        k = rng.randint(1, 3)
        c = rng.randint(1, 3)
        if c * k * k > Conv2D.FUSE_MAX_PATCH:
            continue
        f = rng.randint(1, 6)
        pool = rng.randint(1, 3)
        pstride = rng.randint(1, 3)
        cstride = rng.randint(1, 2)
        padding = rng.choice(["valid", "same", 1])
        h, w = rng.randint(5, 11), rng.randint(5, 11)
        relu = rng.random() < 0.6
        first = rng.random() < 0.5
        conv = Conv2D(f, k, cstride, padding)
        try:
            _, ho, wo = conv.compute_output_shape((c, h, w))
        except ValueError:
            continue
        if ho < pool or wo < pool:
            continue
        cases.append(pytest.param(k, c, f, pool, pstride, cstride, padding, relu, first, (h, w),
                                  id=f"k{k}-c{c}-f{f}-p{pool}s{pstride}-cs{cstride}-{padding}-{h}x{w}"
                                     f"{'-relu' if relu else ''}{'-first' if first else ''}"))
    return cases


@pytest.mark.parametrize("k,c,f,pool,pstride,cstride,padding,relu,first,hw", _fused_cases())
def test_conv_pool_node_gradients_against_finite_differences_and_autograd(k, c, f, pool, pstride, cstride,
                                                                          padding, relu, first, hw):
    assert native.library() is not None, native.status()  # CI installs a C compiler
    previous = native.set_enabled(True)
    try:
        gen = torch.Generator().manual_seed(k * 100 + c * 10 + f)
        conv, pool_layer = Conv2D(f, k, cstride, padding), MaxPool2D(pool, pstride)
        conv.build((c, *hw), generator=gen, dtype=torch.float64)
        pool_layer.build(conv.output_shape)
        conv.params["bias"].normal_(generator=gen)
        conv.needs_input_grad = not first
        node = ConvPool(("conv1", conv), ("relu1", ReLU()) if relu else None, ("pool1", pool_layer))
        x = torch.randn(3, c, *hw, generator=gen, dtype=torch.float64)
        out = node.forward(x, True)
        assert node._cache[0] == "fused"
        r = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        dx = node.backward(r)
        assert (dx is None) == first
        grads = {key: g.clone() for key, g in conv.grads.items()}

        # autograd on torch's own ops
        w = conv.params["weight"].clone().requires_grad_()
        b = conv.params["bias"].clone().requires_grad_()
        xr = x.clone().requires_grad_()
        pt, pb, pl, pr = conv.pads(*hw)
        with torch.enable_grad():
            z = F.conv2d(F.pad(xr, (pl, pr, pt, pb)), w, b, stride=cstride)
            if relu:
                z = torch.relu(z)
            z = F.max_pool2d(z, pool, pstride)
            (z * r).sum().backward()
        torch.testing.assert_close(out, z.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads["weight"], w.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads["bias"], b.grad, rtol=1e-10, atol=1e-12)
        if not first:
            torch.testing.assert_close(dx, xr.grad, rtol=1e-10, atol=1e-12)

        # central finite differences of L = sum(node(x) * r) on sampled weight and input elements
        def loss():
            value = (node.forward(x, True) * r).sum()
            node.clear_cache()
            return value

        eps = 1e-6
        targets = [("weight", conv.params["weight"], grads["weight"]), ("bias", conv.params["bias"], grads["bias"])]
        if not first:
            targets.append(("input", x, dx))
        pick = random.Random(f)
        for name, tensor, grad in targets:
            flat = tensor.view(-1)
            for i in pick.sample(range(flat.numel()), min(6, flat.numel())):
                old = float(flat[i])
                flat[i] = old + eps
                plus = loss()
                flat[i] = old - eps
                minus = loss()
                flat[i] = old
                numeric = float(plus - minus) / (2 * eps)
                analytic = float(grad.reshape(-1)[i])
                assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, i, numeric, analytic)
    finally:
        native.set_enabled(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c,f,k,pool,pstride,cstride,width", [
    (1, 32, 3, 2, 2, 1, 70),   # the tutorial's first layer on a wide input: several vectors per pooled row
    (3, 13, 3, 3, 2, 1, 61),   # overlapping windows, a filter count that is no multiple of a block
    (2, 9, 2, 2, 3, 2, 75),    # windows with gaps between them, a strided conv
    (1, 5, 5, 4, 4, 1, 40),    # a 4x4 window: 16 positions per window
])
def test_conv_pool_node_on_wide_inputs_against_autograd(dtype, c, f, k, pool, pstride, cstride, width):
    """The fused pass lays each pooled row's windows along vector lanes; rows wider than one vector, every
    lane count left over at the end, odd filter counts and both dtypes give torch's values and gradients."""
    _fused_node_against_autograd(dtype, c, f, k, pool, pstride, cstride, 11, width)


def _sample_layout_limit() -> int:
    """CDL_SAMPLE_BYTES of the kernels' source: the largest input layout the fused passes build per sample."""
    source = (Path(native.__file__).parent / "kernels.c").read_text()
    match = re.search(r"#define CDL_SAMPLE_BYTES \((\d+) \* (\d+)\)", source)
    assert match, "CDL_SAMPLE_BYTES not found in kernels.c"
    return int(match.group(1)) * int(match.group(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c,height,whole", [(1, 28, True), (4, 40, True), (8, 60, False), (3, 90, False)])
def test_conv_pool_node_lays_out_whole_samples_or_row_by_row_alike(dtype, c, height, whole):
    """The fused passes lay out each sample's input rows once when that layout is small (an input row serves
    two pooled rows of a 3x3 conv and a 2x2 pool) and each pooled row's rows apart when it is not; both give
    torch's values and gradients. The cases sit on either side of the size limit (checked here)."""
    lanes = 64 // torch.finfo(dtype).bits * 8  # AVX-512 lanes; on narrower vectors the sizes only shrink
    po = (height - 2) // 2
    rows, m = (po - 1) * 2 + 4, -(-po // lanes) * lanes
    size = c * rows * 2 * 2 * m * (torch.finfo(dtype).bits // 8)  # channels x rows x phases x shifts x lanes
    if dtype == torch.float32:
        assert (size <= _sample_layout_limit()) == whole, (size, _sample_layout_limit())
    _fused_node_against_autograd(dtype, c, 7, 3, 2, 2, 1, height, height, n=4)


def _fused_node_against_autograd(dtype, c, f, k, pool, pstride, cstride, height, width, n=3):
    assert native.library() is not None, native.status()
    previous = native.set_enabled(True)
    try:
        gen = torch.Generator().manual_seed(c * 100 + f + width + height)
        conv, pool_layer = Conv2D(f, k, cstride), MaxPool2D(pool, pstride)
        conv.build((c, height, width), generator=gen, dtype=dtype)
        pool_layer.build(conv.output_shape)
        conv.params["bias"].normal_(generator=gen)
        conv.needs_input_grad = False
        node = ConvPool(("conv1", conv), ("relu1", ReLU()), ("pool1", pool_layer))
        x = torch.randn(n, c, height, width, generator=gen, dtype=dtype)
        out = node.forward(x, True)
        assert node._cache[0] == "fused"
        r = torch.randn(out.shape, generator=gen, dtype=dtype)
        assert node.backward(r) is None
        w = conv.params["weight"].clone().requires_grad_()
        b = conv.params["bias"].clone().requires_grad_()
        with torch.enable_grad():
            z = F.max_pool2d(torch.relu(F.conv2d(x, w, b, stride=cstride)), pool, pstride)
            (z * r).sum().backward()
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, z.detach(), **tol)
        if dtype == torch.float32:  # a float32 sum of this many terms in another order: eps times its size
            terms = r.numel() // f
            tol = dict(rtol=1e-5, atol=2e-7 * terms * float(x.abs().max() * r.abs().max()))
        torch.testing.assert_close(conv.grads["weight"], w.grad, **tol)
        torch.testing.assert_close(conv.grads["bias"], b.grad, **tol)
    finally:
        native.set_enabled(previous)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
def test_conv_pool_node_passes_a_nan_on_as_the_layers_do(relu):
    """A NaN in the input wins its window (as torch's max pool), survives the ReLU, and reaches the
    gradients, in the fused pass as in the layers run one by one."""
    results = []
    for fused in (True, False):
        conv, pool = Conv2D(3, 3), MaxPool2D(2)
        conv.build((1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        pool.build(conv.output_shape)
        conv.needs_input_grad = False
        node = ConvPool(("conv1", conv), ("relu1", ReLU()) if relu else None, ("pool1", pool))
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        x[1, 0, 4, 5] = float("nan")
        previous = native.set_enabled(fused)
        try:
            y = node.forward(x, True)
            assert node._cache[0] == ("fused" if fused else "layers")
            node.backward(torch.ones_like(y))
        finally:
            native.set_enabled(previous)
        results.append((y, conv.grads["weight"].clone(), conv.grads["bias"].clone()))
    (y1, w1, b1), (y2, w2, b2) = results
    assert torch.isnan(y1).any() and torch.equal(torch.isnan(y1), torch.isnan(y2))
    torch.testing.assert_close(y1, y2, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert torch.isnan(w1).any()  # a window's NaN input reaches the weight gradient
    torch.testing.assert_close(w1, w2, equal_nan=True, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, b2, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_pool_relu_node_equals_the_written_order():
    relu, pool = ReLU(), MaxPool2D(2)
    node = PoolReLU(("relu1", relu), ("pool1", pool))
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64).round()  # ties and zeros
    r = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    y = node.forward(x, True)
    dx = node.backward(r)
    xr = x.clone().requires_grad_()
    with torch.enable_grad():
        z = F.max_pool2d(torch.relu(xr), 2)
        (z * r).sum().backward()
    assert torch.equal(y, z.detach())
    torch.testing.assert_close(dx, xr.grad, rtol=0, atol=0)


def _counting_compiles(monkeypatch) -> list:
    from convdescent import model as model_module

    calls, real = [], model_module.compile_plan
    monkeypatch.setattr(model_module, "compile_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_paused_hook_set_finds_its_plan_again_and_a_removed_hook_leaves_none_behind(monkeypatch):
    """Hooks paused and resumed (as the health check's between its steps) switch between two kept plans, and
    the resumed plan calls them; a removed hook's plans are dropped (the plan would keep its function and what
    that function holds alive), and registering the same function again compiles a new plan."""
    import gc
    import weakref

    calls = _counting_compiles(monkeypatch)
    model = seed_cnn(input_shape=(1, 28, 28), num_classes=10, seed=0)
    x = torch.randn(4, 1, 28, 28)
    seen = []

    def watch(name, layer, out):
        seen.append(name)

    plain = model.plan()
    handle = model.register_hook("after_forward", watch, layer="dense1", split=False)
    hooked = model.plan()
    assert hooked is not plain and len(calls) == 2
    for _ in range(3):
        model.forward(x)
        handle.pause()
        assert len(model.hooks) == 0 and model.plan() is plain
        model.forward(x)
        handle.resume()
        assert len(model.hooks) == 1 and model.plan() is hooked
    assert seen == ["dense1"] * 3 and len(calls) == 2
    handle.remove()
    assert model.plan() is plain and len(model._plans) == 1
    handle = model.register_hook("after_forward", watch, layer="dense1", split=False)
    assert model.plan() is not hooked and len(calls) == 3
    handle.remove()

    class Holder:  # a hook whose object holds memory: gone once the hook is removed
        def on(self, name, layer, out):
            pass

    holder = Holder()
    ref = weakref.ref(holder)
    handle = model.register_hook("after_forward", holder.on, layer="dense1")
    model.plan()
    handle.remove()
    model.plan()
    del holder, handle
    gc.collect()
    assert ref() is None
    # at most KEPT_PLANS plans are kept, the least recently used dropped first
    handles = [model.register_hook("after_forward", watch, layer=name, split=False)
               for name in ("dense1", "relu2", "dense2", "flatten1", "conv1")]
    for h in handles:
        h.pause()
    for h in handles:
        h.resume()
        model.plan()
        h.pause()
    assert len(model._plans) == model.KEPT_PLANS and plain not in model._plans.values()


def test_the_health_check_compiles_two_plans_for_a_whole_run(monkeypatch):
    """A check every 3 steps arms and disarms the activation hooks 4 times in 12 steps: the plan without hooks
    and the plan with them are compiled once each, the step's buffers survive the checks, and the run's end
    removes the hooks."""
    from convdescent.diagnostics.health import HealthMonitor
    from convdescent.optim import make_optimizer
    from convdescent.train import fit

    calls = _counting_compiles(monkeypatch)
    model = seed_cnn(input_shape=(1, 28, 28), num_classes=10, seed=0)
    gen = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 256, (12 * 8, 1, 28, 28), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (12 * 8,), generator=gen))
    mon = HealthMonitor(every=3, stream=None)
    fit(model, SoftmaxCrossEntropy(), make_optimizer("adam", lr=1e-3), data, steps=12, batch_size=8,
        callbacks=[mon], verbose=0, handle_signals=False)
    assert len(mon.records) == 4
    assert len(calls) == 2
    assert len(model._workspace) > 0
    assert model.hooks.registered() == set()
