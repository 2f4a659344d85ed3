"""Non-finite values: a huge learning rate stops the run naming the step, layer and tensor (the same step
a per-step check finds), and --on-nan rollback restores the last good state, halves the rate and recovers."""

from __future__ import annotations

import math

import pytest
import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.data import BatchLoader
from convdescent.data.synthetic import synthetic_images
from convdescent.optim import make_optimizer
from convdescent.train import NonFiniteError, fit
from convdescent.train.step import train_step


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


X, Y = synthetic_images(192, 4, (1, 8, 8), seed=0)
LAYERS = {"conv1", "relu1", "maxpool1", "flatten1", "dense1", "relu2", "dense2"}


def first_bad_step_by_brute_force(lr: float, steps: int) -> int | None:
    """Run the same loop with a check after every step: the first step whose loss or parameters are
    non-finite."""
    m = seed_cnn((1, 8, 8), 4, seed=0)
    opt = make_optimizer("sgd", lr=lr)
    state = opt.init(m.params())
    loader = BatchLoader(X, Y, 16, shuffle=True, seed=0)
    step = 0
    while step < steps:
        for xb, yb in loader:
            step += 1
            loss, _, state = train_step(m, SoftmaxCrossEntropy(), opt, state, xb, yb)
            if not math.isfinite(float(loss)) or not all(torch.isfinite(p).all() for p in m.params().values()):
                return step
            if step == steps:
                return None
    return None


@pytest.mark.parametrize("lr, check_every", [(1e8, 50), (1e5, 2), (1e5, 50)])
def test_nan_stops_naming_the_step_layer_and_tensor(lr, check_every):
    expected = first_bad_step_by_brute_force(lr, 36)
    assert expected is not None
    m = seed_cnn((1, 8, 8), 4, seed=0)
    with pytest.raises(NonFiniteError) as info:
        fit(m, SoftmaxCrossEntropy(), make_optimizer("sgd", lr=lr), (X, Y), epochs=3, batch_size=16, verbose=0,
            nan_check_every=check_every)
    e = info.value
    assert e.step == expected
    assert e.layer in LAYERS and e.tensor and e.where in ("forward", "loss", "backward", "update")
    text = str(e)
    assert f"step {e.step}" in text and e.layer in text and "learning rate is" in text
    # the model is left in the last good state: the one just before the bad step
    assert all(torch.isfinite(p).all() for p in m.params().values())
    assert e.history is not None and [ev["event"] for ev in e.history.events] == ["nonfinite"]


def test_rollback_halves_the_rate_and_recovers():
    m = seed_cnn((1, 8, 8), 4, seed=0)
    h = fit(m, SoftmaxCrossEntropy(), make_optimizer("sgd", lr=1e5), (X, Y), epochs=3, batch_size=16, verbose=0,
            on_nan="rollback", max_rollbacks=12, nan_check_every=4)
    rollbacks = [e for e in h.events if e["event"] == "rollback"]
    assert rollbacks, "the run should have rolled back at least once"
    assert [e["count"] for e in rollbacks] == list(range(1, len(rollbacks) + 1))
    for e in rollbacks:
        assert e["lr"] == pytest.approx(1e5 * 0.5 ** e["count"])
        assert e["to_step"] < e["detected_at"] and e["to_step"] % 4 == 0
        assert e["layer"] in LAYERS
    assert len(h) == 3 and h.step[-1] == 36
    assert all(torch.isfinite(p).all() for p in m.params().values())
    assert all(math.isfinite(v) for v in h.loss)
    assert h.lr[-1] == pytest.approx(1e5 * 0.5 ** len(rollbacks))


def test_rollback_gives_up_after_max_rollbacks():
    with pytest.raises(NonFiniteError, match="gave up after 1 rollbacks") as info:
        fit(seed_cnn((1, 8, 8), 4, seed=0), SoftmaxCrossEntropy(), make_optimizer("sgd", lr=1e8), (X, Y),
            epochs=3, batch_size=16, verbose=0, on_nan="rollback", max_rollbacks=1)
    events = [e["event"] for e in info.value.history.events]
    assert events == ["rollback", "nonfinite"]


def test_nan_in_full_batch_mode_is_located():
    with pytest.raises(NonFiniteError) as info:
        fit(seed_cnn((1, 8, 8), 4, seed=0), SoftmaxCrossEntropy(), make_optimizer("sgd", lr=1e8), (X, Y),
            epochs=5, batch_size="full", chunk_size=64, verbose=0)
    assert info.value.step is not None and info.value.step <= 5
    assert info.value.layer in LAYERS
