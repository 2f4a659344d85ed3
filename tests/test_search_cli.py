"""The lr-find, search and compare commands end to end on a small synthetic dataset, and their errors."""

import json

import pytest
import torch

from convdescent.cli import main
from convdescent.data.synthetic import synthetic_images
from convdescent.train import load_toml, resolve_config
from convdescent.train.run import train_from_config
from convdescent.search.trials import subset_dataset


@pytest.fixture(scope="module")
def npz(bands_npz):
    return bands_npz


def test_lr_find_command_prints_every_rule_and_writes_plot_and_json(npz, tmp_path, capsys):
    code = main(["lr-find", "--dataset", npz, "--val-split", "40", "--optimizer", "sgd", "--momentum", "0.9",
                 "--batch-size", "16", "--start", "1e-5", "--end", "100", "--steps", "60", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0, text
    for word in ("valley", "steepest", "min/10", "Recommended: lr =", "Good range"):
        assert word in text
    data = json.loads((tmp_path / "lr_find.json").read_text())
    assert data["recommended"] in ("valley", "steepest", "min/10") and data["recommended_lr"] > 0
    assert data["config"]["momentum"] == 0.9
    assert data["stop_reason"] in ("diverged", "non-finite loss", "reached end_lr")
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_find_command_with_a_run_configuration(npz, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(f'dataset = "{npz.replace(chr(92), "/")}"\nval_split = 40\n'
                                       f'optimizer = "adam"\nbatch_size = 16\n')
    code = main(["lr-find", "--config", str(tmp_path / "run.toml"), "--steps", "30", "--json",
                 "--out", str(tmp_path / "o")])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and out["settings"]["optimizer"] == "adam" and out["settings"]["num_steps"] == 30


def test_search_command_random_with_subset_writes_a_trainable_best_config(npz, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["search", "--dataset", npz, "--val-split", "40", "--epochs", "1", "--lr", "1e-3:3e-1",
                 "--optimizer", "sgd", "--momentum", "0,0.9", "--sampler", "random", "--trials", "3",
                 "--train-subset", "100", "--out", str(out), "--study", "cli"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "Best: trial" in text and "best.toml" in text
    summary = json.loads((out / "search.json").read_text())
    assert summary["trials"] == 3 and summary["train_subset"] == 100
    assert all(1e-3 <= r["lr"] <= 3e-1 and r["momentum"] in (0, 0.9) for r in summary["rows"])
    cfg = resolve_config(load_toml(out / "best.toml"))
    assert cfg["optimizer"] == "sgd" and cfg["lr"] == summary["best_params"]["lr"]
    result = train_from_config(dict(load_toml(out / "best.toml"), out=str(tmp_path / "full")), display="quiet",
                               stream=open("/dev/null", "w"))
    assert result.status == "completed"


@pytest.mark.parametrize("argv, message", [
    (["search", "--lr", "1e-1:1e-4"], "lr range needs LOW < HIGH, got '1e-1:1e-4'"),
    (["search", "--lr", "1e-3:1e-1", "--momentum", "0,0.9", "--optimizer", "adam"],
     "momentum varies but no optimizer searched takes it"),
    (["search", "--lr", "1e-3:1e-1", "--storage", "study.txt"], "storage 'study.txt' is not understood"),
    (["search", "--lr", "1e-3:1e-1", "--param", "batchsize=16,32"], "unknown configuration key 'batchsize'"),
    (["search", "--lr", "1e-3:1e-1", "--sampler", "grid", "--trials", "2"], "the grid has 4 points but trials=2"),
    (["compare", "--optimizers", "sgd,adamx"], "unknown optimizer 'adamx' in --optimizers"),
    (["compare", "--lr-grid", "1:2:x"], "lr grid must be LOW:HIGH:POINTS"),
    (["lr-find", "--start", "1", "--end", "0.5"], "end_lr must be larger than start_lr"),
    (["lr-find", "--optimizer", "adam", "--momentum", "0.9"], "momentum=0.9 does not apply to adam"),
])
def test_bad_arguments_give_one_clear_line_and_exit_2(npz, tmp_path, capsys, argv, message):
    code = main(argv + ["--dataset", npz, "--val-split", "40", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("convdescent: error:") and message in err and "Traceback" not in err


def test_compare_command_writes_report_and_markdown(npz, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["compare", "--dataset", npz, "--val-split", "40", "--optimizers", "sgd,momentum",
                 "--lr-grid", "1e-5,0.1", "--tune-epochs", "1", "--epochs", "1", "--seeds", "2",
                 "--batch-size", "16", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    md = (out / "compare.md").read_text()
    assert md.startswith("| optimizer | lr | test acc (mean ± std)")
    assert "| sgd | 0.1 |" in md and "| momentum |" in md
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_subset_keeps_validation_and_test_and_is_seeded():
    from convdescent.data import Dataset

    x, y = synthetic_images(50, 2, (1, 4, 4), seed=0)
    ds = Dataset("d", ["a", "b"], x[:40], y[:40], x[40:45], y[40:45], x[45:], y[45:], "synthetic")
    a = subset_dataset(ds, 10, seed=1)
    b = subset_dataset(ds, 10, seed=1)
    assert len(a.x_train) == 10 and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, subset_dataset(ds, 10, seed=2).x_train)
    assert torch.equal(a.x_val, ds.x_val) and torch.equal(a.x_test, ds.x_test)
    assert subset_dataset(ds, 100) is ds and subset_dataset(ds, None) is ds
