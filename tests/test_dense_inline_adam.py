"""The Adam step done inside Dense's backward (``cd_dense_bwd_adam``, ``optim.InlineAdam``).

The training step hands the coming Adam/AdamW step to the backward; a Dense layer on the native path then
updates its weight block by block while the block's gradient is in the cache. Checked here: the kernel
against torch.optim's Adam on the same gradient; whole training steps against the step that writes every
gradient and then runs the fused optimizer step (itself checked against torch.optim in test_optim_fused.py);
and every case that must not take the inline path (a hook reading the gradients, a frozen layer, a chunked
backward, other optimizers, the kernels off).
"""

from __future__ import annotations

import pytest
import torch

from convdescent import Dense, Flatten, ReLU, Sequential, SoftmaxCrossEntropy, native, optim, seed_cnn
from convdescent.data.synthetic import synthetic_images
from convdescent.optim import inline_step, make_optimizer, update_and_apply
from convdescent.train.step import train_step

from adam_configs import CONFIG_IDS, CONFIGS

needs_kernels = pytest.mark.skipif(native.library() is None or native.gemm(torch.float32) is None,
                                   reason="the native kernels do not build here")


def _dense(k, o, dtype, seed):
    layer = Dense(o, name="fc")
    layer.build((k,), torch.Generator().manual_seed(seed), dtype=dtype)
    return layer


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kwargs,torch_name,torch_kwargs", CONFIGS, ids=CONFIG_IDS)
def test_dense_backward_with_adam_equals_torch_optim(name, kwargs, torch_name, torch_kwargs, dtype, threads):
    """Several steps on shapes whose rows do not fill the kernel's blocks (K not a multiple of 64, a K
    smaller than the threads' split, several blocks a thread), with dy in both layouts: the weight, the moments and dL/dx against
    torch.optim on the gradient x^T dy, and the bias's gradient left for the step after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(7)
        # blocks of native.dense_update_rows(o) rows: 1024 for the narrow layers (with one thread, 2050 rows
        # are full blocks and a short one), 87 for the wide one (300 rows: three full blocks and a short one
        # with one thread), 8 for the widest, whose 2 rows are fewer than the threads
        for n, k, o, transposed_dy in [(5, 600, 110, False), (3, 1030, 64, True), (17, 700, 97, False),
                                       (1, 2050, 40, True), (4, 300, 1500, False), (2, 2, 40000, True)]:
            layer = _dense(k, o, dtype, seed=n)
            w = layer.params["weight"]
            ref = torch.nn.Parameter(w.detach().clone())
            ref_opt = getattr(torch.optim, torch_name)([ref], lr=3e-3, **torch_kwargs)
            opt = make_optimizer(name, lr=3e-3, **kwargs)
            params = {"fc.weight": w}
            state = opt.init(params)
            for step in range(4):
                x = torch.randn(n, k, generator=gen, dtype=dtype)
                dy = torch.randn(n, o, generator=gen, dtype=dtype)
                if transposed_dy:
                    dy = dy.t().contiguous().t()
                layer.forward(x, train=True)
                inline = inline_step(opt, params, state)
                assert inline is not None
                dx = layer.backward_and_update(dy, inline, "fc.")
                assert inline.taken == {"fc.weight"} and "weight" not in layer.grads
                torch.testing.assert_close(layer.grads["bias"], dy.sum(0))
                tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
                torch.testing.assert_close(dx, dy @ ref.detach(), **tol)  # with the weight before the step
                state = inline.finish({})
                ref.grad = dy.t() @ x
                ref_opt.step()
                torch.testing.assert_close(w, ref.detach(), **tol)
            adam = next(s for s in state if hasattr(s, "mu"))
            assert adam.count == 4
            torch.testing.assert_close(adam.mu["fc.weight"], ref_opt.state[ref]["exp_avg"], **tol)
            torch.testing.assert_close(adam.nu["fc.weight"], ref_opt.state[ref]["exp_avg_sq"], **tol)
            if torch_kwargs.get("amsgrad"):
                torch.testing.assert_close(adam.nu_max["fc.weight"], ref_opt.state[ref]["max_exp_avg_sq"], **tol)
            assert w.t().is_contiguous()  # updated in place, layout kept
    finally:
        torch.set_num_threads(previous)


def _data(n=40, seed=1):
    x, y = synthetic_images(n, 10, (1, 12, 12), seed=seed)
    return (x.float() / 255.0), y


def _pair(dtype=torch.float32, model_fn=seed_cnn):
    a = model_fn(input_shape=(1, 12, 12), seed=2, dtype=dtype)
    b = model_fn(input_shape=(1, 12, 12), seed=2, dtype=dtype)
    return a, b


def _reference_step(model, opt, state, xb, yb):
    """The step without the inline update: every gradient written, then the fused optimizer step."""
    logits = model.forward(xb, train=True)
    _, dlogits = SoftmaxCrossEntropy()(logits, yb)
    model.backward(dlogits)
    return update_and_apply(opt, model.params(), model.grads(), state)


def _train_both(a, b, opt_a, opt_b, steps=5, batch=8, dtype=torch.float32):
    x, y = _data()
    x = x.to(dtype)
    sa, sb = opt_a.init(a.params()), opt_b.init(b.params())
    for i in range(steps):
        xb, yb = x[i * batch % 40:][:batch], y[i * batch % 40:][:batch]
        _, _, sa = train_step(a, SoftmaxCrossEntropy(), opt_a, sa, xb, yb)
        sb = _reference_step(b, opt_b, sb, xb, yb)
    return sa, sb


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kwargs", [
    ("adam", {}), ("adam", {"weight_decay": 0.05}), ("adamw", {"weight_decay": 0.1, "amsgrad": True}),
    ("adam-cosine", {}),
], ids=["adam", "adam-l2", "adamw-amsgrad", "adam-cosine"])
def test_train_step_with_the_inline_update_equals_the_step_that_writes_every_gradient(name, kwargs, dtype):
    a, b = _pair(dtype)
    if name == "adam-cosine":  # a scheduled learning rate and first-moment decay, read at every step
        opt_a, opt_b = (optim.chain(optim.scale_by_adam(lambda t: 0.95 - 0.01 * t, 0.999, 1e-8),
                                    optim.scale_by_learning_rate(optim.cosine_decay(1e-2, 6))) for _ in range(2))
    else:
        opt_a, opt_b = make_optimizer(name, lr=3e-3, **kwargs), make_optimizer(name, lr=3e-3, **kwargs)
    sa, sb = _train_both(a, b, opt_a, opt_b, dtype=dtype)
    assert a.updated_in_backward() == {"dense1.weight"}  # the tutorial CNN's big Dense (800 x 128 here)
    assert "dense1.weight" not in a.grads() and "dense1.bias" in a.grads()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for k, p in b.params().items():
        torch.testing.assert_close(a.params()[k], p, **tol, msg=lambda m: f"{k}: {m}")
    ma, mb = next(s for s in sa if hasattr(s, "mu")), next(s for s in sb if hasattr(s, "mu"))
    assert ma.count == mb.count == 5
    for k in ma.mu:
        torch.testing.assert_close(ma.mu[k], mb.mu[k], **tol)
        torch.testing.assert_close(ma.nu[k], mb.nu[k], **tol)
    assert optim.current_lr(opt_a, sa) == optim.current_lr(opt_b, sb)


@needs_kernels
def test_a_dense_layer_first_in_the_model_updates_without_an_input_gradient():
    """The first trainable node computes no dL/dx: the kernel is called without one."""
    model = Sequential([Flatten(), Dense(500), ReLU(), Dense(10)], input_shape=(1, 12, 12), seed=4)
    ref = Sequential([Flatten(), Dense(500), ReLU(), Dense(10)], input_shape=(1, 12, 12), seed=4)
    opt_a, opt_b = make_optimizer("adam", lr=1e-2), make_optimizer("adam", lr=1e-2)
    _train_both(model, ref, opt_a, opt_b, steps=3)
    first = model.layers[1].name
    assert model.updated_in_backward() == {f"{first}.weight"}
    for k, p in ref.params().items():
        torch.testing.assert_close(model.params()[k], p, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_the_inline_update_is_not_taken_where_a_hook_reads_the_gradient_or_the_layer_is_frozen():
    x, y = _data()
    opt = make_optimizer("adam", lr=1e-3)
    # an after_backward hook on the Dense reads its gradients
    model = seed_cnn(input_shape=(1, 12, 12), seed=2)
    seen = []
    model.register_hook("after_backward", lambda name, layer, grads: seen.append(grads["dense1.weight"].clone()), "dense1")
    state = opt.init(model.params())
    train_step(model, SoftmaxCrossEntropy(), opt, state, x[:8], y[:8])
    assert model.updated_in_backward() == frozenset() and len(seen) == 1
    assert "dense1.weight" in model.grads()
    # a frozen Dense computes no weight gradient and takes no update
    model = seed_cnn(input_shape=(1, 12, 12), seed=2)
    model.layers[4].trainable = False
    before = {k: p.clone() for k, p in model.params().items()}
    state = opt.init(model.params())
    train_step(model, SoftmaxCrossEntropy(), opt, state, x[:8], y[:8])
    assert model.updated_in_backward() == frozenset()
    # the inline kernel would have stepped the weight with its real gradient; the frozen layer's zeros leave
    # Adam's update at 0, and every other parameter did step
    for k, p in model.params().items():
        assert torch.equal(p, before[k]) == k.startswith("dense1."), k


@needs_kernels
def test_with_fusion_off_and_a_chunked_stage_the_dense_after_it_still_updates_inline():
    """The chunked stage (conv, ReLU, pool, flatten run in chunks of 4) is never offered the update (its
    gradients are sums over chunks); the Dense after it runs on the whole batch and takes it."""
    a, b = _pair()
    for m in (a, b):
        m.set_fusion(False)
        m.chunk_size = 4
    plan = a.plan()
    assert plan.head and all(node.members[0][0] != "dense1" for node in plan.head)
    _train_both(a, b, make_optimizer("adam", lr=3e-3), make_optimizer("adam", lr=3e-3), steps=3)
    assert a.updated_in_backward() == {"dense1.weight"}
    for k, p in b.params().items():
        torch.testing.assert_close(a.params()[k], p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: make_optimizer("sgd", lr=1e-2, momentum=0.9),
    lambda: make_optimizer("adam", lr=1e-3, clip_norm=1.0),
    lambda: make_optimizer("nadam", lr=1e-3),
], ids=["sgd", "clipped-adam", "nadam"])
def test_other_optimizers_get_no_inline_step(make):
    model = seed_cnn(input_shape=(1, 12, 12), seed=2)
    opt = make()
    assert inline_step(opt, model.params(), opt.init(model.params())) is None


def test_without_the_kernels_the_step_writes_every_gradient():
    previous = native.set_enabled(False)
    try:
        a, b = _pair()
        _train_both(a, b, make_optimizer("adam", lr=3e-3), make_optimizer("adam", lr=3e-3), steps=3)
        assert a.updated_in_backward() == frozenset()
        assert "dense1.weight" in a.grads()
        for k, p in b.params().items():
            assert torch.equal(a.params()[k], p)
    finally:
        native.set_enabled(previous)


class _FailingBackward(Flatten):
    """A layer whose backward raises, placed before a Dense so that it runs after the Dense's update."""

    def backward(self, dy):
        raise RuntimeError("backward failed here")


