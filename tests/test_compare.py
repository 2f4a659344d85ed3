"""convdescent compare: optimizer specs, the tune-then-rerun protocol, statistics, and the written report."""

import json
import math
import statistics

import numpy as np
import pytest

from convdescent.data.synthetic import synthetic_images
from convdescent.search.compare import (CompareError, CompareSettings, default_lr_grid, parse_lr_grid,
                                        parse_optimizer, run_compare)
from convdescent.search.study import TrialOutcome


def test_optimizer_specs_aliases_and_settings():
    assert parse_optimizer("adam") == ("adam", "adam", {})
    assert parse_optimizer("momentum") == ("momentum", "sgd", {"momentum": 0.9})
    assert parse_optimizer("nesterov") == ("nesterov", "sgd", {"momentum": 0.9, "nesterov": True})
    assert parse_optimizer("sgd:momentum=0.5:nesterov=true") == (
        "sgd:momentum=0.5:nesterov=true", "sgd", {"momentum": 0.5, "nesterov": True})
    with pytest.raises(CompareError, match="unknown optimizer 'adamx' in --optimizers"):
        parse_optimizer("adamx")
    with pytest.raises(CompareError, match="momentum does not apply to adam"):
        parse_optimizer("adam:momentum=0.9")
    with pytest.raises(CompareError, match="optimizer settings are key=value, got 'momentum'"):
        parse_optimizer("sgd:momentum")


def test_lr_grids():
    assert parse_lr_grid("1e-4:1e-1:4") == (1e-4, 1e-1, 4)
    assert parse_lr_grid("1e-2,1e-3") == [1e-3, 1e-2]
    with pytest.raises(CompareError, match="lr grid must be LOW:HIGH:POINTS"):
        parse_lr_grid("1e-1:1e-4:3")
    g = default_lr_grid("adam", "adam", 5)
    assert len(g) == 5 and math.isclose(g[2], 1e-3) and math.isclose(g[-1] / g[0], 1000, rel_tol=0.01)
    s = CompareSettings(["sgd", "adam"], base={}, lr_grid=(1e-3, 1e-1, 3))
    assert s.grid_for("sgd", "sgd") == [1e-3, 1e-2, 1e-1]


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizers": []}, "optimizers must list at least one optimizer"),
    ({"optimizers": ["sgd", "sgd"]}, "optimizers lists ['sgd'] twice"),
    ({"optimizers": ["sgd"], "seeds": 0}, "seeds must be a positive integer, got 0"),
    ({"optimizers": ["sgd"], "target": 1.5}, "target must be an accuracy in (0, 1], got 1.5"),
    ({"optimizers": ["sgd"], "base": {"lr": 0.1}}, "lr is tuned per optimizer"),
])
def test_bad_settings(kwargs, message):
    kwargs.setdefault("base", {})
    with pytest.raises(CompareError) as e:
        CompareSettings(**kwargs)
    assert message in str(e.value)


