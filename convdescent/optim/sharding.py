"""Values over all parameters when one process holds only a shard of them (ZeRO, ``--shard-optimizer``).

Most transforms treat each parameter on its own and run unchanged on a shard. A few read a value over all
the parameters together: the norm of :func:`~convdescent.optim.clipping.clip_by_global_norm`, the norms of
:func:`~convdescent.optim.record.record_norms`, and every clipper's ``fired`` flag. They take the local part
through :func:`shard_sum`, which returns its argument unchanged, except inside ``with across_shards(reducer):``
where ``reducer(t)`` sums ``t`` over the processes holding the other shards (an all-reduce). The sharded
optimizer (``convdescent.distributed.zero``) runs its wrapped optimizer's step inside that block, so a
global-norm clip on N processes uses the norm of the whole gradient, as on one.

Every process must then run the same transforms on a non-empty shard, so that each calls the reducer the
same number of times in the same order.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import Tensor

Reducer = Callable[[Tensor], Tensor]

_REDUCER: ContextVar[Reducer | None] = ContextVar("convdescent_shard_reducer", default=None)


@contextmanager
def across_shards(reducer: Reducer) -> Iterator[None]:
    """Within the block, :func:`shard_sum` sums over the shards with ``reducer``.

    Args:
        reducer: ``reducer(t) -> Tensor``, the sum of ``t`` over the processes (same shape).
    """
    if not callable(reducer):
        raise ValueError(f"across_shards needs a callable reducer, got {reducer!r}")
    token = _REDUCER.set(reducer)
    try:
        yield
    finally:
        _REDUCER.reset(token)


def sharded() -> bool:
    """True inside :func:`across_shards`."""
    return _REDUCER.get() is not None


def shard_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over the shards: ``t`` itself outside :func:`across_shards`.

    Args:
        t: this shard's part, e.g. a sum of squares.

    Returns:
        A tensor of ``t``'s shape (``t`` may have been overwritten).
    """
    reducer = _REDUCER.get()
    return t if reducer is None else reducer(t)


def shard_any(flag: Tensor) -> Tensor:
    """Whether ``flag`` (0-d bool) holds on any shard: ``flag`` itself outside :func:`across_shards`."""
    if _REDUCER.get() is None:
        return flag
    return shard_sum(flag.to(torch.float32).reshape(1))[0] > 0


__all__ = ["Reducer", "across_shards", "shard_any", "shard_sum", "sharded"]
