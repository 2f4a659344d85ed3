"""The convdescent command end to end on a small synthetic dataset: train (display variants), evaluate,
predict, report, runs, optimizers; errors at the edges give one line and exit 2, non-finite stops exit 3."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convdescent.cli import build_parser, main
from convdescent.data.synthetic import write_npz_dataset

CLASSES = ["zero", "one", "two", "three"]


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _builtin_sections(builtin_sections_only):
    """Report sections other modules register are tested with those modules."""


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn.npz"
    write_npz_dataset(path, n=200, num_classes=4, shape=(1, 12, 12), classes=CLASSES, seed=7)
    return path


@pytest.fixture(scope="module")
def trained(npz, tmp_path_factory, capsys_module, builtin_sections_only):
    out = tmp_path_factory.mktemp("runs")
    code = main(["train", "--model", "seed_cnn", "--dataset", f"npz:{npz}", "--val-split", "40", "--epochs", "3",
                 "--batch-size", "16", "--lr", "3e-3", "--log-every", "2", "--out", str(out), "--name", "cli"])
    captured = capsys_module.readouterr()
    assert code == 0, captured.err
    (run_dir,) = out.iterdir()
    return run_dir, captured.out, captured.err


@pytest.fixture(scope="module")
def capsys_module(request):
    # a module-scoped stand-in for capsys: capture through the capture manager of pytest
    capman = request.config.pluginmanager.getplugin("capturemanager")

    class Reader:
        def readouterr(self):
            return capman.read_global_capture()

    capman.read_global_capture()
    return Reader()


def run(capsys, *argv):
    try:
        code = main(list(map(str, argv)))
    except SystemExit as e:  # argparse refused a flag (as the console script exits)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_complete_run_directory(trained):
    run_dir, out, _ = trained
    assert re.fullmatch(r"\d{8}-\d{6}-cli", run_dir.name)
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.toml", "metrics.jsonl", "checkpoints", "summary.json", "report.html", "evaluation.npz",
            "confusion.png"} <= names
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    lines = out.splitlines()
    assert lines[0] == f"Run {run_dir}"
    assert lines[2].startswith("Optimizer chain(scale_by_adam(")
    epochs = [l for l in lines if l.startswith("Epoch ")]
    assert len(epochs) == 3 and epochs[2].startswith("Epoch 3/3 - loss ")
    assert re.search(r"^Best val_acc \d\.\d{4} \(epoch \d\) - final val_acc \d\.\d{4} - test_acc \d\.\d{4} - "
                     r"wall time \d+\.\ds$", out, re.M)
    assert lines[-1] == f"Run written to {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 3 and summary["test_acc"] > 0.5
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["type"] for r in records]
    assert kinds.count("epoch") == 3 and kinds.count("step") == 15  # 10 steps an epoch, a record every 2
    step = next(r for r in records if r["type"] == "step")
    assert {"loss", "acc", "lr", "grad_norm", "layer_grad_norms", "time"} <= set(step)
    assert set(step["layer_grad_norms"]) == {"conv1", "dense1", "dense2"}


def test_json_lines_and_quiet(npz, tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--dataset", f"npz:{npz}", "--val-split", "40", "--epochs", "2",
                       "--batch-size", "32", "--out", tmp_path, "--json-lines", "--log-every", "0", "--no-report")
    assert code == 0
    recs = [json.loads(l) for l in out.splitlines()]
    assert [r["type"] for r in recs] == ["epoch", "epoch", "summary"]
    assert recs[-1]["status"] == "completed" and 0 <= recs[-1]["test_acc"] <= 1
    code, out, _ = run(capsys, "train", "--dataset", f"npz:{npz}", "--val-split", "40", "--epochs", "1",
                       "--batch-size", "32", "--out", tmp_path, "--quiet", "--no-report")
    assert code == 0 and out.splitlines()[0].startswith("Best val_acc") and len(out.splitlines()) == 2


def test_evaluate(trained, capsys, tmp_path):
    run_dir, _, _ = trained
    code, out, _ = run(capsys, "evaluate", run_dir)
    assert code == 0
    assert "accuracy" in out and "per-class accuracy" in out and "confusion matrix" in out
    for c in CLASSES:
        assert re.search(rf"^\s+{c}\s+\d\.\d{{3}}\s+\(\d+ images\)$", out, re.M)
    assert (run_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "evaluate", run_dir, "--json", "--split", "val", "--checkpoint", "last",
                       "--output", tmp_path / "c.png")
    rec = json.loads(out)
    assert code == 0 and rec["split"] == "val" and rec["n"] == 40 and rec["checkpoint"] == "last"
    assert sum(map(sum, rec["confusion"])) == 40 and set(rec["per_class_acc"]) == set(CLASSES)
    assert Image.open(tmp_path / "c.png").size[0] > 100


def test_predict_converts_or_refuses(trained, capsys, tmp_path):
    run_dir, _, _ = trained
    from convdescent.data.folder import load_npz

    x = load_npz(Path(json.loads((run_dir / "summary.json").read_text())["dataset"][4:]))["x_test"]
    exact = tmp_path / "exact.png"
    Image.fromarray(x[0, 0].numpy(), "L").save(exact)
    big_rgb = tmp_path / "big.png"
    Image.fromarray(np.repeat(np.kron(x[1, 0].numpy(), np.ones((2, 2), np.uint8))[:, :, None], 3, 2), "RGB").save(big_rgb)
    code, out, err = run(capsys, "predict", run_dir, exact, big_rgb, "--top-k", "2")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    for line in lines:
        m = re.fullmatch(r"(.+): 1\. (\w+) (\d\.\d{3})  2\. (\w+) (\d\.\d{3})", line)
        assert m and m.group(2) in CLASSES and float(m.group(3)) >= float(m.group(5))
    assert "big.png: converted RGB to grayscale" in err and "resized 24x24 to 12x12" in err
    assert "exact.png" not in err
    code, out, err = run(capsys, "predict", run_dir, big_rgb, "--strict")
    assert code == 2 and err.startswith("convdescent: error: image ") and "drop --strict" in err
    code, out, err = run(capsys, "predict", run_dir, tmp_path / "missing.png")
    assert code == 2 and "does not exist" in err
    code, out, _ = run(capsys, "predict", run_dir, exact, "--json", "--top-k", "10")
    rec = json.loads(out)
    assert len(rec["top"]) == 4 and abs(sum(t["probability"] for t in rec["top"]) - 1) < 1e-5


def test_report_runs_and_optimizers(trained, capsys, tmp_path):
    run_dir, _, _ = trained
    code, out, _ = run(capsys, "report", run_dir, "--output", tmp_path / "r.html")
    assert code == 0 and (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    code, out, _ = run(capsys, "runs", "--dir", run_dir.parent)
    assert code == 0 and run_dir.name in out and "completed" in out and "3/3" in out
    code, out, _ = run(capsys, "runs", "--dir", run_dir.parent, "--json")
    assert json.loads(out.splitlines()[0])["run"] == run_dir.name
    code, out, _ = run(capsys, "optimizers")
    assert code == 0 and "adam" in out and "cosine" in out and "reduce_on_plateau" in out


def test_command_groups_are_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "evaluate", "predict", "report", "runs", "optimizers", "data"} <= set(sub.choices)


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nope", "--epochs", "1"], "unknown model 'nope'"),
    (["train", "--epochs", "0"], "--epochs 0 is out of range: epochs must be an integer >= 1"),
    (["train", "--momentum", "1.5", "--optimizer", "sgd"], "--momentum 1.5 is out of range: momentum must be in [0, 1)"),
    (["train", "--optimizer", "adam", "--momentum", "0.9", "--epochs", "1"], "momentum=0.9 does not apply to adam"),
    (["train", "--schedule", "warp", "--epochs", "1"], "unknown schedule 'warp'"),
    (["train", "--epochs", "2", "--steps", "5"], "give --epochs or --steps, not both"),
    (["train", "--config", "/nonexistent/run.toml"], "configuration file /nonexistent/run.toml does not exist"),
    (["train", "--resume", "/nonexistent/run"], "/nonexistent/run is not a run directory"),
    (["evaluate", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
])
def test_errors_are_one_line_and_exit_2(argv, message, npz, tmp_path, capsys):
    if argv[0] == "train" and "--config" not in argv and "--resume" not in argv:
        argv = argv + ["--dataset", f"npz:{npz}", "--val-split", "40", "--out", str(tmp_path)]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("convdescent: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_dataset_and_corrupt_checkpoint(trained, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--dataset", f"npz:{tmp_path}/none.npz", "--out", tmp_path)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    run_dir, _, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.toml", "summary.json"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    (copy / "checkpoints").mkdir()
    data = (run_dir / "checkpoints" / "best.pt").read_bytes()
    (copy / "checkpoints" / "best.pt").write_bytes(data[: len(data) // 3])
    code, _, err = run(capsys, "evaluate", copy)
    assert code == 2 and "truncated or corrupt" in err and "Traceback" not in err
    torch.save({"weights": torch.zeros(3)}, copy / "checkpoints" / "best.pt")
    code, _, err = run(capsys, "predict", copy, tmp_path / "x.png")
    assert code == 2 and "is not a convdescent checkpoint" in err


def test_nonfinite_stop_exits_3_naming_step_and_layer(npz, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--dataset", f"npz:{npz}", "--val-split", "40", "--epochs", "2",
                         "--batch-size", "16", "--optimizer", "sgd", "--lr", "1e8", "--out", tmp_path)
    assert code == 3
    assert re.search(r"training stopped: non-finite loss or gradient at step \d+ \(epoch 1, batch \d+", err)
    assert re.search(r"(output of|gradient of|parameter) (conv1|dense1|dense2|relu\d|maxpool1|flatten1)", err)
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and "step" in summary["error"]
    assert (run_dir / "report.html").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_device_flag_of_commands_that_run_a_model(trained, capsys, tmp_path, command):
    """--device cpu runs; a device that is not there or not a device name is one clear error, exit 2."""
    run_dir, _, _ = trained
    image = tmp_path / "blank.png"
    Image.fromarray(np.zeros((12, 12), np.uint8), "L").save(image)
    extra = [image] if command == "predict" else []
    code, _, err = run(capsys, command, run_dir, *extra, "--device", "cpu")
    assert code == 0, err
    code, _, err = run(capsys, command, run_dir, *extra, "--device", "tpu")
    assert code == 2 and err.count("\n") == 1 and "--device must be auto, cpu, cuda or cuda:N, got 'tpu'" in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, command, run_dir, *extra, "--device", "cuda")
        assert code == 2 and err.count("\n") == 1 and "no CUDA device" in err
