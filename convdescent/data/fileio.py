"""Small file helpers: atomic writes and file digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` and rename it onto `path` only if the block succeeds.

    A crash or exception leaves any existing file at `path` untouched and removes the temporary file.

    Args:
        path: final destination; its folder is created if needed.
        mode: "wb" or "w".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the final file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file and a rename."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def file_digests(path: str | Path, algorithms: tuple[str, ...] = ("md5", "sha256")) -> dict[str, str]:
    """Hex digests of a file's bytes, read once in 1 MiB chunks.

    Args:
        path: the file.
        algorithms: hashlib names.

    Returns:
        {algorithm: hexdigest}.
    """
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}
