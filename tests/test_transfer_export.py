"""--init-from / --freeze, and export to ONNX (run in onnxruntime) and TorchScript."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from convdescent.cli import main as convdescent_main
from convdescent.models import make_model
from convdescent.optim import make_optimizer
from convdescent.optim.fused import update_and_apply
from convdescent.optim.masked import freeze
from convdescent.transfer import frozen_params, init_from_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    from convdescent.data.synthetic import write_npz_dataset

    path = tmp_path_factory.mktemp("transfer") / "syn.npz"
    write_npz_dataset(path, n=80, num_classes=3, shape=(1, 10, 10), seed=5)
    return path


def _train(npz, out, *extra):
    args = ["train", "--dataset", f"npz:{npz}", "--epochs", "1", "--batch-size", "8", "--val-split", "16",
            "--log-every", "0", "--no-report", "--out", str(out), *extra]
    return convdescent_main(args)


@pytest.fixture(scope="module")
def base_run(npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("base-runs")
    assert _train(npz, out, "--quiet", "--normalize", "dataset", "--model", "seed_cnn") == 0
    (run,) = out.iterdir()
    return run


def test_freeze_keeps_params_and_matches_training_the_rest():
    model = make_model("seed_cnn", (1, 10, 10), 3, seed=0)
    params = model.params()
    frozen = frozen_params(model, "conv1")
    assert frozen == ["conv1.weight", "conv1.bias"]
    adam = make_optimizer("adam", lr=1e-2)
    tx = freeze(adam, frozen)
    state = tx.init(params)
    ref = {k: v.clone() for k, v in params.items() if k not in frozen}
    ref_state = adam.init(ref)
    before = {k: v.clone() for k, v in params.items()}
    for step in range(3):
        grads = {k: torch.randn_like(v, generator=torch.Generator().manual_seed(step)) for k, v in params.items()}
        if step % 2:
            state = update_and_apply(tx, params, dict(grads), state)
        else:
            updates, state = tx.update(dict(grads), state, params)
            for k, u in updates.items():
                params[k].add_(u)
        ref_state = update_and_apply(adam, ref, {k: g for k, g in grads.items() if k not in frozen}, ref_state)
    for k in frozen:
        assert torch.equal(params[k], before[k])
    for k, v in ref.items():
        torch.testing.assert_close(params[k], v, rtol=1e-6, atol=1e-7)
        assert not torch.equal(v, before[k])


def test_freeze_patterns():
    model = make_model("resnet8", (1, 12, 12), 3, seed=0)
    names = frozen_params(model, "residual1")
    assert names and all(n.startswith("residual1.") for n in names)
    assert frozen_params(model, "conv*") == [n for n in model.params() if n.startswith("conv")]
    with pytest.raises(ValueError, match="'conv9' matches no parameter.*conv1"):
        frozen_params(model, "conv9")


def test_init_from_loads_by_name_and_shape_and_says_what_not(base_run, npz, tmp_path, capsys):
    from convdescent.models import register_model, MODELS
    from convdescent.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
    from convdescent.model import Sequential
    from convdescent.train.run import load_run

    @register_model("test_wider_head")
    def _wider(input_shape=(1, 10, 10), num_classes=3, seed=None, dtype=torch.float32, device="cpu"):
        return Sequential([Conv2D(32, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(64), ReLU(), Dense(num_classes)],
                          input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="test_wider_head")

    try:
        src = load_run(base_run, "last").model
        model = make_model("test_wider_head", (1, 10, 10), 3, seed=9)
        report = init_from_run(model, base_run, "last")
        assert torch.equal(model.params()["conv1.weight"], src.params()["conv1.weight"])
        assert set(report.loaded) == {"conv1.weight", "conv1.bias", "dense2.bias"}
        assert {n for n, _ in report.not_loaded} == {"dense1.weight", "dense1.bias", "dense2.weight"}
        assert "shape (3, 64) here, (3, 128) in the run" in "\n".join(report.lines())
        # the CLI says the same and trains on, conv1 frozen
        out = tmp_path / "runs"
        assert _train(npz, out, "--model", "test_wider_head", "--init-from", str(base_run), "--checkpoint",
                      "last", "--freeze", "conv1") == 0
        text = capsys.readouterr().out
        assert "Initialized 3 of 6 tensors" in text and "not loaded: dense1.weight" in text
        assert "Frozen: 2 parameter tensors (conv1.weight, conv1.bias)" in text
        (run,) = out.iterdir()
        trained = load_run(run, "last").model
        assert torch.equal(trained.params()["conv1.weight"], src.params()["conv1.weight"])
        assert not torch.equal(trained.params()["dense2.bias"], src.params()["dense2.bias"])
    finally:
        del MODELS["test_wider_head"]


def test_init_from_and_freeze_errors(base_run, npz, tmp_path, capsys):
    assert _train(npz, tmp_path, "--init-from", str(tmp_path / "nope")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _train(npz, tmp_path, "--freeze", "dense7") == 2
    assert "'dense7' matches no parameter" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no half-written run directory


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_the_run_test_accuracy(base_run, tmp_path, fmt, capsys):
    from convdescent.data import load_dataset
    from convdescent.train.run import load_run

    out = tmp_path / f"model.{fmt}"
    assert convdescent_main(["export", str(base_run), "--format", fmt, "--checkpoint", "best",
                             "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    run = load_run(base_run, "best")
    data = load_dataset(run.dataset, val_split=run.config["val_split"], seed=run.config["split_seed"])
    pixels = data.x_test.to(torch.float32)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(["logits"], {"pixels": pixels.numpy()})[0])
    else:
        logits = torch.jit.load(str(out))(pixels)
    ref = run.model.predict(run.normalizer(data.x_test))
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    acc = (logits.argmax(1) == data.y_test).double().mean().item()
    summary = json.loads((base_run / "summary.json").read_text())
    assert acc == pytest.approx(summary["test_acc"], abs=1e-12)


def test_export_errors(base_run, tmp_path, capsys):
    assert convdescent_main(["export", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not a run directory" in capsys.readouterr().err
