"""Learner: fit, fit_one_cycle, lr_find, evaluate, predict, save/load and summary on the CLI's Trainer."""

from __future__ import annotations

import io

import pytest
import torch

from convdescent.learner import Learner
from convdescent.serialization import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from convdescent.data import load_dataset
    from convdescent.data.synthetic import write_npz_dataset

    path = tmp_path_factory.mktemp("learner") / "syn.npz"
    write_npz_dataset(path, n=120, num_classes=3, shape=(1, 10, 10), seed=8)
    return load_dataset(f"npz:{path}", val_split=20)


def test_fit_learns_and_continues(data):
    learner = Learner("seed_cnn", data, optimizer="adam", lr=3e-3, batch_size=16, verbose="quiet")
    before = learner.evaluate()["acc"]
    h = learner.fit(2)
    assert len(h) == 2 and len(learner.history) == 2
    learner.fit(1)
    assert learner.history.epoch == [1, 2, 3]
    after = learner.evaluate()
    assert after["acc"] > max(before, 0.8)
    probs = learner.predict(data.x_test)
    assert probs.shape == (len(data.x_test), 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(data.x_test)))
    assert (probs.argmax(1) == data.y_test).double().mean().item() == pytest.approx(after["acc"])
    assert learner.predict(data.x_test[0]).shape == (1, 3)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 10, 10\)"):
        learner.predict(torch.zeros(2, 3, 10, 10))


def test_fit_one_cycle_and_lr_find_and_summary(data):
    learner = Learner("seed_cnn", data, batch_size=16, verbose="quiet", normalize="dataset")
    start = {k: v.clone() for k, v in learner.model.state_dict().items()}
    result = learner.lr_find(num_steps=20, end_lr=1.0)
    assert len(result.lrs) > 5
    for k, v in learner.model.state_dict().items():  # the range test leaves the model as it was
        assert torch.equal(v, start[k])
    learner.fit_one_cycle(2, max_lr=5e-3)
    lrs = learner.history.lr
    assert len(lrs) == 2 and lrs[0] > lrs[1]  # the second epoch ends in the annealing phase
    assert learner.evaluate("val")["acc"] > 0.8
    text = learner.summary()
    assert "Total params" in text and "120" not in text.splitlines()[0] and "adam" in text


def test_save_and_load(data, tmp_path):
    learner = Learner("seed_cnn", data, batch_size=16, verbose="quiet", normalize="dataset")
    learner.fit(1)
    path = learner.save(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["classes"] == list(data.classes)
    model = load_model(path)
    x = torch.rand(2, 1, 10, 10)
    torch.testing.assert_close(model.forward(x), learner.model.forward(x))
    again = Learner.load(path, data, verbose="quiet")
    torch.testing.assert_close(again.predict(data.x_test), learner.predict(data.x_test))


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
        Learner("seed_cnn", data, optimizer="adamm")
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        Learner("seed_cnn", data, lr=-1)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        Learner("nope", data)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        Learner("seed_cnn", data, verbose="quiet").fit(0)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
def test_named_network_learns_on_a_small_set(data, name):
    learner = Learner(name, data, lr=3e-3, batch_size=16, verbose="quiet")
    first = learner.evaluate("train")["loss"]
    learner.fit(3)
    assert learner.evaluate("train")["loss"] < 0.5 * first
    assert learner.evaluate()["acc"] > 0.6  # three classes: chance is 1/3


def test_vit_tiny_learns_on_a_small_set(tmp_path):
    from convdescent.data import load_dataset
    from convdescent.data.synthetic import write_npz_dataset

    path = tmp_path / "syn12.npz"
    write_npz_dataset(path, n=120, num_classes=3, shape=(1, 12, 12), seed=8)
    learner = Learner("vit_tiny", load_dataset(f"npz:{path}", val_split=20), lr=1e-3, batch_size=16,
                      verbose="quiet")
    first = learner.evaluate("train")["loss"]
    learner.fit(10)
    assert learner.evaluate("train")["loss"] < 0.3 * first
    assert learner.evaluate()["acc"] > 0.6  # three classes: chance is 1/3
