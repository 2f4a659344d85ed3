"""How Sequential runs its layers (its plan): chunks of the leading sample-wise layers, ReLU moved after
max-pool, column-major Dense weights. Each is a speed device that must not change a gradient beyond rounding."""

import os

import pytest
import torch

from convdescent import (Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy, Tanh,
                         seed_cnn)
from convdescent.optim import apply_updates, make_optimizer

NATIVE_OFF = os.environ.get("CONVDESCENT_NATIVE") == "0"


def grads_of(model, x, y):
    model.set_input_grad(True)
    loss, dlogits = SoftmaxCrossEntropy()(model(x, train=True), y)
    dx = model.backward(dlogits)
    return loss, {k: g.clone() for k, g in model.grads().items()}, dx


def torch_grads(model, x, y):
    net = model.to_torch()
    xt = x.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(net(xt), y)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in net.named_parameters()}, xt.grad


@pytest.mark.parametrize("mode", ["fused", "large-patches", "fusion-off"])
@pytest.mark.parametrize("chunk_size", [0, 1, 7, 32, 1000])
@pytest.mark.parametrize("batch", [1, 5, 50])
def test_chunked_forward_backward_equals_autograd(chunk_size, batch, mode, monkeypatch):
    # With its conv fused into the max-pool the tutorial's CNN runs unchunked; unfused, it runs in chunks.
    if mode == "large-patches":
        monkeypatch.setattr(Conv2D, "FUSE_MAX_PATCH", 0)
    torch.manual_seed(batch)
    model = seed_cnn(seed=3, dtype=torch.float64)
    model.set_fusion(mode != "fusion-off")
    model.chunk_size = chunk_size
    # CI also runs this with CONVDESCENT_NATIVE=0, which leaves nothing to fuse
    fused = mode == "fused" and not NATIVE_OFF
    plan = model.plan()
    assert sum(len(node.members) for node in plan.head) == (0 if fused or not chunk_size else 4)
    assert (plan.nodes[0].label == "conv1+relu1+pool1") == fused
    x = torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    loss, grads, dx = grads_of(model, x, y)
    t_loss, t_grads, t_dx = torch_grads(model, x, y)
    assert torch.allclose(loss, t_loss, rtol=0, atol=1e-12)
    assert set(grads) == set(t_grads)
    for k in grads:
        assert torch.allclose(grads[k], t_grads[k], rtol=1e-10, atol=1e-13), k
    assert torch.allclose(dx, t_dx, rtol=1e-10, atol=1e-14)


def test_relu_runs_after_maxpool_and_gradients_match_the_written_order(monkeypatch):
    # The reordering alone, bit for bit: the fused conv+pool pass (which rounds its dot products in another
    # order, checked in test_native.py) is turned off.
    monkeypatch.setattr(Conv2D, "FUSE_MAX_PATCH", 0)
    torch.manual_seed(0)
    layers = [Conv2D(4, 3), ReLU(), MaxPool2D(2), Conv2D(3, 3, padding="same"), ReLU(), MaxPool2D(2),
              Flatten(), Dense(5)]
    model = Sequential(layers, input_shape=(2, 13, 13), seed=1, dtype=torch.float64)
    model.set_fusion(True)
    labels = [node.label for node in model.plan().nodes]
    assert labels[:4] == ["conv1", "relu1+pool1", "conv2", "relu2+pool2"]
    assert "reordered" in model.plan().nodes[1].how
    # many exact zeros and ties: the pooled windows of a ReLU'd map are often all zero
    x = torch.randn(6, 2, 13, 13, dtype=torch.float64).round()
    y = torch.randint(0, 5, (6,))
    _, swapped, dx_swapped = grads_of(model, x, y)
    # with fusion off every layer runs on its own, in written order
    model.set_fusion(False)
    assert [node.label for node in model.plan().nodes][:3] == ["conv1", "relu1", "pool1"]
    _, written, dx_written = grads_of(model, x, y)
    model.set_fusion(True)
    for k in swapped:
        assert torch.equal(swapped[k], written[k]), k
    assert torch.equal(dx_swapped, dx_written)
    # an after_forward hook on the ReLU needs its own output: the pair splits and says so
    seen = []
    handle = model.register_hook("after_forward", lambda name, layer, out: seen.append(name), layer="relu1")
    assert [node.label for node in model.plan().nodes][:3] == ["conv1", "relu1", "pool1"]
    assert any("relu1+pool1: not fused" in note for note in model.plan().notes)
    _, hooked, _ = grads_of(model, x, y)
    handle.remove()
    assert seen == ["relu1"] and model.plan().nodes[1].label == "relu1+pool1"
    for k in swapped:
        assert torch.equal(swapped[k], hooked[k]), k
    _, t_grads, t_dx = torch_grads(model, x, y)
    for k in swapped:
        assert torch.allclose(swapped[k], t_grads[k], rtol=1e-10, atol=1e-13), k


def test_other_activations_are_not_moved():
    model = Sequential([Conv2D(2, 3), Tanh(), MaxPool2D(2), Flatten(), Dense(3)], input_shape=(1, 8, 8))
    assert [node.members[0][1] for node in model.plan().nodes] == model.layers


def test_dense_weight_is_column_major_and_updates_keep_the_layout():
    model = seed_cnn(seed=0)
    w = model.params()["dense1.weight"]
    assert w.shape == (128, 5408) and w.t().is_contiguous()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = make_optimizer("adam", lr=1e-3)
    state = opt.init(model.params())
    loss, dlogits = SoftmaxCrossEntropy()(model(x, train=True), y)
    model.backward(dlogits)
    g = model.grads()["dense1.weight"]
    assert g.stride() == w.stride()
    before = w.clone()
    updates, state = opt.update(model.grads(), state, model.params())
    apply_updates(model.params(), updates)
    assert model.params()["dense1.weight"] is w and not torch.equal(w, before)
    # state_dict round trip into a fresh model keeps values (and the fresh model's own layout)
    other = seed_cnn(seed=5)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.params()["dense1.weight"], w)
    assert torch.equal(other.to_torch()(x), model.to_torch()(x))