@needs_kernels
def test_a_backward_that_fails_after_the_inline_update_says_which_weights_took_it():
    model = Sequential([Flatten(), Dense(300), _FailingBackward(), Dense(500), ReLU(), Dense(10)],
                       input_shape=(1, 12, 12), seed=4)
    opt = make_optimizer("adam", lr=1e-2)
    state = opt.init(model.params())
    x, y = _data()
    last = model.layers[3].name  # the 300 x 500 Dense after the failing layer
    with pytest.raises(RuntimeError, match="backward failed here") as failure:
        train_step(model, SoftmaxCrossEntropy(), opt, state, x[:8], y[:8])
    assert model.updated_in_backward() == {f"{last}.weight"}
    notes = getattr(failure.value, "__notes__", [])
    if hasattr(failure.value, "add_note"):  # Python 3.11 and later
        assert any(f"{last}.weight had already taken this step's update" in n for n in notes), notes


def test_finish_names_a_missing_an_unknown_or_an_already_updated_gradient():
    """finish() steps exactly the parameters inline() was given less those taken; any other set of
    gradients is an error that names the parameters concerned, and nothing is updated."""
    params = {"a": torch.randn(3), "b": torch.randn(2, 2), "c": torch.randn(4)}
    before = {k: v.clone() for k, v in params.items()}
    opt = make_optimizer("adam", lr=1e-2)
    state = opt.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    cases = [({"a": grads["a"], "b": grads["b"]}, set(), "no gradient for c"),
             ({**grads, "d": torch.ones(1)}, set(), "d is not among"),
             (grads, {"b"}, "b was updated in the backward already")]
    for given, taken, message in cases:
        inline = inline_step(opt, params, state)
        inline.taken |= taken
        with pytest.raises(RuntimeError, match=message):
            inline.finish(given)
        for k in params:
            assert torch.equal(params[k], before[k])
    inline = inline_step(opt, params, state)
    state = inline.finish(grads)  # the full set steps every parameter
    assert all(not torch.equal(params[k], before[k]) for k in params)
    assert next(s for s in state if hasattr(s, "mu")).count == 1


