"""Whether a run directory is being trained right now: a ``running.json`` file (process id, host, start
time, heartbeat) that exists only while a training process holds the run.

``RunLock`` writes it when training starts, refreshes the heartbeat at every epoch end and removes it when
training ends however it ends, short of the process being killed; ``run_state`` tells a live run from one
whose process died (the file is still there, the process is gone).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path

from .callbacks import Callback
from .checkpoint import atomic_write_text

RUNNING_FILE = "running.json"


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


class RunLock(Callback):
    """Marks a run directory as being trained by this process while training runs.

    Args:
        run_dir: the run directory.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RUNNING_FILE
        self.started = None

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": self.started, "heartbeat": _now()}) + "\n")

    def on_train_begin(self, trainer):
        self.started = _now()
        self._write()

    def on_epoch_end(self, trainer, epoch, logs):
        self._write()

    def on_train_end(self, trainer):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def run_state(run_dir: str | Path) -> dict | None:
    """The liveness of a run: None when no process claims it, else ``{"state": "running" | "crashed" |
    "elsewhere", "pid", "host", "heartbeat"}`` ("elsewhere": another host holds it; its heartbeat says when
    it was last heard from)."""
    path = Path(run_dir) / RUNNING_FILE
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None
    if not isinstance(info, dict):
        return None
    pid, host = info.get("pid"), info.get("host")
    if host != socket.gethostname():
        state = "elsewhere"
    else:
        state = "running" if isinstance(pid, int) and _alive(pid) else "crashed"
    return {"state": state, "pid": pid, "host": host, "heartbeat": info.get("heartbeat")}
