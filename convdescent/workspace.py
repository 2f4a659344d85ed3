"""Buffers the training step hands back to the same kernels every step, instead of fresh memory.

A batch-32 step of the tutorial's CNN writes a few megabytes of intermediate tensors (the pooled map, the
pooling winners, dL/dx of the first Dense, the Adam kernel's gradient blocks) that live from their node's
forward to its backward and are dropped at the step's end. Taking fresh memory for them every step cost
0.25-0.4 ms of a 2.7 ms step on the 2-core development VM (no page faults: malloc keeps its memory, see
``allocator``; the new blocks simply are not the ones the cores wrote last, so every write misses the cache).
Reusing one buffer per (owner, slot) keeps them where the last step left them.

Reuse is safe only where nobody keeps an intermediate past the step, so it happens only inside an active
workspace: ``train_step`` activates the model's own (``Sequential.step_buffers``) when the model has no
forward hooks (a hook may keep what it is shown). Everywhere else (``model.forward`` called by a user,
evaluation, the health check's step, the NaN replay) ``empty`` returns fresh memory as ``torch.empty`` does.

A node asks for its buffers with ``empty(owner, slot, shape, dtype)``; ``owner`` is an object that lives as
long as the layer (the layer itself, not a plan node, since plans are recompiled when hooks change), and
``slot`` names the buffer among the owner's. The same (owner, slot) must not be asked for twice in one step
while the first is still needed: the chunked stage of a plan, whose nodes run once per chunk, suspends the
workspace (``suspended``).
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()


class Workspace:
    """The reusable buffers of one model, by (id of owner, slot). ``with workspace:`` makes it the active one
    on this thread (nesting restores the previous one on exit)."""

    def __init__(self):
        self._tensors: dict[tuple[int, str], torch.Tensor] = {}

    def clear(self) -> None:
        """Drop every buffer (the model's plan changed, or memory is wanted back)."""
        self._tensors.clear()

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __len__(self) -> int:
        return len(self._tensors)

    def __enter__(self) -> "Workspace":
        _push(self)
        return self

    def __exit__(self, *exc) -> bool:
        _pop()
        return False

    def take(self, owner, slot: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        key = (id(owner), slot)
        t = self._tensors.get(key)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
            t = torch.empty(shape, dtype=dtype, device=device)
            self._tensors[key] = t
        return t


def _push(ws: "Workspace | None") -> None:
    """Make ``ws`` the active workspace of this thread; the one it replaces is kept on this thread's stack (so
    that threads entering one model's workspace in any order each get their own back)."""
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    stack.append(getattr(_LOCAL, "active", None))
    _LOCAL.active = ws


def _pop() -> None:
    _LOCAL.active = _LOCAL.stack.pop()


class _Suspended:
    """No workspace active inside it (``suspended()``)."""

    def __enter__(self):
        _push(None)
        return self

    def __exit__(self, *exc) -> bool:
        _pop()
        return False


def suspended() -> _Suspended:
    """A context in which ``empty`` returns fresh memory even inside an active workspace."""
    return _Suspended()


def active() -> Workspace | None:
    """The workspace active on this thread, or None."""
    return getattr(_LOCAL, "active", None)


_CPU = torch.device("cpu")


def empty(owner, slot: str, shape: tuple, dtype: torch.dtype, device=_CPU) -> torch.Tensor:
    """An uninitialized tensor of ``shape``: the active workspace's buffer for (owner, slot), or fresh memory
    when no workspace is active. ``device`` is a ``torch.device``."""
    ws = getattr(_LOCAL, "active", None)
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.take(owner, slot, shape, dtype, device)
