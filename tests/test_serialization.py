"""save_model / load_model and initializers in configurations: every model that trains saves and loads."""

from __future__ import annotations

import pytest
import torch

from convdescent import init
from convdescent.layers import BatchNorm2D, Conv2D, Dense, Flatten, ReLU, Residual
from convdescent.model import Sequential
from convdescent.models import MODELS, make_model
from convdescent.serialization import ModelFileError, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _my_init(shape, generator=None, dtype=torch.float32, device="cpu"):
    return torch.full(shape, 0.01, dtype=dtype, device=device)


def _small(kernel_init="glorot_uniform"):
    return Sequential([Conv2D(4, 3, kernel_init=kernel_init), BatchNorm2D(), ReLU(),
                       Residual([Conv2D(4, 3, padding="same"), ReLU()]), Flatten(), Dense(3, kernel_init=kernel_init)],
                      input_shape=(1, 8, 8), seed=0)


def test_registered_callable_writes_its_name():
    model = _small(kernel_init=init.he_normal)
    assert model.get_config()["layers"][0]["config"]["kernel_init"] == "he_normal"
    rebuilt = Sequential.from_config(model.get_config(), seed=0)
    assert rebuilt.layers[0].kernel_init == "he_normal"


def test_unregistered_callable_saves_and_loads_with_its_weights(tmp_path):
    model = _small(kernel_init=_my_init)
    cfg = model.get_config()
    assert cfg["layers"][0]["config"]["kernel_init"] == "custom"
    path = save_model(model, tmp_path / "m.pt")
    back = load_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(back.forward(x), model.forward(x), rtol=0, atol=0)
    # rebuilt without weights, the placeholder stands in (zeros, to be replaced by loaded weights)
    assert torch.count_nonzero(Sequential.from_config(cfg).params()["conv1.weight"]) == 0


def test_register_initializer_round_trips_by_name():
    init.register_initializer("test_point_01", _my_init)
    try:
        model = _small(kernel_init=_my_init)
        assert model.get_config()["layers"][0]["config"]["kernel_init"] == "test_point_01"
        assert torch.all(Sequential.from_config(model.get_config()).params()["conv1.weight"] == 0.01)
    finally:
        del init.INITIALIZERS["test_point_01"]
    with pytest.raises(ValueError, match="other than 'custom'"):
        init.register_initializer("custom", _my_init)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_named_model_saves_and_loads(name, tmp_path):
    shape = (3, 32, 32) if name == "3c3d" else (1, 28, 28)
    model = make_model(name, shape, seed=1)
    path = save_model(model, tmp_path / f"{name}.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "convdescent-model" and set(raw["state"]) == set(model.state_dict())
    back = load_model(path)
    assert back.get_config() == model.get_config()
    x = torch.rand((2,) + shape)
    torch.testing.assert_close(back.forward(x), model.forward(x), rtol=0, atol=0)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="cannot read model file"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ModelFileError, match="not a convdescent model file"):
        load_model(other)
    with pytest.raises(ValueError, match="needs a built model"):
        save_model(Sequential([Dense(2)]), tmp_path / "x.pt")


def test_trained_run_with_custom_initializer_loads(tmp_path):
    """The bug this fixes: a run whose model used a callable initializer could not be read back."""
    from convdescent.data.synthetic import write_npz_dataset
    from convdescent.models import register_model
    from convdescent.train.run import load_run, train_from_config

    @register_model("test_custom_init")
    def _builder(input_shape=(1, 8, 8), num_classes=10, seed=None, dtype=torch.float32, device="cpu"):
        return Sequential([Flatten(), Dense(num_classes, kernel_init=_my_init)], input_shape=input_shape,
                          seed=seed, dtype=dtype, device=device, name="test_custom_init")

    try:
        npz = tmp_path / "syn.npz"
        write_npz_dataset(npz, n=40, num_classes=3, shape=(1, 8, 8), seed=2)
        res = train_from_config({"model": "test_custom_init", "dataset": f"npz:{npz}", "epochs": 1,
                                 "val_split": 8, "batch_size": 8, "log_every": 0}, out=tmp_path / "runs",
                                display="none", handle_signals=False)
        run = load_run(res.run_dir, checkpoint="last")
        torch.testing.assert_close(run.model.params()["dense1.weight"], res.model.params()["dense1.weight"])
    finally:
        del MODELS["test_custom_init"]
