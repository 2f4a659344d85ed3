"""Batch normalization over the global batch of a data-parallel run (``--sync-bn``).

By default each process normalizes with the statistics of its own slice of the batch. After
``sync_batchnorm(model)`` every batch-norm layer of the model (nested ones included) takes its mean and
variance over all the processes of the group instead, and its backward sums the two per-channel reductions
over the group too, so the forward output, dL/dx and the running statistics are those of one process
running batch norm over the whole batch, whatever share of it each process holds. Per step and layer that is
two all-reduces of 2C + 1 and 2C numbers. The derivation (and why dL/dweight, dL/dbias stay local sums) is
in docs/gradients.md, section 7.2.

The layers keep working as before in evaluation mode (running statistics, no communication).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .world import lost_contact


class AllReduceSum:
    """``reducer(t) -> t``: sums ``t`` in place over the processes of ``group`` (all-reduce) and returns it.

    Args:
        group: a torch.distributed process group; None for the default (world) group.
    """

    def __init__(self, group=None):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as e:  # a peer gone inside a forward or backward: the run's one message
            raise lost_contact(e, "a synced batch norm's reduction", dist.get_rank()) from None
        return t

    def __repr__(self) -> str:
        return f"AllReduceSum(group={'world' if self.group is None else self.group})"


def sync_batchnorm(model, group=None) -> int:
    """Make every batch-norm layer of ``model`` compute its training statistics over the global batch.

    Every process of the group must call it on the same model, and afterwards run every training forward
    and backward of those layers together with the others (the layers all-reduce inside them).

    Args:
        model: a built ``Sequential``; layers inside containers (``Residual``) are included.
        group: the process group whose processes share the batch; None for the default group.

    Returns:
        The number of layers changed (0 when the model has no batch norm).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_batchnorm needs an initialized torch.distributed process group: "
                           "call torch.distributed.init_process_group first")
    reducer = AllReduceSum(group)
    changed = 0
    for _, layer in model.all_layers():
        # Batch-norm layers declare the hook (layers/norm.py); no other layer has it.
        if hasattr(layer, "stats_reducer"):
            layer.stats_reducer = reducer
            changed += 1
    return changed


__all__ = ["AllReduceSum", "sync_batchnorm"]
