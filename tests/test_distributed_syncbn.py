"""Batch norm over the global batch (convdescent.distributed.sync_batchnorm) on 2 and 3 gloo processes.

Each process gets its slice of one batch, the slices of unequal sizes (one of a single example). The forward
output, dL/dx, the parameter gradients and the running statistics are compared with one process running
batch norm over the whole batch (the engine, and torch autograd in float64). Tolerances: 1e-10 relative and
absolute in float64 (the only differences are the order of the sums and the variance taken as
E[x^2] - mu^2), 1e-5 for the one float32 layer case (inputs of mean 5 and deviation 2: the variance from sums of
squares loses about one digit there).
"""

import pytest
import torch
import torch.nn.functional as F

from spawn_ranks import run_ranks

from convdescent.layers import (BatchNorm1D, BatchNorm2D, Conv2D, Dense, GlobalAvgPool2D, ReLU, Residual)
from convdescent.losses import SoftmaxCrossEntropy
from convdescent.model import Sequential

TOL = dict(rtol=1e-10, atol=1e-10)
TOL32 = dict(rtol=1e-5, atol=1e-5)
DT = torch.float64
# Slices of one batch of 7 examples (a batch of 1 on a process is fine when the global batch is larger).
SLICES = {2: [(0, 3), (3, 7)], 3: [(0, 1), (1, 3), (3, 7)]}
# (class, per-example shape, momentum, dtype)
LAYER_CASES = [(BatchNorm2D, (3, 4, 5), 0.1, DT), (BatchNorm2D, (2, 3, 3), None, DT), (BatchNorm1D, (5,), 0.3, DT),
               (BatchNorm1D, (4, 6), 0.1, DT), (BatchNorm2D, (3, 4, 5), 0.1, torch.float32)]


# ----- the cases, built alike in the test and in every process -------------------------------------------

def layer_case(i: int):
    """A built batch-norm layer in a model, with random weight, bias and running statistics, and x, dy."""
    cls, shape, momentum, dt = LAYER_CASES[i]
    gen = torch.Generator().manual_seed(100 + i)
    layer = cls(momentum=momentum)
    model = Sequential([layer], input_shape=shape, dtype=dt)
    layer.needs_input_grad = True
    c = shape[0]
    with torch.no_grad():
        layer.params["weight"].copy_(torch.rand(c, generator=gen, dtype=DT) + 0.5)
        layer.params["bias"].copy_(torch.randn(c, generator=gen, dtype=DT))
        layer.running_mean.copy_(torch.randn(c, generator=gen, dtype=DT))
        layer.running_var.copy_(torch.rand(c, generator=gen, dtype=DT) + 0.5)
        layer.num_batches_tracked.fill_(2)
    # An offset far from zero, so that the variance from sums of squares is tested where it is hardest.
    x = (torch.randn((7,) + shape, generator=gen, dtype=DT) * 2.0 + 5.0).to(dt)
    dy = torch.randn((7,) + shape, generator=gen, dtype=DT).to(dt)
    return model, layer, x, dy


def bn_model():
    """Conv -> BN -> ReLU -> Residual(conv, BN) -> ReLU -> pool -> Dense -> BN1D -> ReLU -> Dense, random BN."""
    model = Sequential([Conv2D(4, 3, padding=1, use_bias=False), BatchNorm2D(), ReLU(),
                        Residual([Conv2D(4, 3, padding=1, use_bias=False), BatchNorm2D()]), ReLU(),
                        GlobalAvgPool2D(), Dense(6, use_bias=False), BatchNorm1D(), ReLU(), Dense(3)],
                       input_shape=(2, 6, 6), seed=0, dtype=DT)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.params().items():
            if name.startswith(("bn", "residual1.bn")):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=DT) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=gen, dtype=DT))
    model.set_input_grad(True)
    return model


def model_batch():
    gen = torch.Generator().manual_seed(8)
    return torch.randn(7, 2, 6, 6, generator=gen, dtype=DT) + 1.0, torch.randint(0, 3, (7,), generator=gen)


# ----- what each process runs -----------------------------------------------------------------------------

