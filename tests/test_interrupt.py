"""A real SIGINT: fit() in a script returns the history so far with a message and promises a checkpoint only when
one is configured; `convdescent train` prints a resume command that runs as printed from the user's folder
with convdescent not on PATH."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from convdescent.argparsing import command_name
from convdescent.data.synthetic import write_npz_dataset

SCRIPT = r"""
import pathlib, sys, time
import torch
from convdescent import seed_cnn, SoftmaxCrossEntropy
from convdescent.optim import make_optimizer
from convdescent.train import Callback, Checkpointer, fit

ready, with_checkpoint = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g)
y = torch.randint(0, 3, (64,), generator=g)

class Ready(Callback):
    def on_step_end(self, trainer, step, logs):
        if step == 10:  # two epochs are done: tell the test to press Ctrl-C
            ready.write_text("ready")
        time.sleep(0.005)

callbacks = [Ready()] + ([Checkpointer(ready.parent / "ckpt")] if with_checkpoint else [])
h = fit(seed_cnn((1, 8, 8), 3, seed=0), SoftmaxCrossEntropy(), make_optimizer("adam"), (x, y), epochs=100000,
        batch_size=16, callbacks=callbacks, verbose=1)
print("RETURNED", len(h), h.events[-1]["event"] if h.events else None, flush=True)
"""


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_ctrl_c_in_fit_returns_the_history_so_far(tmp_path, with_checkpoint):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ready), "1" if with_checkpoint else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    m = re.search(r"^RETURNED (\d+) (\w+)$", out, re.M)
    assert m and int(m.group(1)) >= 2 and m.group(2) == "interrupted", out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert re.search(r"Training interrupted by SIGINT after step \d+ \(epoch \d+\): returning the history so far "
                     rf"\({m.group(1)} finished epochs\)", err), err
    if with_checkpoint:
        assert "saving a checkpoint" in err and "a checkpoint was written" in err
        assert (tmp_path / "ckpt" / "last.pt").is_file()
    else:
        assert "saving a checkpoint" not in err and "a checkpoint was written" not in err
        assert "no checkpoint is configured" in err and "no checkpoint was written" in err


def _script() -> Path:
    script = Path(sys.executable).parent / "convdescent"
    assert script.is_file(), f"the console script should be installed beside {sys.executable}"
    return script


def test_the_printed_resume_command_runs_as_printed_without_convdescent_on_path(tmp_path):
    npz = tmp_path / "syn.npz"
    write_npz_dataset(npz, n=240, num_classes=3, shape=(1, 8, 8), classes=["a", "b", "c"], seed=3)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p) / "convdescent").exists()) or "/usr/bin:/bin"
    env = {**os.environ, "PATH": path}
    assert shutil.which("convdescent", path=path) is None
    user = tmp_path / "somewhere"
    user.mkdir()
    # 200 training images in batches of 4: 50 steps per epoch, 6 epochs in all
    proc = subprocess.Popen([str(_script()), "train", "--model", "seed_cnn", "--dataset", f"npz:{npz}",
                             "--val-split", "40", "--batch-size", "4", "--steps", "300", "--out", "runs",
                             "--no-report", "--log-every", "0"], cwd=user, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any(ln.startswith("Epoch 1/") for ln in lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(ln.startswith("Epoch 1/") for ln in lines), proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    assert proc.returncode == 130, err
    m = re.search(r"Continue with: (.+)$", err, re.M)
    assert m, err
    command = m.group(1).strip()
    assert command.startswith(str(_script()) + " train --resume "), command
    resumed = subprocess.run(command, shell=True, cwd=user, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    (run_dir,) = (user / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 300


def test_command_name_is_the_plain_name_when_that_is_this_installation(monkeypatch):
    script = _script()
    monkeypatch.setenv("PATH", str(script.parent) + os.pathsep + "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [str(script)])
    assert command_name() == "convdescent"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert command_name() == str(script.absolute())
