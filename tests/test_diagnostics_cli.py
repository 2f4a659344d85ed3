"""The gradcheck command: every layer type and whole models pass; a flipped sign in one layer's backward
fails and names that layer; kinks crossed by a finite-difference step are reported, not judged; the
commands are reachable from the main ``convdescent`` command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from convdescent import Conv2D, Dense, Flatten, ReLU, Sequential, SoftmaxCrossEntropy
from convdescent.cli import main as convdescent_main
from convdescent.diagnostics.cli import main as diag_main
from convdescent.diagnostics.layer_check import (autograd_rows, check_layer_types, format_rows, model_rows,
                                                 summarize, verdict)


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def test_verdicts_follow_the_cs231n_thresholds():
    assert verdict(3e-8) == "good"
    assert verdict(2e-6) == "acceptable near kinks"
    assert verdict(5e-3) == "wrong"
    assert verdict(float("nan"), kinks=4) == "kink crossed"
    assert verdict(float("nan"), kinks=0) == "wrong"


def test_every_registered_layer_type_is_checked_and_passes():
    rows, missing = check_layer_types(max_elements=16)
    assert missing == []
    kinds = {r.layer for r in rows}
    assert {"Conv2D", "Dense", "MaxPool2D", "AvgPool2D", "ReLU", "BatchNorm2D", "Dropout", "Residual",
            "TorchModule"} <= kinds
    assert summarize(rows)["ok"], format_rows([r for r in rows if r.verdict == "wrong"])
    assert all(r.verdict == "good" for r in rows if r.layer in ("Conv2D", "Dense"))


def test_gradcheck_command_passes_on_the_tutorial_cnn(capsys):
    code = diag_main(["gradcheck", "--model", "seed_cnn", "--max-elements", "24"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "Every layer type" in text and "explicit backward vs torch.autograd through to_torch()" in text
    assert text.strip().splitlines()[-1].startswith("OK: ")
    code = diag_main(["gradcheck", "--model", "seed_cnn", "--max-elements", "8", "--no-layer-types", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"] and data["wrong"] == []
    names = [(r["layer"], r["param"]) for s in data["sections"] for r in s["rows"]]
    assert ("conv1", "weight") in names and ("dense2", "bias") in names and ("input", "input") in names


def test_a_flipped_sign_fails_and_names_the_layer(monkeypatch, capsys):
    original = Conv2D.backward

    def broken(self, dy):
        dx = original(self, dy)
        self.grads["weight"] = -self.grads["weight"]  # one sign flipped in the conv layer's backward
        return dx

    monkeypatch.setattr(Conv2D, "backward", broken)
    code = diag_main(["gradcheck", "--model", "seed_cnn", "--max-elements", "16"])
    text = capsys.readouterr().out
    assert code == 1
    last = text.strip().splitlines()[-1]
    assert last.startswith("WRONG gradients in") and "conv1" in last and "Conv2D" in last
    assert "dense1" not in last and "dense2" not in last  # the correct layers are not blamed
    wrong = [line for line in text.splitlines() if "WRONG" in line and "weight" in line]
    assert any(line.startswith("conv1") for line in wrong) and any(line.startswith("Conv2D") for line in wrong)
    code = diag_main(["gradcheck", "--model", "seed_cnn", "--max-elements", "8", "--no-layer-types", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["wrong_layers"] == ["conv1"]
    assert "model: conv1.weight" in data["wrong"] and "autograd: conv1.weight" in data["wrong"]


def test_kinks_are_reported_not_judged():
    # a ReLU whose input sits 1e-7 from zero: a central difference with eps 1e-5 crosses the kink
    model = Sequential([Flatten(), Dense(3), ReLU(), Dense(2)], input_shape=(1, 2, 2), seed=0,
                       dtype=torch.float64)
    x = torch.tensor([[[[0.5, -1.0], [2.0, 0.25]]]], dtype=torch.float64)
    with torch.no_grad():
        d = model.layers[1]
        pre = x.flatten(1) @ d.params["weight"].t()
        d.params["bias"].copy_(-pre[0] + torch.tensor([1e-7, 0.5, -0.5], dtype=torch.float64))
    rows = model_rows(model, SoftmaxCrossEntropy(), x, torch.tensor([1]), eps=1e-5, max_elements=None)
    crossed = [r for r in rows if r.kinks]
    assert crossed, format_rows(rows)
    assert all(r.verdict != "wrong" for r in rows), format_rows(rows)
    table = format_rows(rows)
    assert "crossed" in table
    assert summarize(rows)["kinks"] == sum(r.kinks for r in rows) > 0


def test_autograd_comparison_in_eval_mode_with_dropout():
    from convdescent import Dropout

    model = Sequential([Conv2D(2, 3), ReLU(), Flatten(), Dropout(0.5), Dense(3)], input_shape=(1, 5, 5), seed=0)
    x = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    rows, mode = autograd_rows(model, SoftmaxCrossEntropy(), x, torch.tensor([0, 1, 2, 0]))
    assert mode == "eval" and all(r.verdict == "good" for r in rows)
    rows, mode = autograd_rows(Sequential([Conv2D(2, 3), Flatten(), Dense(3)], input_shape=(1, 5, 5), seed=0),
                               SoftmaxCrossEntropy(), x, torch.tensor([0, 1, 2, 0]))
    assert mode == "train" and all(math.isfinite(r.rel_error) and r.rel_error < 1e-10 for r in rows)


def test_commands_are_part_of_the_main_command_line(capsys):
    code = convdescent_main(["gradcheck", "--model", "seed_cnn", "--no-layer-types", "--max-elements", "4",
                             "--input-shape", "1,12,12", "--num-classes", "3", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "random input (1, 1, 12, 12)" in out
    assert convdescent_main(["gradcheck", "--model", "no_such_model", "--no-layer-types"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convdescent_main(["gradcheck", "--input-shape", "28,28"])
    assert "--input-shape must be C,H,W" in capsys.readouterr().err
    for command in ("border", "explain", "filters", "landscape"):
        with pytest.raises(SystemExit) as info:
            convdescent_main([command, "--help"])
        assert info.value.code == 0
        assert command in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from convdescent.data.synthetic import write_npz_dataset
    from convdescent.train.run import train_from_config

    tmp = tmp_path_factory.mktemp("gradcheck-run")
    npz = tmp / "syn.npz"
    write_npz_dataset(npz, n=60, num_classes=3, shape=(1, 10, 10), seed=6)
    res = train_from_config({"model": "seed_cnn", "dataset": f"npz:{npz}", "val_split": 10, "epochs": 1,
                             "batch_size": 10, "log_every": 0}, out=tmp / "runs", display="quiet",
                            handle_signals=False)
    return res.run_dir


def test_gradcheck_and_border_on_a_run_directory(tiny_run, capsys):
    code = diag_main(["gradcheck", "--run", str(tiny_run), "--no-layer-types", "--max-elements", "8",
                      "--batch-size", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 test images" in out and out.strip().splitlines()[-1].startswith("OK: ")
    code = diag_main(["border", "--run", str(tiny_run), "--examples", "10", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(data["figures"]) == {"valid (init)", "same (init)", "trained (valid)"}
    assert "reach" not in data["figures"]["trained (valid)"]  # same geometry as "valid": counted once
    assert all((tiny_run / "diagnostics" / n).is_file() for n in ("border_counts.png", "border_gradients.png"))
