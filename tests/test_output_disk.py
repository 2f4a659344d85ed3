"""A full disk and a read-only output folder: checked before training, one clear message when a write fails
mid-run, the last good checkpoint kept, nothing written that claims otherwise, and the run resumable.

The disks are small tmpfs mounts made for each test (the tests run as root, like the CI; root ignores
permission bits, so the read-only folder is a read-only mount, which stops root too)."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convdescent.train import Callback
from convdescent.train.output import OutputWriteError
from convdescent.train.run import read_metrics, train_from_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)


def fill(folder: Path, name: str = "filler") -> Path:
    """Write zeros into folder until its disk is full."""
    path = folder / name
    with open(path, "ab", buffering=0) as f:
        for size in (65536, 512, 1):  # big chunks, then the last bytes of a partly used page
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    return path


class FillDiskAt(Callback):
    """Fills the disk at the end of an epoch (before that epoch's checkpoint) or after a step."""

    def __init__(self, folder: Path, epoch: int | None = None, step: int | None = None):
        self.folder, self.epoch, self.step, self.filler = folder, epoch, step, None

    def on_epoch_end(self, trainer, epoch, logs):
        if self.epoch is not None and logs["epoch"] == self.epoch and self.filler is None:
            self.filler = fill(self.folder)

    def on_step_end(self, trainer, step, logs):
        if self.step is not None and step == self.step and self.filler is None:
            self.filler = fill(self.folder)


def config(npz, out, **kw):
    cfg = {"model": "seed_cnn", "dataset": npz, "val_split": 40, "batch_size": 40, "epochs": 3, "out": str(out),
           "name": "r", "log_every": 0, "health_every": 0, "lr": 3e-3}
    cfg.update(kw)
    return cfg


def cli(*args):
    return subprocess.run([sys.executable, "-m", "convdescent.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_a_read_only_output_folder_is_refused_before_training(bands_npz, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        with pytest.raises(OutputWriteError, match="read-only"):
            train_from_config(config(bands_npz, ro / "runs"), display="none")
        p = cli("train", "--dataset", bands_npz, "--val-split", "40", "--epochs", "1", "--out", str(ro))
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("convdescent:") and f"cannot write to the output folder {ro}" in p.stderr
        assert "read-only" in p.stderr and "--out" in p.stderr
        assert list(ro.iterdir()) == []


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_training(bands_npz, tmp_path):
    with tmpfs(tmp_path / "small", "1m") as small:
        p = cli("train", "--dataset", bands_npz, "--val-split", "40", "--epochs", "1", "--out", str(small))
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"the output folder {small}" in p.stderr and "free; this run needs about" in p.stderr, p.stderr
        assert list(small.iterdir()) == []  # no half-written run directory


def test_a_disk_that_fills_mid_run_keeps_the_last_good_checkpoint_and_resumes(bands_npz, tmp_path):
    ref = train_from_config(config(bands_npz, tmp_path / "ref"), display="none")
    with tmpfs(tmp_path / "disk", "24m") as disk:
        filler = FillDiskAt(disk, epoch=2)
        with pytest.raises(OutputWriteError) as info:
            train_from_config(config(bands_npz, disk), callbacks=[filler], display="none")
        run_dir = info.value.run_dir
        msg = str(info.value)
        assert f"writing {run_dir / 'checkpoints'}" in msg and "the disk is full" in msg, msg
        assert "the run needs about" in msg and "free, the disk has" in msg, msg
        assert f"the last good checkpoint is kept: {run_dir / 'checkpoints' / 'last.pt'}" in msg, msg
        assert f"convdescent train --resume {run_dir}" in msg
        last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        assert last["epochs_done"] == 1  # epoch 2's checkpoint was never written; epoch 1's is whole
        best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
        assert best["epochs_done"] == 1
        epochs = [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "epoch"]
        assert 1 in epochs  # the finished epoch's record reached the disk
        summary = run_dir / "summary.json"
        if summary.exists():  # written only if it fit, and then it claims no checkpoint that is not there
            s = json.loads(summary.read_text())
            assert s["status"] == "failed" and s.get("best_checkpoint", {}).get("epoch", 1) == 1
        filler.filler.unlink()
        res = train_from_config({}, resume=run_dir, display="none")
        assert res.summary["status"] == "completed" and res.history.epoch == [1, 2, 3]
        a = torch.load(ref.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
        b = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)  # the lost epoch was trained again, exactly


def test_a_disk_that_fills_while_writing_metrics_stops_with_one_message(bands_npz, tmp_path):
    with tmpfs(tmp_path / "disk", "24m") as disk:
        filler = FillDiskAt(disk, step=27)  # early in the second epoch (25 steps an epoch)
        p_cfg = config(bands_npz, disk, log_every=1, batch_size=8)
        with pytest.raises(OutputWriteError) as info:
            train_from_config(p_cfg, callbacks=[filler], display="none")
        msg = str(info.value)
        assert "metrics.jsonl failed: the disk is full" in msg, msg
        assert "the last good checkpoint is kept" in msg and "--resume" in msg, msg
        run_dir = info.value.run_dir
        assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epochs_done"] == 1
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "step"]
        # every record up to the one that no longer fit (a file's last page may still take a few)
        assert steps == list(range(1, len(steps) + 1)) and 27 <= len(steps) < 50