def _worker(rank: int, world: int, out_dir: str) -> None:
    from convdescent.distributed.syncbn import sync_batchnorm

    lo, hi = SLICES[world][rank]
    out = {"layers": [], "model": {}}
    for i in range(len(LAYER_CASES)):
        model, layer, x, dy = layer_case(i)
        assert sync_batchnorm(model) == 1
        y = model.forward(x[lo:hi], train=True)
        dx = model.backward(dy[lo:hi])
        y_eval = model.forward(x[lo:hi], train=False)  # running statistics, no communication
        out["layers"].append({"y": y, "dx": dx, "y_eval": y_eval, "grads": dict(model.grads()),
                              "buffers": dict(model.buffers())})

    model = bn_model()
    out["model"]["changed"] = sync_batchnorm(model)
    x, labels = model_batch()
    logits = model.forward(x[lo:hi], train=True)
    _, dlogits = SoftmaxCrossEntropy()(logits, labels[lo:hi])  # this process's mean loss
    dx = model.backward(dlogits)
    out["model"].update(logits=logits, dx=dx, grads=dict(model.grads()), buffers=dict(model.buffers()),
                        reducers=[type(layer.stats_reducer).__name__ for _, layer in model.all_layers()
                                  if hasattr(layer, "stats_reducer")])

    # Equal slices of the first 6 examples.
    model = bn_model()
    sync_batchnorm(model)
    n = 6 // world
    logits = model.forward(x[rank * n:(rank + 1) * n], train=True)
    _, dlogits = SoftmaxCrossEntropy()(logits, labels[rank * n:(rank + 1) * n])
    dx = model.backward(dlogits)
    out["equal"] = {"dx": dx, "grads": dict(model.grads()), "buffers": dict(model.buffers())}
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}proc")
def ranks(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"syncbn{world}")
    run_ranks(_worker, world, str(out), timeout=90)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


# ----- the checks -------------------------------------------------------------------------------------------

def torch_bn(layer, x, dy):
    """Whole-batch batch norm by torch autograd in float64: output, dL/dx, dL/dweight, dL/dbias, running
    stats, each returned in the layer's dtype."""
    x = x.to(DT).requires_grad_(True)
    w = layer.params["weight"].to(DT).requires_grad_(True)
    b = layer.params["bias"].to(DT).requires_grad_(True)
    rm, rv = layer.running_mean.to(DT), layer.running_var.to(DT)
    momentum = layer.momentum if layer.momentum is not None else 1.0 / (float(layer.num_batches_tracked) + 1)
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=layer.eps)
    y.backward(dy.to(DT))
    dt = layer.params["weight"].dtype
    return tuple(t.detach().to(dt) for t in (y, x.grad, w.grad, b.grad, rm, rv))


@pytest.mark.parametrize("case", range(len(LAYER_CASES)))
def test_synced_layer_matches_one_process_over_the_whole_batch(ranks, case):
    world, outs = ranks
    tol = TOL if LAYER_CASES[case][3] == DT else TOL32
    # The engine's batch norm on one process, the whole batch.
    model, layer, x, dy = layer_case(case)
    y_ref = model.forward(x, train=True)
    dx_ref = model.backward(dy)
    grads_ref, buffers_ref = dict(model.grads()), dict(model.buffers())
    y_eval_ref = model.forward(x, train=False)
    # Torch autograd, the whole batch, from the same starting state.
    _, layer0, x0, _ = layer_case(case)
    y_t, dx_t, dw_t, db_t, rm_t, rv_t = torch_bn(layer0, x0, dy)

    parts = [o["layers"][case] for o in outs]
    y = torch.cat([p["y"] for p in parts])
    dx = torch.cat([p["dx"] for p in parts])
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(y, y_t, **tol)
    torch.testing.assert_close(dx, dx_t, **tol)
    # Each process keeps the sums over its own slice: together they are the whole batch's.
    for key, ref_t in (("weight", dw_t), ("bias", db_t)):
        total = sum(p["grads"][f"{layer.name}.{key}"] for p in parts)
        torch.testing.assert_close(total, grads_ref[f"{layer.name}.{key}"], **tol)
        torch.testing.assert_close(total, ref_t, **tol)
        local = parts[0]["grads"][f"{layer.name}.{key}"]
        assert not torch.allclose(local, total), "a process's parameter gradient must stay its local sum"
    # Every process ends with the running statistics of the whole batch (unbiased variance, global count).
    for p in parts:
        for key, value in buffers_ref.items():
            torch.testing.assert_close(p["buffers"][key], value, **tol)
        torch.testing.assert_close(p["buffers"][f"{layer.name}.running_mean"], rm_t, **tol)
        torch.testing.assert_close(p["buffers"][f"{layer.name}.running_var"], rv_t, **tol)
    # Evaluation: the running statistics, unchanged.
    torch.testing.assert_close(torch.cat([p["y_eval"] for p in parts]), y_eval_ref, **tol)


