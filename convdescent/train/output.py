"""The run directory's disk: checked before training starts, and a failed write turned into one message.

A full disk or a read-only folder must not cost a run more than the steps since its last checkpoint: the
folder is probed (a real write, which is the one test root cannot pass by ignoring permission bits) and
its free space compared with what the checkpoints will take; a write that fails later stops the run with
a message that says what failed, how much space is needed and how to resume, and the last good checkpoint
is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

# Room for metrics.jsonl, summary.json, the evaluation, the confusion matrix and the report.
EXTRA_BYTES = 4 << 20


class OutputWriteError(ValueError):
    """The run directory cannot be written (full, read-only, no permission); the message says what to do."""


def human(n: float) -> str:
    """A byte count as "12.3 MB"."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(folder: Path) -> int | None:
    """Free space for this user on the disk holding ``folder`` (None when it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def needed_bytes(checkpoint_bytes: int) -> int:
    """Disk space a run needs: last.pt and best.pt, a temporary copy while one is replaced, and the rest."""
    return 3 * checkpoint_bytes + EXTRA_BYTES


def _reason(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if e.errno == errno.EROFS:
        return "the file system is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


def probe_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that a file can really be written, synced and removed there.

    Raises:
        OutputWriteError: it cannot be created or written; the message names the folder and the cause.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create the output folder {folder}: {_reason(e)}; choose a writable "
                               f"folder with --out") from None
    probe = folder / f".convdescent-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputWriteError(f"cannot write to the output folder {folder}: {_reason(e)}; choose a writable "
                               f"folder with --out (or free space there)") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


def check_space(folder: Path, checkpoint_bytes: int) -> None:
    """Refuse to start when the disk holding ``folder`` has less free space than the run needs.

    Raises:
        OutputWriteError: with the free and the needed space.
    """
    need = needed_bytes(checkpoint_bytes)
    free = free_bytes(folder)
    if free is not None and free < need:
        raise OutputWriteError(f"the output folder {folder} has {human(free)} free; this run needs about "
                               f"{human(need)} (checkpoints of {human(checkpoint_bytes)}: last.pt, best.pt and a "
                               f"temporary copy, plus metrics and the report); free space or choose another "
                               f"folder with --out")


def write_failure(what: Path, e: OSError, run_dir: Path, checkpoint_bytes: int | None, last_good: Path | None,
                  last_step: int | None) -> OutputWriteError:
    """The error that stops a run whose file ``what`` could not be written.

    Args:
        what: the file being written.
        e: the operating system's error.
        run_dir: the run directory.
        checkpoint_bytes: size of one checkpoint, if known (for the space needed).
        last_good: the last checkpoint written completely, or None.
        last_step: its step.
    """
    parts = [f"writing {what} failed: {_reason(e)}"]
    free = free_bytes(run_dir)
    if checkpoint_bytes:
        parts.append(f"the run needs about {human(needed_bytes(checkpoint_bytes))} free"
                     + (f", the disk has {human(free)}" if free is not None else ""))
    if last_good is not None and last_good.exists():
        at = f" (step {last_step})" if last_step is not None else ""
        parts.append(f"the last good checkpoint is kept: {last_good}{at}; free space (or make "
                     f"the folder writable), then continue with: convdescent train --resume {run_dir}")
    else:
        parts.append("no checkpoint was written yet: free space (or choose another folder with --out) and start "
                     "the run again")
    return OutputWriteError("; ".join(parts))