def test_protocol_statistics_and_report_with_known_curves(tmp_path):
    """A runner with known results: the best lr per optimizer, mean +- std over seeds, epochs/seconds to target."""
    calls = []

    def runner(config, trial):
        calls.append(dict(config))
        opt, lr, seed, epochs = config["optimizer"], config["lr"], config["seed"], config["epochs"]
        best_lr = {"sgd": 0.1, "adam": 1e-3}[opt]
        quality = 1.0 - 0.3 * abs(math.log10(lr / best_lr))
        speed = {"sgd": 0.2, "adam": 0.3}[opt]
        curve = [min(quality, speed * (e + 1)) for e in range(epochs)]
        test = {"sgd": [0.80, 0.84], "adam": [0.90, 0.91]}[opt][seed]
        return TrialOutcome(max(curve), False, {"best_val_acc": max(curve), "val_acc_curve": curve,
                                                "loss_curve": [1.0 / (e + 1) for e in range(epochs)],
                                                "epoch_times": [2.0] * epochs, "test_acc": test,
                                                "train_seconds": 2.0 * epochs})

    settings = CompareSettings(["sgd", "adam"], base={"model": "seed_cnn"}, epochs=4, tune_epochs=4, seeds=2,
                               lr_grid=[1e-3, 1e-2, 1e-1], target=0.6, out=str(tmp_path))
    summary = run_compare(settings, runner=runner, stream=open("/dev/null", "w"))
    # 3 tuning runs + 2 seeds per optimizer, the tuning runs with seed 0, the final ones with seeds 0 and 1
    assert len(calls) == 10
    assert [c["seed"] for c in calls if c["optimizer"] == "sgd"] == [0, 0, 0, 0, 1]
    rows = {r["optimizer"]: r for r in summary["rows"]}
    assert rows["sgd"]["lr"] == 0.1 and rows["adam"]["lr"] == 1e-3
    assert math.isclose(rows["sgd"]["test_acc_mean"], 0.82)
    assert math.isclose(rows["sgd"]["test_acc_std"], statistics.stdev([0.80, 0.84]))
    # sgd reaches 0.6 at epoch 3 (0.2, 0.4, 0.6), adam at epoch 2 (0.3, 0.6); 2 s per epoch
    assert rows["sgd"]["epochs_to_target_mean"] == 3 and rows["sgd"]["seconds_to_target_mean"] == 6.0
    assert rows["adam"]["epochs_to_target_mean"] == 2 and rows["adam"]["seconds_to_target_mean"] == 4.0
    assert rows["adam"]["reached"] == 2 and rows["adam"]["seeds"] == 2
    assert "at the edge of the grid" in rows["sgd"]["note"]  # 0.1 is the grid's top
    md = (tmp_path / "compare.md").read_text()
    assert "| sgd | 0.1 | 0.8200 ± 0.0283 |" in md and "| adam | 0.001 | 0.9050 ± 0.0071 |" in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "0.9050 ± 0.0071" in html
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["target"] == 0.6 and set(data["results"]) == {"sgd", "adam"}
    for name in ("val_acc.png", "train_loss.png", "lr_tuning.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_a_failing_run_is_reported_not_fatal(tmp_path):
    def runner(config, trial):
        if config["optimizer"] == "adam":
            raise RuntimeError("diverged badly")
        return TrialOutcome(0.5, False, {"best_val_acc": 0.5, "val_acc_curve": [0.5], "loss_curve": [1.0],
                                         "epoch_times": [1.0], "test_acc": 0.5})

    settings = CompareSettings(["sgd", "adam"], base={}, epochs=1, tune_epochs=1, seeds=1, lr_grid=[0.01],
                               out=str(tmp_path))
    summary = run_compare(settings, runner=runner, stream=open("/dev/null", "w"))
    rows = {r["optimizer"]: r for r in summary["rows"]}
    assert rows["sgd"]["test_acc_mean"] == 0.5
    assert rows["adam"]["test_acc_mean"] is None and rows["adam"]["note"] == "every tuning run failed"
    assert summary["tuning"]["adam"][0]["error"] == "RuntimeError: diverged badly"
    assert (tmp_path / "report.html").is_file()


def test_real_comparison_on_synthetic_data_writes_its_report(tmp_path):
    x, y = synthetic_images(200, 4, (1, 8, 8), seed=0)
    xt, yt = synthetic_images(40, 4, (1, 8, 8), seed=1)
    np.savez(tmp_path / "d.npz", x_train=x.numpy(), y_train=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy())
    base = {"dataset": f"npz:{tmp_path / 'd.npz'}", "val_split": 40, "model": "seed_cnn", "batch_size": 32,
            "log_every": 0}
    settings = CompareSettings(["sgd", "adam"], base=base, epochs=2, tune_epochs=2, seeds=2, lr_grid=[1e-5, 0.1],
                               train_subset=120, out=str(tmp_path / "cmp"))
    summary = run_compare(settings, stream=open("/dev/null", "w"))
    rows = {r["optimizer"]: r for r in summary["rows"]}
    for name in ("sgd", "adam"):
        assert rows[name]["lr"] == 0.1  # 1e-5 learns nothing in two epochs
        assert rows[name]["seeds"] == 2 and 0.0 <= rows[name]["test_acc_mean"] <= 1.0
    runs = summary["results"]["adam"]["runs"]
    assert [len(r["val_acc_curve"]) for r in runs] == [2, 2]
    from convdescent.train.run import load_run

    first, second = load_run(runs[0]["run_dir"]), load_run(runs[1]["run_dir"])
    assert (first.config["seed"], second.config["seed"]) == (0, 1)
    assert first.config["lr"] == 0.1 and first.config["optimizer"] == "adam"
    assert first.history.step[0] == 4  # the subset: 120 of the 160 training images, 4 batches of 32
    assert (tmp_path / "cmp" / "report.html").is_file() and (tmp_path / "cmp" / "compare.md").is_file()


def test_one_seed_shows_no_spread():
    from convdescent.search.compare import _mean_std, markdown_table

    mean, std = _mean_std([0.9])
    assert mean == 0.9 and std is None
    row = {"optimizer": "adam", "lr": 1e-3, "test_acc_mean": 0.9, "test_acc_std": None, "final_val_acc_mean": 0.88,
           "epochs_to_target_mean": 2.0, "epochs_to_target_std": None, "seconds_to_target_mean": 4.0,
           "seconds_to_target_std": None, "reached": 1, "seeds": 1, "note": ""}
    md = markdown_table([row], 0.6)
    assert "±" not in md and "| adam | 0.001 | 0.9000 | 0.8800 | 2.0 | 4.0 | 1/1 |" in md
