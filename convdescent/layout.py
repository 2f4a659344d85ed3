"""How a tensor's elements lie in memory, for code that hands tensors to flat buffers and fused kernels.

The Dense weights are stored column-major (their transpose is contiguous), so "contiguous" is not the
only dense layout the engine meets. These helpers name a tensor's memory order and build views of flat
buffers in that order, so a gradient can be copied into a communication bucket, or a parameter handed to
a fused optimizer kernel, without a transposing copy.
"""

from __future__ import annotations

import torch


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension order in which ``t``'s memory runs, outermost first (its permutation to a contiguous
    view: the identity for a contiguous tensor, (1, 0) for a column-major matrix), or None when its memory
    has gaps or overlaps."""
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return order if t.permute(order).is_contiguous() else None


def dense_order(t: torch.Tensor) -> tuple[int, ...]:
    """:func:`memory_order`, or the identity where ``t`` is not densely laid out."""
    return memory_order(t) or tuple(range(t.dim()))


def view_like(flat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The vector ``flat`` (``t.numel()`` elements, in ``t``'s :func:`dense_order`) viewed with ``t``'s shape
    and the strides of that order."""
    order = dense_order(t)
    inverse = sorted(range(t.dim()), key=lambda d: order[d])
    return flat.view([t.shape[d] for d in order]).permute(inverse)
