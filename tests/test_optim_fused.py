"""The fused Adam/AdamW step against torch.optim's fused kernel and against the explicit chain."""

from __future__ import annotations

import pytest
import torch

from convdescent import optim
from convdescent.optim import fused as fused_mod
from convdescent.optim import make_optimizer, update_and_apply
from convdescent.optim.fused import fused_step

from adam_configs import CONFIG_IDS, CONFIGS

SHAPES = [(7, 5), (5,), (3, 2, 3, 3), (11, 4), (1,)]


def _params(dtype, transposed: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, shape in enumerate(SHAPES):
        t = torch.randn(shape, generator=gen, dtype=dtype)
        if transposed and t.dim() == 2:
            t = t.t().contiguous().t()  # column-major, as Dense stores its weight
        if t.dim() == 4 and transposed:
            t = t.contiguous(memory_format=torch.channels_last)
        out[f"p{i}"] = t
    return out


def _grads(params, step, transposed_grads: bool):
    gen = torch.Generator().manual_seed(100 + step)
    out = {}
    for k, p in params.items():
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if transposed_grads and g.dim() >= 2:
            g = g.transpose(0, 1).contiguous().transpose(0, 1)  # a layout unlike the parameter's
        out[k] = g
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "grads-transposed"])
@pytest.mark.parametrize("name,kwargs,torch_name,torch_kwargs", CONFIGS, ids=CONFIG_IDS)
def test_fused_step_equals_torch_fused_and_the_chain(name, kwargs, torch_name, torch_kwargs, layout, dtype):
    lr = 3e-3
    opt = make_optimizer(name, lr=lr, **kwargs)
    assert fused_step(opt) is not None
    params = _params(dtype, transposed=layout == "transposed")
    chain_params = {k: p.clone() for k, p in params.items()}
    leaves = [torch.nn.Parameter(p.clone()) for p in params.values()]
    ref = getattr(torch.optim, torch_name)(leaves, lr=lr, fused=True, **torch_kwargs)
    state = opt.init(params)
    chain_state = opt.init(chain_params)
    for step in range(6):
        grads = _grads(params, step, transposed_grads=layout == "grads-transposed")
        state = update_and_apply(opt, params, grads, state)
        updates, chain_state = opt.update({k: g.clone() for k, g in grads.items()}, chain_state, chain_params)
        optim.apply_updates(chain_params, updates)
        for leaf, g in zip(leaves, grads.values()):
            # laid out like the parameter, as autograd makes it: torch's fused kernel reads a gradient of
            # another layout in the parameter's memory order (wrong values), where update_and_apply copes
            leaf.grad = torch.empty_like(leaf).copy_(g)
        ref.step()
    for (k, p), leaf in zip(params.items(), leaves):
        assert torch.equal(p, leaf.detach()), f"{k}: differs from torch.optim.{torch_name}(fused=True)"
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(p, chain_params[k], rtol=tol, atol=tol)
        assert p.stride() == chain_params[k].stride()  # updated in place, layout kept
    adam_f = next(s for s in state if hasattr(s, "mu"))
    adam_c = next(s for s in chain_state if hasattr(s, "mu"))
    assert adam_f.count == adam_c.count == 6
    assert [s.count for s in state if hasattr(s, "schedule_state")] == [6]
    for k in params:
        torch.testing.assert_close(adam_f.mu[k], adam_c.mu[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(adam_f.nu[k], adam_c.nu[k], rtol=1e-6, atol=1e-9)


def test_fused_step_follows_parameters_and_moments_given_new_memory():
    """The fused step works out a parameter set's layout once and remembers it; a parameter given other
    memory (``p.data = ...``) or moments replaced by new tensors (a restored state) are seen, and every step
    still updates the tensors the caller holds, as the chain does."""
    opt = make_optimizer("adam", lr=3e-3, amsgrad=True)
    fused = fused_step(opt)
    params = _params(torch.float64, transposed=True)
    chain_params = {k: p.clone() for k, p in params.items()}
    state, chain_state = opt.init(params), opt.init(chain_params)
    for step in range(6):
        if step == 2:
            for p in params.values():
                p.data = p.detach().clone()  # same layout, other memory
        if step == 4:
            i = next(i for i, s in enumerate(state) if hasattr(s, "mu"))
            adam = state[i]
            copies = [{k: t.clone() for k, t in d.items()} for d in (adam.mu, adam.nu, adam.nu_max)]
            state = state[:i] + (type(adam)(adam.count, *copies),) + state[i + 1:]
        grads = _grads(params, step, False)
        new_state = fused(params, {k: g.clone() for k, g in grads.items()}, state)
        assert new_state is not None, "the fused kernel did not run"
        state = new_state
        updates, chain_state = opt.update(dict(grads), chain_state, chain_params)
        optim.apply_updates(chain_params, updates)
    for k in params:
        torch.testing.assert_close(params[k], chain_params[k], rtol=1e-12, atol=1e-12)


def test_fused_step_follows_schedules():
    """A scheduled learning rate and first-moment decay are read at each step, as the chain reads them."""
    lr = optim.cosine_decay(1e-2, 10)
    b1 = lambda t: 0.95 - 0.01 * t  # noqa: E731
    opt = optim.chain(optim.scale_by_adam(b1, 0.999, 1e-8), optim.scale_by_learning_rate(lr))
    assert fused_step(opt) is not None
    params = _params(torch.float64, transposed=True)
    chain_params = {k: p.clone() for k, p in params.items()}
    state, chain_state = opt.init(params), opt.init(chain_params)
    for step in range(8):
        grads = _grads(params, step, False)
        state = update_and_apply(opt, params, grads, state)
        updates, chain_state = opt.update(dict(grads), chain_state, chain_params)
        optim.apply_updates(chain_params, updates)
    for k in params:
        torch.testing.assert_close(params[k], chain_params[k], rtol=1e-12, atol=1e-12)
    assert optim.current_lr(opt, state) == optim.current_lr(opt, chain_state)


@pytest.mark.parametrize("make", [
    lambda: make_optimizer("adam", lr=1e-3, clip_norm=1.0),
    lambda: make_optimizer("nadam", lr=1e-3),
    lambda: make_optimizer("sgd", lr=1e-2, momentum=0.9),
    lambda: make_optimizer("adam", lr=1e-3, maximize=True),
    lambda: make_optimizer("adam", lr=1e-3, record=True),
], ids=["clipped", "nadam", "momentum", "maximize", "recorded"])
def test_other_optimizers_step_through_update_and_apply(make):
    opt = make()
    assert fused_step(opt) is None
    params = _params(torch.float32, transposed=True)
    other = {k: p.clone() for k, p in params.items()}
    state, other_state = opt.init(params), opt.init(other)
    for step in range(3):
        grads = _grads(params, step, False)
        updates, other_state = opt.update({k: g.clone() for k, g in grads.items()}, other_state, other)
        state = update_and_apply(opt, params, grads, state)
        optim.apply_updates(other, updates)
    assert all(torch.equal(params[k], other[k]) for k in params)


def test_fused_step_falls_back_where_the_kernel_does_not_go(monkeypatch):
    opt = make_optimizer("adam", lr=1e-3)
    half = {k: p.to(torch.bfloat16) for k, p in _params(torch.float32, False).items()}
    assert fused_step(opt)(half, _grads(half, 0, False), opt.init(half)) is None  # a dtype it does not take
    params = _params(torch.float32, False)
    state = opt.init(params)
    monkeypatch.setattr(fused_mod, "_ENABLED", False)
    assert fused_step(opt)(params, _grads(params, 0, False), state) is None
    before = {k: p.clone() for k, p in params.items()}
    state = update_and_apply(opt, params, _grads(params, 0, False), state)  # the chain did the step
    assert not any(torch.equal(params[k], before[k]) for k in params)
    assert state[0].count == 1


def test_mismatched_state_is_reported_by_update():
    opt = make_optimizer("adam", lr=1e-3)
    params = _params(torch.float32, False)
    state = opt.init({"other": torch.zeros(3)})
    with pytest.raises(ValueError, match="build the state with init"):
        update_and_apply(opt, params, _grads(params, 0, False), state)
