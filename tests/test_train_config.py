"""Run configuration: defaults, checks with clear messages, TOML round trip, flags over the file, and a
saved config.toml that rebuilds the same run."""

from __future__ import annotations

import pytest
import torch

from convdescent.cli import build_parser, train_config_from_args
from convdescent.data.synthetic import write_npz_dataset
from convdescent.train.config import (OPTIONS, ConfigError, default_config, dump_toml, load_toml,
                                      resolve_config)
from convdescent.train.run import train_from_config


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_tutorial_run():
    cfg = resolve_config({})
    assert (cfg["model"], cfg["dataset"], cfg["optimizer"], cfg["lr"], cfg["batch_size"], cfg["epochs"]) == \
        ("seed_cnn", "fashion-mnist", "adam", 1e-3, 32, 10)
    assert set(cfg) == {o.key for o in OPTIONS}


def test_toml_round_trip(tmp_path):
    cfg = resolve_config({"lr": 0.05, "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "betas": None,
                          "batch_size": "full", "val_split": 0.1, "schedule": "cosine",
                          "schedule_params": {"warmup_steps": 500, "alpha": 0.01, "milestones": [1, 2]},
                          "augment": 'crop:4,flip "quoted" \\ back', "name": "my-run", "steps": 1234,
                          "tensorboard": True, "data_dir": "/data/x y"})
    text = dump_toml(cfg, header="a header\nover two lines")
    assert text.startswith("# a header\n# over two lines\n")
    path = tmp_path / "run.toml"
    path.write_text(text)
    again = resolve_config(load_toml(path), source=str(path))
    assert again == cfg
    assert "betas" not in text  # unset optional settings are left out


@pytest.mark.parametrize("bad, message", [
    ({"learning_rate": 0.1}, "unknown configuration key 'learning_rate' in arguments; did you mean 'lr'?"),
    ({"epoch": 3}, "unknown configuration key 'epoch' in arguments; did you mean 'epochs'?"),
    ({"lr": "fast"}, "lr must be a finite number, got 'fast'"),
    ({"lr": -1.0}, "lr=-1.0 is out of range: lr must be >= 0"),
    ({"epochs": 0}, "epochs=0 is out of range: epochs must be an integer >= 1"),
    ({"batch_size": "half"}, "batch_size must be a positive integer or 'full', got 'half'"),
    ({"batch_size": 0}, "batch_size=0 is out of range: batch_size must be an integer >= 1"),
    ({"precision": "fp16"}, "precision must be one of 'fp32', 'bf16', got 'fp16'"),
    ({"val_split": 1.5}, "val_split as a fraction must be in [0, 1), got 1.5"),
    ({"nesterov": "yes"}, "nesterov must be true or false, got 'yes'"),
    ({"name": "a/b"}, "name must be a plain folder name"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"schedule_params": 5}, "schedule_params must be a table"),
])
def test_bad_values_get_one_clear_message(bad, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(bad)
    assert message in str(info.value)


def test_bad_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("lr = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml(tmp_path / "broken.toml")
    (tmp_path / "unknown.toml").write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match="unknown configuration key 'epoch'.*did you mean 'epochs'"):
        load_toml(tmp_path / "unknown.toml")
    (tmp_path / "sections.toml").write_text("[optimizer]\nlr = 0.5\n[data]\nbatch_size = 8\n")
    assert load_toml(tmp_path / "sections.toml") == {"lr": 0.5, "batch_size": 8}


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(resolve_config({"lr": 0.5, "epochs": 7, "optimizer": "sgd", "momentum": 0.8,
                                              "schedule": "step", "schedule_params": {"step_size": 10}})))
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "0.01", "--batch-size", "full",
                                      "--gamma", "0.5", "--schedule-param", "step_size=20", "--no-nesterov",
                                      "--betas", "0.8,0.9"])
    cfg = resolve_config(train_config_from_args(args))
    assert cfg["lr"] == 0.01 and cfg["epochs"] == 7 and cfg["momentum"] == 0.8 and cfg["optimizer"] == "sgd"
    assert cfg["batch_size"] == "full" and cfg["nesterov"] is False and cfg["betas"] == [0.8, 0.9]
    assert cfg["schedule_params"] == {"step_size": 20, "gamma": 0.5}
    args = build_parser().parse_args(["train", "--config", str(path), "--steps", "50"])
    cfg = resolve_config(train_config_from_args(args))
    assert cfg["steps"] == 50
    args = build_parser().parse_args(["train", "--reduce-on-plateau", "3", "--plateau-factor", "0.5"])
    cfg = train_config_from_args(args)
    assert cfg["schedule"] == "reduce_on_plateau" and cfg["schedule_params"] == {"patience": 3, "factor": 0.5}


def test_saved_config_rebuilds_the_run(tmp_path):
    npz = tmp_path / "d.npz"
    write_npz_dataset(npz, n=120, num_classes=3, shape=(1, 8, 8), seed=1)
    first = train_from_config({"dataset": f"npz:{npz}", "val_split": 20, "epochs": 2, "batch_size": 10,
                               "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "cosine",
                               "schedule_params": {"warmup_steps": 3}, "augment": "flip", "seed": 5,
                               "out": str(tmp_path / "a")}, display="quiet")
    saved = load_toml(first.run_dir / "config.toml")
    again = train_from_config(dict(saved, out=str(tmp_path / "b")), display="quiet")
    for k, p in first.model.params().items():
        assert torch.equal(p, again.model.params()[k]), k
    assert again.history.loss == first.history.loss
    # the saved file is the resolved configuration: every key, with the device made concrete
    resolved = resolve_config(saved)
    assert resolved["device"] == "cpu" and resolved["name"] == "seed_cnn"
    assert set(resolve_config(saved)) == set(default_config())
