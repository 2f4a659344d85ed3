"""`convdescent runs` tells a run being trained from one whose process died (running.json with a live or a
dead process id), and training removes its running.json when it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from convdescent import SoftmaxCrossEntropy, seed_cnn
from convdescent.cli import main
from convdescent.optim import make_optimizer
from convdescent.train import Callback, fit
from convdescent.train.liveness import RUNNING_FILE, RunLock, run_state


def _run_dir(root, name, pid=None, summary=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text('model = "seed_cnn"\ndataset = "fashion-mnist"\n')
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if pid is not None:
        (d / RUNNING_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x",
                                                  "heartbeat": "y"}))
    return d


def test_runs_tells_live_from_crashed(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _run_dir(tmp_path, "a-live", pid=os.getpid(), summary={"status": "interrupted"})
    _run_dir(tmp_path, "b-crashed", pid=dead.pid)
    _run_dir(tmp_path, "c-crashed-early")
    _run_dir(tmp_path, "d-done", summary={"status": "completed"})
    assert main(["runs", "--out", str(tmp_path), "--json"]) == 0
    rows = {json.loads(line)["run"]: json.loads(line) for line in capsys.readouterr().out.splitlines()}
    assert rows["a-live"]["status"] == "running"
    assert rows["b-crashed"]["status"] == "crashed" and rows["c-crashed-early"]["status"] == "crashed"
    assert rows["d-done"]["status"] == "completed"


def test_training_holds_running_json_only_while_it_runs(tmp_path):
    seen = []

    class Look(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            seen.append(run_state(tmp_path))

    x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (32,))
    fit(seed_cnn((1, 8, 8), 3, seed=0), SoftmaxCrossEntropy(), make_optimizer("adam"), (x, y), epochs=2,
        batch_size=16, callbacks=[RunLock(tmp_path), Look()], verbose=0)
    assert [s["state"] for s in seen] == ["running", "running"] and seen[0]["pid"] == os.getpid()
    assert not (tmp_path / RUNNING_FILE).exists() and run_state(tmp_path) is None
