"""Model files (TOML): named models round-trip, files train like named models, errors name layer, key, value."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from convdescent.cli import main as convdescent_main
from convdescent.model_file import ModelFileError, load_model_file, model_from_toml, model_to_toml
from convdescent.models import MODELS, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _shape(name):
    return (3, 32, 32) if name == "3c3d" else (1, 28, 28)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_named_model_round_trips_through_toml(name):
    model = make_model(name, _shape(name), seed=3)
    text = model_to_toml(model)
    back = model_from_toml(tomllib.loads(text), seed=3, source=f"{name}.toml")
    assert back.get_config() == model.get_config()
    for key, value in model.state_dict().items():  # same seed, same initial weights
        assert torch.equal(back.state_dict()[key], value), key


def test_residual_blocks_in_a_file(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text('''
name = "tiny_res"
[[layers]]
type = "Conv2D"
filters = 4
kernel_size = 3
padding = "same"
[[layers]]
type = "Residual"
projection = "auto"
  [[layers.layers]]
  type = "Conv2D"
  filters = 8
  kernel_size = 3
  stride = 2
  padding = 1
  [[layers.layers]]
  type = "ReLU"
[[layers]]
type = "GlobalAvgPool2D"
[[layers]]
type = "Dense"
units = 3
''')
    model = load_model_file(path, input_shape=(1, 8, 8), num_classes=3, seed=0)
    assert model.name == "tiny_res"
    assert "residual1.projection.weight" in model.params()
    assert model.forward(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def _file(tmp_path, layers: str, top: str = ""):
    path = tmp_path / "bad.toml"
    path.write_text(top + layers)
    return path


@pytest.mark.parametrize("layers,expected", [
    ('[[layers]]\ntype = "Conv3D"\n', r"layer 1 has unknown type 'Conv3D'; did you mean 'Conv2D'\?"),
    ('[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "Dense"\nunit = 3\n',
     r"layer 2 \(Dense\): unknown key 'unit' \(value 3\); did you mean 'units'\?"),
    ('[[layers]]\ntype = "Conv2D"\nfilters = -3\n',
     r"layer 1 \(Conv2D\) \(key 'filters' = -3\): filters must be a positive int, got -3"),
    ('[[layers]]\ntype = "Dense"\nunits = 3\n',
     r"layer 1 \(Dense\) receives shape \(1, 8, 8\) from the input: .*Flatten"),
    ('[[layers]]\ntype = "Conv2D"\nfilters = 2\nkernel_size = 9\n[[layers]]\ntype = "Flatten"\n',
     r"layer 1 \(Conv2D\) receives shape \(1, 8, 8\) from the input: .*does not fit"),
    ('[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "Dense"\nunits = 4\n',
     r"the last layer, layer 2 \(Dense\), gives outputs of shape \(4,\), the data has 3 classes"),
    ('[[layers]]\ntype = "Residual"\n  [[layers.layers]]\n  type = "Conv2D"\n  filters = 5\n  kernel_size = 3\n'
     '  padding = "same"\n',
     r"layer 1 \(Residual\) receives shape \(1, 8, 8\) from the input: .*projection='auto'"),
    ('[[layers]]\ntype = "Residual"\n  [[layers.layers]]\n  type = "Conv2D"\n  filtrs = 5\n',
     r"layer 1 \(Residual\) > layer 1 \(Conv2D\): unknown key 'filtrs'"),
    ('', r"no layers"),
])
def test_errors_name_layer_key_value_and_shapes(tmp_path, layers, expected):
    with pytest.raises(ModelFileError, match=expected):
        load_model_file(_file(tmp_path, layers), input_shape=(1, 8, 8), num_classes=3)


def test_file_level_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model_file(tmp_path / "none.toml")
    with pytest.raises(ModelFileError, match="not valid TOML"):
        load_model_file(_file(tmp_path, "[[layers]\n"))
    with pytest.raises(ModelFileError, match="unknown top-level key 'layer'; did you mean 'layers'"):
        load_model_file(_file(tmp_path, '[[layer]]\ntype = "ReLU"\n'), input_shape=(1, 8, 8))
    with pytest.raises(ModelFileError, match=r"input_shape \[1, 28, 28\] does not match the data's images \[1, 8, 8\]"):
        load_model_file(_file(tmp_path, '[[layers]]\ntype = "Flatten"\n', "input_shape = [1, 28, 28]\n"),
                        input_shape=(1, 8, 8))


def test_models_command_lists_and_shows(capsys, tmp_path):
    assert convdescent_main(["models"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out
    assert "1x28x28" in out and "3,274,634" in out  # 2c2d's parameter count, as its docstring says
    assert convdescent_main(["models", "--show", "seed_cnn", "--toml"]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text)["layers"][0]["type"] == "Conv2D"
    assert convdescent_main(["models", "--show", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_model_file_trains_exactly_as_the_named_model(tmp_path, capsys):
    from convdescent.data.synthetic import write_npz_dataset
    from convdescent.train.run import load_run

    npz = tmp_path / "syn.npz"
    write_npz_dataset(npz, n=48, num_classes=3, shape=(1, 10, 10), seed=4)
    assert convdescent_main(["models", "--show", "seed_cnn", "--toml", "--input-shape", "1,10,10",
                             "--classes", "3"]) == 0
    net = tmp_path / "net.toml"
    net.write_text(capsys.readouterr().out)
    common = ["train", "--dataset", f"npz:{npz}", "--epochs", "1", "--batch-size", "8", "--val-split", "8",
              "--log-every", "0", "--no-report", "--quiet", "--out", str(tmp_path / "runs")]
    assert convdescent_main(common + ["--model", "seed_cnn", "--name", "named"]) == 0
    assert convdescent_main(common + ["--model-file", str(net)]) == 0
    runs = {p.name.split("-", 2)[2]: p for p in (tmp_path / "runs").iterdir()}
    assert set(runs) == {"named", "net"}
    a, b = load_run(runs["named"], "last"), load_run(runs["net"], "last")
    for key, value in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[key], value), key
    assert convdescent_main(common + ["--model-file", str(tmp_path / "none.toml")]) == 2
    assert "model file" in capsys.readouterr().err


def test_a_model_file_run_needs_the_file_no_more(tmp_path, capsys):
    """Resume, load_run, evaluate and export read the run itself after the model file is deleted or edited."""
    from convdescent.data.synthetic import write_npz_dataset
    from convdescent.model_file import load_model_file
    from convdescent.train.run import load_run

    npz = tmp_path / "syn.npz"
    write_npz_dataset(npz, n=48, num_classes=3, shape=(1, 10, 10), seed=4)
    assert convdescent_main(["models", "--show", "resnet8", "--toml", "--input-shape", "1,10,10",
                             "--classes", "3"]) == 0
    net = tmp_path / "net.toml"
    net.write_text(capsys.readouterr().out)
    common = ["--log-every", "0", "--no-report", "--quiet"]
    out = tmp_path / "runs"
    assert convdescent_main(["train", "--dataset", f"npz:{npz}", "--model-file", str(net), "--steps", "2",
                             "--batch-size", "8", "--val-split", "8", "--out", str(out), *common]) == 0
    (run,) = out.iterdir()
    copy = run / "model.toml"
    assert copy.is_file()
    assert load_model_file(copy, (1, 10, 10), 3).get_config()["layers"] == load_run(run, "last").model.get_config()["layers"]
    net.write_text("this is not TOML [")  # edited into something unreadable ...
    assert convdescent_main(["train", "--resume", str(run), "--steps", "4", *common]) == 0
    net.unlink()  # ... and deleted
    capsys.readouterr()
    assert load_run(run, "last").summary["steps"] == 4
    assert convdescent_main(["train", "--resume", str(run), "--steps", "5", *common]) == 0
    assert load_run(run, "last").summary["steps"] == 5
    capsys.readouterr()
    assert convdescent_main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] > 0 and 0.0 <= result["acc"] <= 1.0
    exported = tmp_path / "m.pt"
    assert convdescent_main(["export", str(run), "--format", "torchscript", "--out", str(exported)]) == 0
    pixels = torch.zeros((2, 1, 10, 10))
    assert torch.jit.load(str(exported))(pixels).shape == (2, 3)
    # the copy trains the same network again
    assert convdescent_main(["train", "--dataset", f"npz:{npz}", "--model-file", str(copy), "--steps", "1",
                             "--batch-size", "8", "--val-split", "8", "--out", str(tmp_path / "again"),
                             *common]) == 0
