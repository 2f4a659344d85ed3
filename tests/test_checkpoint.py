"""Checkpoints and resume: atomic writes, weights_only loading, clear errors for missing/truncated/foreign
files, bit-exact resume after an interruption (in process and a real SIGTERM to the CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convdescent.data.synthetic import write_npz_dataset
from convdescent.train import CheckpointError, ConfigError, TrainingInterrupted, load_checkpoint, save_checkpoint
from convdescent.train import checkpoint as ckmod
from convdescent.train.callbacks import Callback
from convdescent.train.run import load_run, read_metrics, train_from_config

ROOT = Path(__file__).resolve().parents[1]


# one torch thread: on the shared 2-core machine two threads ran these small problems many times slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn.npz"
    write_npz_dataset(path, n=240, num_classes=4, shape=(1, 10, 10), classes=["a", "b", "c", "d"], seed=3)
    return path


def config(npz, out, **kw):
    cfg = {"model": "seed_cnn_bn", "dataset": f"npz:{npz}", "val_split": 40, "batch_size": 16, "epochs": 3,
           "augment": "flip,crop:1", "log_every": 3, "out": str(out), "name": "r", "optimizer": "adam",
           "lr": 3e-3}
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------------------------- atomic writes

def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}, "optimizer": {}, "epoch": 1,
                           "step": 5, "loader": {}})
    before = path.read_bytes()

    def crash(fd):
        raise KeyboardInterrupt  # as if the process were killed while the new file is being synced

    monkeypatch.setattr(ckmod.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_config": {}, "optimizer": {}, "epoch": 2,
                               "step": 9, "loader": {}})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["step"] == 5


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links"])
def test_last_checkpoint_of_a_best_epoch_is_the_best_ones_bytes(npz, tmp_path, monkeypatch, links):
    """When an epoch is the best so far, last.pt is made from best.pt's bytes (a hard link renamed into place,
    or the bytes written again where the disk makes no links); an epoch that is no improvement replaces
    last.pt alone, leaving best.pt as it was; nothing temporary is left in the folder."""
    if not links:
        def no_link(src, dst):
            raise OSError(1, "Operation not permitted")  # as on a filesystem without hard links

        monkeypatch.setattr(ckmod.os, "link", no_link)
    seen = []

    def look():
        folder, = tmp_path.glob("*-r/checkpoints")
        best, last = folder / "best.pt", folder / "last.pt"
        seen.append((load_checkpoint(best)["epoch"], load_checkpoint(last)["epoch"],
                     best.read_bytes() == last.read_bytes(), os.path.samefile(best, last),
                     sorted(p.name for p in folder.iterdir())))

    class Look(Callback):  # runs before the checkpointer: it sees the files of the epoch before
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch > 1:
                look()

    # a learning rate this large makes some epochs worse than the best: both kinds of epoch end are seen
    train_from_config(config(npz, tmp_path, epochs=6, monitor="loss", augment="none", lr=0.3),
                      callbacks=[Look()])
    look()
    for best_epoch, last_epoch, same_bytes, same_file, names in seen:
        assert names == ["best.pt", "last.pt"]
        assert same_bytes == (best_epoch == last_epoch)
        assert same_file == (links and best_epoch == last_epoch)
    assert [last for _, last, *_ in seen] == [1, 2, 3, 4, 5, 6]
    assert {b == e for b, e, *_ in seen} == {True, False}, seen


def test_checkpoints_hold_only_plain_values(tmp_path):
    with pytest.raises(TypeError, match="only tensors and plain values"):
        save_checkpoint(tmp_path / "x.pt", {"model": {"w": torch.ones(1)}, "optimizer": object()})
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------------------------- bad files

def test_missing_empty_truncated_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.randn(1000)}, "model_config": {}, "optimizer": {}, "epoch": 0,
                           "step": 0, "loader": {}})
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "noise.pt").write_bytes(os.urandom(3000))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "noise.pt")
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a convdescent checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # needs pickle code: refused by weights_only
    with pytest.raises(CheckpointError, match="not a safe convdescent checkpoint"):
        load_checkpoint(tmp_path / "module.pt")


# ----------------------------------------------------------------------------------------------- resume

class KillAt(Callback):
    """Sends SIGTERM to this process after a given step, as an operator would."""

    def __init__(self, step):
        self.at = step

    def on_step_end(self, trainer, step, logs):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def params_of(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)


def test_interrupted_and_resumed_run_ends_bit_exact(npz, tmp_path):
    ref = train_from_config(config(npz, tmp_path / "ref"), display="none")
    with pytest.raises(TrainingInterrupted) as info:
        train_from_config(config(npz, tmp_path / "cut"), callbacks=[KillAt(17)], display="none")
    assert info.value.signal_name == "SIGTERM" and info.value.step == 17
    run_dir = info.value.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["resume"].endswith(str(run_dir))
    ck = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # readable without pickle code
    assert ck["step"] == 17 and ck["loader"]["epoch"] == 1 and ck["loader"]["position"] == 4  # 13 batches per epoch
    assert set(ck["rng"]["layers"]) == {"dropout1"}
    res = train_from_config({}, resume=run_dir, display="none")
    a, b = params_of(ref.run_dir), params_of(run_dir)
    assert a["step"] == b["step"] == 39
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for key in ("loss", "acc", "val_loss", "val_acc"):
        assert getattr(ref.history, key) == getattr(res.history, key)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "step"]
    assert steps == list(range(3, 40, 3))  # the records after the checkpoint were not repeated
    assert res.summary["test_acc"] == ref.summary["test_acc"]


def test_resume_refusals(npz, tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        train_from_config({}, resume=tmp_path, display="none")
    done = train_from_config(config(npz, tmp_path, epochs=1), display="none")
    with pytest.raises(ConfigError, match="already finished"):
        train_from_config({}, resume=done.run_dir, display="none")
    with pytest.raises(ConfigError, match="lr: 0.003 in the checkpoint, 0.5 from the command line"):
        train_from_config({"lr": 0.5, "epochs": 2}, resume=done.run_dir, display="none")
    more = train_from_config({"epochs": 2}, resume=done.run_dir, display="none")
    assert more.history.epoch == [1, 2]
    (done.run_dir / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train_from_config({"epochs": 3}, resume=done.run_dir, display="none")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_run(done.run_dir, checkpoint="last")


def test_sigterm_to_the_cli_then_resume(npz, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "convdescent.cli", "train", "--model", "seed_cnn", "--dataset", f"npz:{npz}",
            "--val-split", "40", "--batch-size", "8", "--steps", "100000", "--log-every", "1", "--out", str(out),
            "--name", "sig", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--no-report"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = None
    while time.time() < deadline:
        found = list(out.glob("*-sig/metrics.jsonl")) if out.exists() else []
        if found and found[0].stat().st_size > 0:
            metrics = found[0]
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert metrics is not None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr and "convdescent train --resume" in stderr
    assert "Traceback" not in stderr
    run_dir = metrics.parent
    assert str(run_dir) in stderr
    stopped = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert stopped >= 1
    # continue to a fixed step count and compare with an uninterrupted run of the same length
    target = stopped + 12
    resumed = subprocess.run(args[:3] + ["train", "--resume", str(run_dir), "--steps", str(target), "--quiet",
                                         "--no-report"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ref = train_from_config({"model": "seed_cnn", "dataset": f"npz:{npz}", "val_split": 40, "batch_size": 8,
                             "steps": target, "log_every": 1, "out": str(tmp_path / "ref"), "optimizer": "sgd",
                             "lr": 0.05, "momentum": 0.9}, display="none")
    a, b = params_of(run_dir), params_of(ref.run_dir)
    assert a["step"] == b["step"] == target
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_drops_every_record_written_after_the_checkpoint(tmp_path):
    from convdescent.train.callbacks import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"type": "step", "step": 50}, {"type": "health", "step": 50}, {"type": "epoch", "epoch": 1, "step": 100},
               {"type": "step", "step": 150}, {"type": "health", "step": 150},
               {"type": "health_warning", "step": 150, "rule": "loss_plateau"}, {"type": "event", "step": 160}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "step", "st')  # last line cut short
    truncate_metrics(path, step=100, epochs_done=1)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == records[:3]
