"""One step engine and one snapshot: what the trainer, the NaN replay and the range test share."""

from __future__ import annotations

import pytest
import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn, seed_cnn_bn
from convdescent.data import BatchLoader
from convdescent.data.synthetic import synthetic_images
from convdescent.optim import make_optimizer
from convdescent.plan import ConvPool
from convdescent.train.snapshot import Snapshot, random_states, set_random_states
from convdescent.train.step import checked_gradients, compute_gradients, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(model_fn=seed_cnn_bn, n=48, batch=8):
    x, y = synthetic_images(n, 10, (1, 12, 12), seed=1)
    loader = BatchLoader(x, y, batch, seed=3)
    model = model_fn(input_shape=(1, 12, 12), seed=2)
    opt = make_optimizer("adam", lr=1e-2)
    return model, opt, opt.init(model.params()), loader


def run_steps(model, opt, state, loader, steps):
    losses = []
    it = iter(loader)
    for _ in range(steps):
        try:
            xb, yb = next(it)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            it = iter(loader)
            xb, yb = next(it)
        loss, _, state = train_step(model, SoftmaxCrossEntropy(), opt, state, xb, yb)
        losses.append(float(loss))
    return losses, state


def test_snapshot_restores_weights_buffers_optimizer_generators_and_loader():
    model, opt, state, loader = setup()
    _, state = run_steps(model, opt, state, loader, 3)
    snap = Snapshot(model, state, loader)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    position = loader.state_dict()
    torch_draw = torch.rand(3)
    torch.set_rng_state(snap.random["torch"])
    first, state_after = run_steps(model, opt, state, loader, 8)  # dropout draws, batch norm updates, an epoch ends
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    state = snap.restore(model, state_after, loader)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert loader.state_dict()["position"] == position["position"] and loader.epoch == position["epoch"]
    assert torch.equal(torch.rand(3), torch_draw)
    torch.set_rng_state(snap.random["torch"])
    again, _ = run_steps(model, opt, state, loader, 8)
    assert again == first  # the same steps, bit for bit: nothing the steps changed was left out


def test_random_states_cover_torch_and_every_random_layer():
    model, _, _, _ = setup()
    states = random_states(model)
    assert set(states["layers"]) == {name for name, layer in model.all_layers() if hasattr(layer, "get_rng_state")}
    a = torch.rand(2)
    set_random_states(model, states)
    assert torch.equal(torch.rand(2), a)
    with pytest.raises(ValueError, match="rng states do not match the model"):
        set_random_states(seed_cnn(input_shape=(1, 12, 12), seed=0), states)


def test_the_nan_replay_runs_the_fast_plan_and_names_the_first_bad_tensor(monkeypatch):
    model, _, _, loader = setup(seed_cnn)
    model.set_fusion(True)
    calls = []
    fused = ConvPool._fused_forward

    def counted(self, x):
        out = fused(self, x)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(ConvPool, "_fused_forward", counted)
    xb, yb = next(iter(loader))
    loss, correct, grads = compute_gradients(model, SoftmaxCrossEntropy(), xb, yb)
    fast = {k: g.clone() for k, g in grads.items()}
    loss2, correct2, grads2, problem = checked_gradients(model, SoftmaxCrossEntropy(), xb, yb)
    assert problem is None and len(model.hooks) == 0
    assert calls == [True, True]  # both ran the fused node: the replay recomputes what the step computed
    assert torch.equal(loss, loss2) and torch.equal(correct, correct2)
    for k in fast:
        assert torch.equal(fast[k], grads2[k]), k
    with torch.no_grad():
        model.params()["dense1.weight"][0, 0] = float("nan")
    *_, problem = checked_gradients(model, SoftmaxCrossEntropy(), xb, yb)
    assert problem == {"where": "forward", "layer": "dense1", "tensor": "output of dense1 (Dense)"}
    with torch.no_grad():
        model.params()["dense1.weight"][0, 0] = 0.0
        model.params()["dense2.bias"][0] = float("inf")
    *_, problem = checked_gradients(model, SoftmaxCrossEntropy(), xb, yb)
    assert problem["where"] == "forward" and problem["layer"] == "dense2"
    with torch.no_grad():
        model.params()["dense2.bias"][0] = 0.0
    bad = xb.clone()
    bad[0, 0, 0, 0] = float("nan")
    *_, problem = checked_gradients(model, SoftmaxCrossEntropy(), bad, yb)
    assert problem == {"where": "forward", "layer": "input", "tensor": "input batch"}


@pytest.mark.parametrize("fusion", [True, False])
def test_the_nan_replay_names_the_layer_inside_a_fused_node(fusion):
    """A NaN made by conv1 inside the fused conv1+relu1+pool1 pass is named at conv1 (the node's members
    run one by one on the node's input), as the unfused plan names it."""
    model, _, _, loader = setup(seed_cnn)
    model.set_fusion(fusion)
    xb, yb = next(iter(loader))
    with torch.no_grad():
        model.params()["conv1.weight"][0, 0, 0, 0] = float("nan")
    *_, problem = checked_gradients(model, SoftmaxCrossEntropy(), xb, yb)
    assert problem["where"] == "forward" and problem["layer"] == "conv1", problem
    if fusion and "conv1+relu1+pool1" in str(model.plan()):
        assert "inside the fused pass conv1+relu1+pool1" in problem["tensor"]
    else:
        assert problem["tensor"] == "output of conv1 (Conv2D)"
    assert len(model.hooks) == 0
