"""Keep glibc's malloc from handing training's scratch memory back to the kernel after every step.

A training step allocates and frees the same few megabytes of activations and gradients again and again
(the conv output of a chunk of 32 Fashion-MNIST images alone is 2.7 MB). With glibc's default settings a
freed block above the mmap threshold, or free space above the trim threshold at the top of the heap, goes
back to the kernel, and the next step takes it back one zero-filled page at a time: measured on a 2-core
VM, 150 to 450 page faults per batch-32 step, a few tenths of the step's time. Raising both thresholds
keeps that memory in the process, so each step reuses the pages of the last; the process holds what its
peak needed, which a training run holds anyway.

``tune()`` makes the change once per process (glibc only, a no-op elsewhere); the model calls it at its
first training forward. Set ``CONVDESCENT_MALLOC_TUNING=0`` to leave malloc as it is. The settings are
process-wide: anything else in the process (a PyTorch model trained beside ours, say) runs with them too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20   # blocks below this come from the heap (glibc's largest dynamic value)
TRIM_THRESHOLD = 512 * 2**20  # free space at the heap's top kept before any is returned

_done = False
_applied = False


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; returns whether the settings are in force."""
    global _done, _applied
    if _done:
        return _applied
    _done = True
    if os.environ.get("CONVDESCENT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
