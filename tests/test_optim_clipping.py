"""Clipping properties, AGC against a per-unit reference written from the paper, and the recorder."""

import pytest
import torch

from convdescent import optim

SHAPES = {"conv1.weight": (5, 3, 3, 3), "conv1.bias": (5,), "dense1.weight": (4, 12), "dense1.bias": (4,)}


def rand(seed, scale=1.0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


def total_norm(d):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())).item()


def apply(tx, grads, params=None, state=None):
    state = tx.init(params or grads) if state is None else state
    updates, state = tx.update({k: v.clone() for k, v in grads.items()}, state, params)
    return dict(updates), state


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("max_norm", [0.5, 3.0])
def test_global_norm_clip_gives_min_of_norm_and_bound(scale, max_norm):
    grads = rand(1, scale)
    before = total_norm(grads)
    clipped, state = apply(optim.clip_by_global_norm(max_norm), grads)
    after = total_norm(clipped)
    assert after == pytest.approx(min(before, max_norm), rel=1e-6)
    assert bool(state.fired) == (before > max_norm)
    if before <= max_norm:
        assert all(torch.equal(clipped[k], grads[k]) for k in grads)
    # Direction is kept.
    ratio = {k: clipped[k] / grads[k] for k in grads}
    first = next(iter(ratio.values())).flatten()[0]
    assert all(torch.allclose(r, first.expand_as(r), rtol=1e-5) for r in ratio.values())
    again, state2 = apply(optim.clip_by_global_norm(max_norm), clipped)
    for k in grads:
        torch.testing.assert_close(again[k], clipped[k], rtol=1e-6, atol=0.0)


def test_global_norm_clip_keeps_nan_visible():
    grads = rand(2)
    grads["dense1.bias"][0] = float("nan")
    clipped, _ = apply(optim.clip_by_global_norm(1.0), grads)
    assert torch.isnan(clipped["dense1.bias"]).any()


def test_global_norm_clip_of_zero_gradients_is_zero():
    grads = {k: torch.zeros_like(v) for k, v in rand(0).items()}
    clipped, state = apply(optim.clip_by_global_norm(1.0), grads)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in clipped.values()) and not bool(state.fired)


