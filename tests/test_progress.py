"""The progress bar as a user sees it: `convdescent train` under a 60-column pseudo-terminal draws one bar redrawn
in place (tqdm: elapsed, ETA, rate, loss, accuracy) that fits the width and counts to the run's own --steps;
through a pipe it prints plain epoch lines only."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from convdescent.data.synthetic import write_npz_dataset

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn.npz"
    write_npz_dataset(path, n=240, num_classes=3, shape=(1, 8, 8), classes=["a", "b", "c"], seed=3)
    return path


def _train_argv(npz, out, steps=30):
    # 200 training images in batches of 4: 50 steps per epoch, so --steps 30 ends inside the first epoch
    return [sys.executable, "-m", "convdescent", "train", "--model", "seed_cnn", "--dataset", f"npz:{npz}",
            "--val-split", "40", "--batch-size", "4", "--steps", str(steps), "--out", str(out), "--no-report",
            "--log-every", "0"]


def _run_in_pty(argv, columns: int, timeout: float = 300.0) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode("utf-8", errors="replace")


def _bar_frames(text: str) -> list[str]:
    """Every state of the bar line drawn on the terminal (the text between carriage returns)."""
    frames = []
    for line in text.replace("\r\n", "\n").split("\n"):
        for frame in line.split("\r"):
            frame = ANSI.sub("", frame)
            if re.search(r"\d+/\d+ (\[)?\d\d:\d\d<", frame):
                frames.append(frame)
    return frames


def test_a_60_column_terminal_shows_one_bar_redrawn_in_place(npz, tmp_path):
    text = _run_in_pty(_train_argv(npz, tmp_path / "runs"), columns=60)
    frames = _bar_frames(text)
    assert frames, text
    assert all(len(f.rstrip()) <= 60 for f in frames), [f for f in frames if len(f.rstrip()) > 60]
    # redrawn in place: no bar state ends a line, and the line that holds them is never wrapped
    lines_with_bars = [ln for ln in text.replace("\r\n", "\n").split("\n") if _bar_frames(ln)]
    assert len(lines_with_bars) == 1 and len(frames) >= 2, lines_with_bars  # one epoch: one line, redrawn
    assert all("/30" in f for f in frames if re.search(r"\d+/\d+", f)), frames  # counts to --steps, not 50
    assert not any("/50" in f for f in frames)
    assert "Epoch 1/1" in text and "Run written to" in text


def test_a_wide_terminal_shows_elapsed_eta_rate_loss_and_accuracy(npz, tmp_path):
    text = _run_in_pty(_train_argv(npz, tmp_path / "runs", steps=50), columns=160)
    frames = _bar_frames(text)
    full = [f for f in frames if "loss" in f and "acc" in f]
    assert full, frames
    f = full[-1]
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", f), f  # elapsed < remaining
    assert re.search(r"(step/s|s/step)", f) and re.search(r"loss \d\.\d{4} acc \d\.\d{3}", f), f
    assert len(f.rstrip()) <= 160


def test_not_a_terminal_gives_plain_lines(npz, tmp_path):
    proc = subprocess.run(_train_argv(npz, tmp_path / "runs"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\r" not in proc.stderr and "\x1b[" not in proc.stdout
    assert re.search(r"^Epoch 1/1 - loss \d", proc.stdout, re.M), proc.stdout