def test_synced_model_gradients_average_to_the_global_mean_loss(ranks):
    """Each process: the mean loss of its slice, backward; the parameter gradients averaged over processes
    are then the gradient of L = (1/N) sum_r mean_{i in slice r} loss_i for one model over the whole batch
    (the global mean loss when the slices are equal), and each process's dL/dx is N times dL/dx of its slice."""
    world, outs = ranks
    model = bn_model()
    n_bn = sum(1 for _, layer in model.all_layers() if isinstance(layer, (BatchNorm1D, BatchNorm2D)))
    assert n_bn == 3
    for o in outs:
        assert o["model"]["changed"] == n_bn
        assert o["model"]["reducers"] == ["AllReduceSum"] * n_bn

    x, labels = model_batch()
    net = model.to_torch()
    net.train()
    xt = x.clone().requires_grad_(True)
    logits = net(xt)
    loss = sum(F.cross_entropy(logits[lo:hi], labels[lo:hi]) for lo, hi in SLICES[world]) / world
    loss.backward()
    torch.testing.assert_close(torch.cat([o["model"]["logits"] for o in outs]), logits.detach(), **TOL)
    torch.testing.assert_close(torch.cat([o["model"]["dx"] for o in outs]) / world, xt.grad, **TOL)
    torch_grads = dict(zip(model.params(), net.parameters()))
    for name in model.params():
        mean = sum(o["model"]["grads"][name] for o in outs) / world
        torch.testing.assert_close(mean, torch_grads[name].grad, **TOL, msg=name)
    # The export keeps the layers' order, so the buffers pair up in order.
    buffers_t = [b for _, b in net.named_buffers()]
    for o in outs:
        assert len(o["model"]["buffers"]) == len(buffers_t)
        for (key, value), theirs in zip(o["model"]["buffers"].items(), buffers_t):
            torch.testing.assert_close(value, theirs, **TOL, msg=key)


def test_equal_slices_average_to_the_single_process_step(ranks):
    """With equal slices the averaged gradients are the engine's own single-process gradient of the mean
    loss over the whole batch, and the running statistics its running statistics."""
    world, outs = ranks
    model = bn_model()
    x, labels = model_batch()
    logits = model.forward(x[:6], train=True)
    _, dl = SoftmaxCrossEntropy()(logits, labels[:6])
    dx = model.backward(dl)
    torch.testing.assert_close(torch.cat([o["equal"]["dx"] for o in outs]) / world, dx, **TOL)
    for name, g in model.grads().items():
        mean = sum(o["equal"]["grads"][name] for o in outs) / world
        torch.testing.assert_close(mean, g, **TOL, msg=name)
    for o in outs:
        for key, value in model.buffers().items():
            torch.testing.assert_close(o["equal"]["buffers"][key], value, **TOL, msg=key)


def test_sync_batchnorm_needs_a_process_group():
    from convdescent.distributed.syncbn import sync_batchnorm

    with pytest.raises(RuntimeError, match="init_process_group"):
        sync_batchnorm(bn_model())


def _peer_gone(rank, world):
    import os
    import time

    from convdescent.distributed import DistributedError
    from convdescent.distributed.syncbn import AllReduceSum

    if rank == 1:
        os._exit(0)  # leaves without a word: its peer's next reduction fails
    time.sleep(1.0)
    try:
        AllReduceSum()(torch.ones(3))
    except DistributedError as e:
        assert "rank 0 lost contact" in str(e) and "synced batch norm" in str(e), str(e)
    else:
        raise AssertionError("the reduction succeeded without its peer")


def test_a_peer_gone_during_a_synced_reduction_is_the_run_s_one_error_not_a_traceback():
    """The reductions run inside the forward and backward, outside the step's own collectives: a dead peer
    there is the same DistributedError as anywhere else in the step."""
    run_ranks(_peer_gone, 2, timeout=90)
