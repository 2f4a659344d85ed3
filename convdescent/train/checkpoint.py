"""Checkpoints: written atomically, holding only tensors and plain values, read back with clear errors.

A checkpoint is a dict saved with ``torch.save``. It holds tensors, numbers, strings, lists and dicts only,
so ``torch.load(path, weights_only=True)`` reads it without running any code. Writing goes through a
temporary file in the same folder, ``fsync`` and ``os.replace``: a crash at any moment leaves either the
previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..data.fileio import atomic_write

FORMAT = "convdescent-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "model_config", "optimizer", "epoch", "step", "loader")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, foreign or does not fit the model it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A file holds pickled code (classes, functions), so it is refused unread: never fall back around it."""


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk too; not every platform can open a folder for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (the old file survives a crash),
    then fsync the folder so the rename itself is on disk."""
    atomic_write(path, data)
    _fsync_dir(Path(path).parent)


def atomic_copy_of(path: str | Path, source: str | Path, data: bytes) -> None:
    """Make ``path`` a file holding ``data``, which ``source`` (a file of the same folder, written with
    ``atomic_write_bytes``) holds already: a hard link to ``source`` renamed into place, so the bytes are not
    written and flushed a second time (10-20 ms for the tutorial CNN's 11 MB checkpoint on the development
    VM); where the filesystem makes no hard links, the bytes are written as ``atomic_write_bytes`` does. Either
    way ``path`` is replaced atomically, and a later atomic write of either file leaves the other as it is."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a process of this id that died between the link and the rename
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write_bytes(path, data)
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _plain(value: Any, where: str) -> Any:
    """Refuse anything weights_only loading could not read back (a class instance, a dtype, ...)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone() if value.device.type != "cpu" else value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {k!r} at {where} is not a string or int")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"checkpoint value at {where} is a {type(value).__name__}; only tensors and plain values "
                    f"are saved")


def encode_checkpoint(payload: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file: ``payload`` plus ``format`` and ``version``, tensors copied to the CPU."""
    data = _plain({"format": FORMAT, "version": VERSION, **payload}, "checkpoint")
    buf = io.BytesIO()
    torch.save(data, buf)
    return buf.getvalue()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Save a checkpoint atomically.

    Args:
        path: destination file (``.pt``).
        payload: the training state; ``format`` and ``version`` are added. Tensors are copied to the CPU.

    Returns:
        The path written.
    """
    atomic_write_bytes(path, encode_checkpoint(payload))
    return Path(path)


def _unsafe_message(path: Path, detail: str) -> str:
    """The error for a file that holds more than tensors and plain values (pickled classes or functions)."""
    found = re.findall(r"GLOBAL ([\w.]+)", detail)
    what = f" (it refers to {', '.join(sorted(set(found))[:4])})" if found else ""
    return (f"{path} is not a safe convdescent checkpoint: it holds Python objects other than tensors and plain "
            f"values{what}, and reading those could run code from the file, so convdescent does not read it. "
            f"Use a checkpoint written by 'convdescent train' (a run directory or its checkpoints/*.pt); "
            f"a file from elsewhere must be re-saved as a plain state dict of tensors first")


def _corrupt_message(path: Path, size: int, e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    # torch's own advice here is to turn off the safe loader; never pass that on
    lines = [ln for ln in lines if "weights_only" not in ln and "weights only" not in ln.lower()]
    first = lines[0] if lines else type(e).__name__
    return (f"checkpoint {path} ({size} bytes) is truncated or corrupt and cannot be read ({first[:200]}). "
            f"Use the other checkpoint of the run (best.pt / last.pt) or start again")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a torch file, or not a convdescent
            checkpoint; the message says which and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; was the run started (or interrupted before "
                              f"its first checkpoint)?")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, expected a .pt file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never completely written. "
                              f"Use the other checkpoint of the run or start again")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if re.search(r"GLOBAL [\w.]+|[Uu]nsupported global", str(e)):
            raise UnsafeCheckpointError(_unsafe_message(path, str(e))) from None
        raise CheckpointError(_corrupt_message(path, size, e)) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            UnicodeDecodeError, AttributeError, TypeError, IndexError, KeyError) as e:
        raise CheckpointError(_corrupt_message(path, size, e)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = f"a {type(data).__name__}" if not isinstance(data, dict) else \
            f"a dict with keys {sorted(map(str, data))[:8]}"
        raise CheckpointError(f"{path} is not a convdescent checkpoint (it holds {what}); pass a run directory "
                              f"written by 'convdescent train' or a checkpoint from its checkpoints/ folder")
    version = data.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this convdescent reads "
                              f"version {VERSION} or older; upgrade convdescent")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it is incomplete or was written "
                              f"by another program")
    return data
