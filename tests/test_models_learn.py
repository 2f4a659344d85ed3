"""Each newer named model learns real Fashion-MNIST: a few dozen steps on a small subset take the loss down and
the test accuracy far above chance (Debian's dataset-fashion-mnist; CI installs it, this fails if absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from convdescent.data import Normalizer, load_dataset
from convdescent.losses import SoftmaxCrossEntropy
from convdescent.models import make_model
from convdescent.optim import make_optimizer
from convdescent.train.step import evaluate, train_step

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
STEPS, BATCH = 40, 64


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The first STEPS*BATCH training images and 1000 test images, normalized like a run does."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    mp.delenv("CONVDESCENT_DATA", raising=False)
    try:
        assert (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), (
            f"{DEBIAN_DIR} is missing: install Debian's dataset-fashion-mnist")
        ds = load_dataset("fashion-mnist", data_dir=DEBIAN_DIR, download=False, val_split=0)
    finally:
        mp.undo()
    n = STEPS * BATCH
    norm = Normalizer.from_data(ds.x_train[:n])
    return norm(ds.x_train[:n]), ds.y_train[:n], norm(ds.x_test[:1000]), ds.y_test[:1000]


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny", "vit_tiny"])
def test_named_model_learns_fashion_mnist(name, subset):
    x, y, xt, yt = subset
    torch.manual_seed(0)
    model = make_model(name, (1, 28, 28), 10, seed=0)
    loss_fn = SoftmaxCrossEntropy()
    opt = make_optimizer("adam", lr=2e-3)
    state = opt.init(model.params())
    losses = []
    for i in range(STEPS):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        loss, _, state = train_step(model, loss_fn, opt, state, x[sl], y[sl])
        losses.append(float(loss))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    _, acc = evaluate(model, loss_fn, xt, yt)
    assert last < 0.7 * first, (name, first, last)
    assert acc > 0.35, (name, acc)  # chance is 0.1; vit_tiny measured 0.44, the convnets above 0.5