@pytest.mark.parametrize("path,optimizer", [("finish", "adam"), ("finish", "adamw"), ("update_and_apply", "adam"),
                                            ("update_and_apply", "adamw"), ("update_and_apply", "sgd"),
                                            ("update_and_apply", "rmsprop")])
def test_a_gradient_unlike_its_parameter_is_named_and_nothing_is_written(path, optimizer):
    """The kernels read gradients by pointer: a gradient of another shape (fewer elements, or the transposed
    shape of a column-major weight, which has as many) or dtype is refused with one message naming it, before
    any parameter changes (the torch fused kernel and cd_adam alike would read or write past its end)."""
    weight = torch.randn(4, 3).t()  # (3, 4) stored column-major, as Dense keeps its weight
    params = {"a": torch.randn(1000), "w": weight, "c": torch.randn(5)}
    before = {k: v.clone() for k, v in params.items()}
    opt = make_optimizer(optimizer, lr=1e-2)
    state = opt.init(params)
    good = {k: torch.ones_like(v) for k, v in params.items()}
    cases = [({**good, "a": torch.ones(10)}, r"a: gradient \(10,\) torch.float32 on cpu, parameter \(1000,\)"),
             ({**good, "w": torch.ones(4, 3)}, r"w: gradient \(4, 3\) torch.float32 on cpu, parameter \(3, 4\)"),
             ({**good, "c": torch.ones(5, dtype=torch.float64)}, r"c: gradient \(5,\) torch.float64"),
             ({**good, "a": torch.ones(1, 1000)}, r"a: gradient \(1, 1000\)")]
    for grads, message in cases:
        with pytest.raises(ValueError, match=message):
            if path == "finish":
                inline_step(opt, params, state).finish(grads)
            else:
                update_and_apply(opt, params, grads, state)
        for k in params:
            assert torch.equal(params[k], before[k]), k


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kwargs,torch_name,torch_kwargs", CONFIGS, ids=CONFIG_IDS)
def test_small_parameters_native_adam_equals_torch_optim(name, kwargs, torch_name, torch_kwargs, dtype,
                                                         monkeypatch):
    """The rest of an inline step, when small (``cd_adam``, one native call per tensor), against torch.optim on
    the same gradients: shapes that fill no vector (1, 3 elements), a non-contiguous (column-major) weight,
    a scheduled learning rate, several steps. The fused torch kernel is made to fail, so the native path must
    be the one that ran."""
    from convdescent.optim import schedules
    from convdescent.optim.fused import FusedAdam
    monkeypatch.setattr(FusedAdam, "_run", lambda *a, **k: pytest.fail("the small-parameter path did not run"))
    gen = torch.Generator().manual_seed(3)
    shapes = {"a": (1,), "b": (3,), "c": (17, 5), "d": (64,), "e": (33, 9)}
    params = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    params["c"] = params["c"].t().contiguous().t()  # stored column-major, as Dense keeps its weight
    refs = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    lr = schedules.exponential_decay(3e-3, gamma=0.5, every=2)
    ref_opt = getattr(torch.optim, torch_name)(list(refs.values()), lr=3e-3, **torch_kwargs)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: 0.5 ** (t / 2))
    opt = make_optimizer(name, lr=lr, **kwargs)
    state = opt.init(params)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for step in range(5):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in params.items()}
        inline = inline_step(opt, params, state)
        assert inline is not None
        state = inline.finish(grads)
        for k, ref in refs.items():
            ref.grad = grads[k].clone()
        ref_opt.step()
        ref_sched.step()
        for k, ref in refs.items():
            torch.testing.assert_close(params[k], ref.detach(), **tol)
    adam = next(s for s in state if hasattr(s, "mu"))
    for k, ref in refs.items():
        torch.testing.assert_close(adam.mu[k], ref_opt.state[ref]["exp_avg"], **tol)
        torch.testing.assert_close(adam.nu[k], ref_opt.state[ref]["exp_avg_sq"], **tol)
    assert params["c"].t().is_contiguous()
