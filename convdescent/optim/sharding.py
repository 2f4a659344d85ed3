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

A shard may also hold only some rows of a tensor (a block of rows ``[a, b)`` along dim 0, under the
tensor's own name), so that one large tensor's state is spread over several processes. Elementwise
transforms do not notice; the few that take a value over one whole tensor do, and are exact on row blocks
only as follows (:data:`EXACT_ON_ROW_BLOCKS` lists every transform of this package that is):

- :func:`~convdescent.optim.clipping.clip_by_norm` sums each split tensor's squared norm over its pieces
  through :func:`tensor_norms` (one all-reduce of one number per split tensor, every step);
- :func:`~convdescent.optim.clipping.adaptive_grad_clip` takes norms per output unit, a row of dim 0, so
  row blocks keep it exact as long as tensors of fewer than 2 dims (whose unit is the whole tensor) stay
  whole, which the sharded optimizer guarantees;
- masks by name (AGC's ``exclude``, :func:`~convdescent.optim.masked.freeze`) see the tensor's name on each
  of its pieces.

A transform outside that list (a user-written one, say) may take per-tensor values this package cannot
see; :func:`row_block_blockers` names them, and the sharded optimizer then keeps every tensor whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

Reducer = Callable[[Tensor], Tensor]

_REDUCER: ContextVar[Reducer | None] = ContextVar("convdescent_shard_reducer", default=None)
# name -> position, for the tensors whose rows are split over several processes (inside across_shards).
_SPLIT: ContextVar[dict[str, int] | None] = ContextVar("convdescent_shard_split", default=None)

# Transforms (by TransformInfo.name) whose result on row blocks of a tensor, run inside across_shards, is
# their result on the whole tensor cut into the same blocks (see the module doc).
EXACT_ON_ROW_BLOCKS = frozenset({
    "identity", "chain", "record_norms", "freeze", "scale", "scale_by_learning_rate", "trace",
    "add_decayed_weights", "coupled_weight_decay", "decoupled_weight_decay", "scale_by_rms", "scale_by_adagrad",
    "scale_by_adadelta", "scale_by_adam", "scale_by_nadam", "scale_by_radam", "scale_by_adamax", "scale_by_lion",
    "clip_by_value", "clip_by_global_norm", "clip_by_norm", "adaptive_grad_clip",
})


@contextmanager
def across_shards(reducer: Reducer, split: Iterable[str] = ()) -> Iterator[None]:
    """Within the block, :func:`shard_sum` sums over the shards with ``reducer``.

    Args:
        reducer: ``reducer(t) -> Tensor``, the sum of ``t`` over the processes (same shape).
        split: the names of the tensors whose rows are spread over several processes, the same list in the
            same order on every process (:func:`tensor_norms` reduces their norms).
    """
    if not callable(reducer):
        raise ValueError(f"across_shards needs a callable reducer, got {reducer!r}")
    token = _REDUCER.set(reducer)
    split_token = _SPLIT.set({name: i for i, name in enumerate(dict.fromkeys(split))})
    try:
        yield
    finally:
        _SPLIT.reset(split_token)
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


def tensor_norms(keys: list[str], norms: Tensor) -> Tensor:
    """Each tensor's Euclidean norm from its local piece's, ``norms[i]`` the norm of ``keys[i]``'s piece.

    Outside :func:`across_shards`, or when no tensor is split, ``norms`` itself. Otherwise the split tensors'
    norms become ``sqrt(sum over their pieces of norm^2)`` with one reduction of a vector holding one entry
    per split tensor; every process makes it, whether or not it holds a piece of them.

    Args:
        keys: the names of this process's tensors (or pieces), in order.
        norms: 1-d tensor, the norms of those pieces.

    Returns:
        A 1-d tensor like ``norms`` (a new one where anything was reduced).
    """
    split = _SPLIT.get()
    if _REDUCER.get() is None or not split:
        return norms
    mine = [(i, split[k]) for i, k in enumerate(keys) if k in split]
    squares = norms.new_zeros(len(split))
    if mine:
        local, where = zip(*mine)
        squares[list(where)] = norms[list(local)].square()
    squares = shard_sum(squares)
    out = norms.clone()
    if mine:
        out[list(local)] = squares[list(where)].sqrt()
    return out


def row_block_blockers(tx: Any) -> list[str]:
    """The transforms inside ``tx`` not known to be exact on row blocks (see the module doc), by name;
    empty when ``tx`` may be run on pieces of tensors. A transform without ``.info`` (a user-written one)
    is listed as ``"<user-written transform>"``."""
    info = getattr(tx, "info", None)
    if info is None:
        return ["<user-written transform>"]
    if info.name not in EXACT_ON_ROW_BLOCKS:
        return [info.name]
    return [name for child in info.children for name in row_block_blockers(child)]


__all__ = ["EXACT_ON_ROW_BLOCKS", "Reducer", "across_shards", "row_block_blockers", "shard_any", "shard_sum",
           "sharded", "tensor_norms"]