@pytest.mark.parametrize("bound", [0.1, 1.0, 10.0])
def test_value_clip_bounds_every_element(bound):
    grads = rand(3, 2.0)
    clipped, state = apply(optim.clip_by_value(bound), grads)
    for k in grads:
        assert clipped[k].abs().max() <= torch.tensor(bound, dtype=clipped[k].dtype)
        inside = grads[k].abs() <= bound
        assert torch.equal(clipped[k][inside], grads[k][inside])
        assert torch.equal(clipped[k][~inside], bound * grads[k][~inside].sign())
    assert bool(state.fired) == any((g.abs() > bound).any().item() for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_peak_magnitudes_equal_the_infinity_norm(dtype):
    """max |x| of each tensor, as torch's infinity norm gives it: signs, NaN, +-inf, empty, 0-d, strided."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(7, 5, generator=g), torch.randn(4, generator=g) - 10, torch.randn(3, 6, generator=g).t(),
            torch.randn(2, 3, 4, 4, generator=g).contiguous(memory_format=torch.channels_last), torch.tensor(-2.5),
            torch.empty(0, 3), torch.zeros(6)]
    special = []
    for value in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 9):
            t = torch.randn(12, generator=g)
            t[pos] = value
            special.append(t)
    mixed = torch.randn(8, generator=g)
    mixed[1], mixed[5] = float("inf"), float("nan")
    values = [t.to(dtype) for t in base + special + [mixed]]
    got = optim.peak_magnitudes(values)
    assert len(got) == len(values) and all(a.shape == () and a.dtype == dtype for a in got)
    assert got[5] == 0  # the empty tensor, which torch's infinity norm refuses
    nonempty = [i for i, t in enumerate(values) if t.numel()]
    want = torch._foreach_norm([values[i] for i in nonempty], ord=float("inf"))
    for i, b in zip(nonempty, want):
        torch.testing.assert_close(got[i], b.reshape(()), equal_nan=True, rtol=0, atol=0,
                                   msg=lambda m: f"{values[i]}: {m}")


def test_per_tensor_norm_clip():
    grads = rand(4)
    grads["conv1.bias"] *= 1e-3
    clipped, state = apply(optim.clip_by_norm(1.0), grads)
    for k in grads:
        n = grads[k].norm().item()
        assert clipped[k].norm().item() == pytest.approx(min(n, 1.0), rel=1e-6)
    assert torch.equal(clipped["conv1.bias"], grads["conv1.bias"])
    assert bool(state.fired)


def agc_reference(grads, params, clipping, eps):
    """AGC as in Brock et al. (2021), eq. 3, one unit (output row / filter) at a time."""
    out = {}
    for k, g in grads.items():
        w = params[k]
        g = g.clone()
        if g.ndim <= 1:
            units = [(slice(None),)]
        else:
            units = [(i,) for i in range(g.shape[0])]
        for idx in units:
            w_norm = max(w[idx].norm().item(), eps)
            g_norm = g[idx].norm().item()
            if g_norm / w_norm > clipping:
                g[idx] = g[idx] * (clipping * w_norm / g_norm)
        out[k] = g
    return out


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_adaptive_grad_clip_matches_unitwise_reference(clipping):
    params = rand(5)
    params["conv1.weight"][0] = 0.0  # a dead filter: the eps floor decides its bound
    grads = rand(6, 0.3)
    ours, state = apply(optim.adaptive_grad_clip(clipping, eps=1e-3), grads, params)
    ref = agc_reference(grads, params, clipping, 1e-3)
    for k in grads:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-7)
    assert bool(state.fired) == any(not torch.equal(ref[k], grads[k]) for k in grads)


def test_adaptive_grad_clip_exclude_and_needs_params():
    params, grads = rand(7), rand(8, 10.0)
    ours, _ = apply(optim.adaptive_grad_clip(0.01, exclude=["dense1.weight"]), grads, params)
    assert torch.equal(ours["dense1.weight"], grads["dense1.weight"])
    assert not torch.equal(ours["conv1.weight"], grads["conv1.weight"])
    tx = optim.adaptive_grad_clip(0.01)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(grads, tx.init(params))
    with pytest.raises(ValueError, match="exclude must be a list of parameter names"):
        optim.adaptive_grad_clip(0.01, exclude="dense1.weight")


def test_unitwise_norm_shapes():
    assert optim.unitwise_norm(torch.ones(5, 3, 3, 3)).shape == (5, 1, 1, 1)
    assert optim.unitwise_norm(torch.ones(4, 12)).shape == (4, 1)
    assert optim.unitwise_norm(torch.ones(4)).shape == ()
    torch.testing.assert_close(optim.unitwise_norm(torch.ones(4, 9)), torch.full((4, 1), 3.0))


# ----- recorder ------------------------------------------------------------------------------------------

def _grad_fn(params):
    return {k: 3.0 * (p - 0.2) + torch.sin(p) for k, p in params.items()}


@pytest.mark.parametrize("name,hp", [("sgd", {"momentum": 0.9, "lr": 0.05}), ("adam", {"lr": 0.05}),
                                     ("adamw", {"lr": 0.05, "weight_decay": 0.1}), ("gd", {"lr": 0.05})])
def test_recorder_changes_nothing_and_records_truth(name, hp):
    plain = optim.make_optimizer(name, clip_norm=2.0, **hp)
    recorded = optim.make_optimizer(name, clip_norm=2.0, record=True, **hp)
    p1, p2 = rand(9), rand(9)
    s1, s2 = plain.init(p1), recorded.init(p2)
    fired_count = 0
    for _ in range(12):
        g1, g2 = _grad_fn(p1), _grad_fn(p2)
        true_grad_norm = total_norm(g2)
        u1, s1 = plain.update(g1, s1, p1)
        optim.apply_updates(p1, u1)
        before = {k: v.clone() for k, v in p2.items()}
        u2, s2 = recorded.update(g2, s2, p2)
        optim.apply_updates(p2, u2)
        stats = optim.optimizer_stats(s2)
        assert stats["grad_norm"].item() == pytest.approx(true_grad_norm, rel=1e-5)
        assert bool(stats["clipped"]) == (true_grad_norm > 2.0)
        fired_count += true_grad_norm > 2.0
        step = {k: p2[k] - before[k] for k in p2}
        assert stats["update_norm"].item() == pytest.approx(total_norm(step), rel=1e-4)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)  # bit for bit: recording changed nothing
    stats = optim.optimizer_stats(s2)
    assert stats["steps"] == 12 and stats["clipped_steps"].item() == fired_count > 0
    assert optim.optimizer_stats(s1) is None


def test_recorded_values_are_fresh_tensors_each_step():
    tx = optim.make_optimizer("adam", record=True)
    params = rand(10)
    state = tx.init(params)
    kept = []
    for _ in range(3):
        updates, state = tx.update(_grad_fn(params), state, params)
        optim.apply_updates(params, updates)
        kept.append(optim.optimizer_stats(state)["grad_norm"])
    assert len({id(t) for t in kept}) == 3
    assert len({t.item() for t in kept}) == 3


def test_clip_by_norm_on_a_block_of_rows_uses_the_norm_of_the_whole_tensor():
    """Inside across_shards, a tensor split over processes (rows 0-1 of dense1.weight here, rows 2-3 on
    a simulated other process) is clipped by the norm of all its rows, as on one process."""
    from convdescent.optim.sharding import across_shards

    grads = rand(4, scale=3.0)
    whole, _ = apply(optim.clip_by_norm(1.0), grads)
    other_rows = grads["dense1.weight"][2:].square().sum().reshape(1)
    calls = []

    def reducer(t):  # the other process holds the rest of dense1.weight and nothing else
        calls.append(t.clone())
        return t + other_rows if len(calls) == 1 else t

    piece = {"dense1.weight": grads["dense1.weight"][:2].clone(), "dense1.bias": grads["dense1.bias"].clone()}
    tx = optim.clip_by_norm(1.0)
    with across_shards(reducer, split=["dense1.weight"]):
        clipped, state = tx.update(piece, tx.init(piece))
    torch.testing.assert_close(clipped["dense1.weight"], whole["dense1.weight"][:2])
    torch.testing.assert_close(clipped["dense1.bias"], whole["dense1.bias"])
    assert len(calls) == 2 and bool(state.fired)  # one reduction of the split norms, one of the flag
    # Without the split the block is clipped by its own norm, which is smaller: a different result.
    alone, _ = apply(optim.clip_by_norm(1.0), {"dense1.weight": grads["dense1.weight"][:2]})
    assert not torch.allclose(alone["dense1.weight"], whole["dense1.weight"][:2])
