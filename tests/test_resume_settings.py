"""Resume never trains silently with other settings: every key edited in config.toml or given on the command
line is either a resumable one (reported) or refused with both values, unless allowed by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convdescent.train import ConfigError, dump_toml, load_toml
from convdescent.train.config import OPTIONS, RESUMABLE_KEYS
from convdescent.train.resume import resume_config
from convdescent.train.run import train_from_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(bands_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = {"model": "seed_cnn", "dataset": bands_npz, "val_split": 40, "batch_size": 32, "epochs": 1,
           "out": str(out), "name": "r", "optimizer": "adam", "lr": 1e-3, "log_every": 0, "health_every": 0}
    return train_from_config(cfg, display="none").run_dir


def other_value(opt, current):
    """A valid value of ``opt`` different from ``current``."""
    if opt.choices:
        return next(c for c in opt.choices if c != current)
    kind = opt.kind
    if kind == "bool":
        return not current
    if kind in ("int", "count", "batch"):
        return (current if isinstance(current, int) else 3) + 1
    if kind == "float":
        return (current or 0.0) + 0.25
    if kind == "floats":
        return [0.8, 0.95] if current != [0.8, 0.95] else [0.7, 0.9]
    if kind == "dict":
        return {"warmup_steps": 3} if current != {"warmup_steps": 3} else {"warmup_steps": 4}
    if kind == "strs":
        return ["other"]
    if kind == "str":
        if opt.key == "device":
            return "cuda:1" if current != "cuda:1" else "cpu"
        return (current or "x") + "-other"
    raise AssertionError(f"no changed value known for kind {kind!r} of {opt.key}: extend other_value")


def edit_config(run_dir, key, value):
    cfg = load_toml(run_dir / "config.toml")
    cfg[key] = value
    (run_dir / "config.toml").write_text(dump_toml(cfg))


def recorded(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"]


@pytest.mark.parametrize("source", ["config.toml", "command line"])
def test_every_setting_changed_on_resume_is_refused_or_reported(run_dir, source):
    saved = (run_dir / "config.toml").read_text()
    rec = recorded(run_dir)
    try:
        for opt in OPTIONS:
            new = other_value(opt, rec[opt.key])
            if source == "config.toml":
                edit_config(run_dir, opt.key, new)
                overrides = {}
            else:
                overrides = {opt.key: new}
            if opt.key in RESUMABLE_KEYS:
                cfg, changes = resume_config(run_dir, rec, overrides)
                assert [c[0] for c in changes] == [opt.key] and cfg[opt.key] == new, opt.key
            else:
                with pytest.raises(ConfigError) as info:
                    resume_config(run_dir, rec, overrides)
                msg = str(info.value)
                assert f"{opt.key}: {rec[opt.key]!r}" in msg or f"{opt.key}: unset" in msg, msg
                assert repr(new) in msg and f"--allow-change {opt.key}" in msg and "--init-from" in msg, msg
                cfg, changes = resume_config(run_dir, rec, overrides, allow_change=[opt.key])
                assert cfg[opt.key] == new and [c[0] for c in changes] == [opt.key]
            (run_dir / "config.toml").write_text(saved)
    finally:
        (run_dir / "config.toml").write_text(saved)


def test_the_checkpoint_not_the_edited_file_holds_the_settings(run_dir):
    saved = (run_dir / "config.toml").read_text()
    try:
        edit_config(run_dir, "lr", 0.5)
        edit_config(run_dir, "seed", 7)
        with pytest.raises(ConfigError) as info:
            resume_config(run_dir, recorded(run_dir), {"epochs": 2})
        msg = str(info.value)
        assert "lr: 0.001 in the checkpoint, 0.5 from" in msg and "seed: 0 in the checkpoint, 7 from" in msg
        # the value given now replaces an edited one: undoing the edit on the command line resumes as trained
        cfg, changes = resume_config(run_dir, recorded(run_dir), {"lr": 1e-3, "seed": 0, "epochs": 2})
        assert cfg["lr"] == 1e-3 and cfg["seed"] == 0 and [c[0] for c in changes] == ["epochs"]
    finally:
        (run_dir / "config.toml").write_text(saved)
    with pytest.raises(ConfigError, match="not a configuration key"):
        resume_config(run_dir, recorded(run_dir), {}, allow_change=["learning_rate"])


def test_cli_refuses_an_edited_learning_rate_and_trains_with_it_when_allowed(bands_npz, tmp_path):
    res = train_from_config({"model": "seed_cnn", "dataset": bands_npz, "val_split": 40, "epochs": 1,
                             "out": str(tmp_path), "name": "r", "log_every": 0, "health_every": 0},
                            display="none")
    run = res.run_dir
    edit_config(run, "lr", 0.02)
    base = [sys.executable, "-m", "convdescent.cli", "train", "--resume", str(run), "--epochs", "2", "--no-report"]
    p = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("convdescent:") and "lr: 0.001 in the checkpoint, 0.02 from" in p.stderr
    assert recorded(run)["lr"] == 1e-3  # nothing was trained
    p = subprocess.run(base + ["--allow-change", "lr"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Changed on resume: lr 0.001 -> 0.02" in p.stdout
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["config"]["lr"] == 0.02 and ck["epochs_done"] == 2
    p = subprocess.run([sys.executable, "-m", "convdescent.cli", "train", "--dataset", bands_npz, "--epochs", "1",
                        "--allow-change", "lr", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 2 and "applies to --resume only" in p.stderr, p.stderr
