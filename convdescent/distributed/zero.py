"""ZeRO stage 1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models"): each process keeps the optimizer state of 1/N of the parameters (``--shard-optimizer``).

The parameters are split into N shards of whole tensors, balanced by size. At every step each process
hands in its local gradients (the mean over its slice of the batch); then

1. the gradients of each shard are summed onto their owner (one ``torch.distributed.reduce`` per owner and
   dtype, launched together; gloo has no reduce-scatter) and divided by N: the owner holds the mean over
   the processes, what the data-parallel all-reduce would have given it;
2. each owner runs the wrapped optimizer on its shard (its fused kernel where it has one), inside
   :func:`convdescent.optim.sharding.across_shards`, so the global-norm clip, the clip flags and the
   recorded norms are over the whole gradient;
3. each owner broadcasts its updated parameters (one broadcast per owner and dtype), and every process
   ends the step with the same parameters.

Element for element this computes what the unsharded optimizer computes on the all-reduced gradient, and
its step counts and schedules advance once per step as there, so the trajectories agree to rounding.
:meth:`ShardedOptimizer.full_state` rebuilds the ordinary unsharded state (for a checkpoint) and
:meth:`ShardedOptimizer.shard_state` cuts one back into shards, for any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim import GradientTransformation, load_state_dict, state_dict, update_and_apply
from ..optim.sharding import across_shards


def partition(sizes: dict[str, int], n: int) -> list[list[str]]:
    """Split named tensors into ``n`` shards of whole tensors, balanced greedily by size.

    Largest first (ties: the earlier name), each goes to the shard with the fewest elements so far
    (ties: the lower rank); every process computes the same split from the same sizes.

    Args:
        sizes: ``name -> number of elements``, in the parameters' order.
        n: the number of shards (processes), at least 1.

    Returns:
        ``n`` lists of names, each in the order of ``sizes``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of shards must be a positive int, got {n!r}")
    order = {name: i for i, name in enumerate(sizes)}
    load = [0] * n
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda k: (-sizes[k], order[k])):
        r = min(range(n), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += sizes[name]
    return [[name for name in sizes if owner[name] == r] for r in range(n)]


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors of an optimizer state (each counted once)."""
    seen: dict[int, int] = {}

    def visit(s: Any) -> None:
        if isinstance(s, Tensor):
            seen[id(s)] = s.numel() * s.element_size()
        elif isinstance(s, dict):
            for v in s.values():
                visit(v)
        elif isinstance(s, (tuple, list)):
            for v in s:
                visit(v)

    visit(state)
    return sum(seen.values())


def _memory_order(t: Tensor) -> tuple[int, ...]:
    """The dimension order in which ``t``'s memory runs (identity for a contiguous or non-dense tensor)."""
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return order if t.permute(order).is_contiguous() else tuple(range(t.dim()))


def _flat(t: Tensor) -> Tensor:
    """``t`` as one vector in its memory order (a view where it can be)."""
    return t.permute(_memory_order(t)).reshape(-1)


def _like(flat: Tensor, t: Tensor) -> Tensor:
    """The vector ``flat`` (from :func:`_flat`) viewed with ``t``'s shape and strides."""
    order = _memory_order(t)
    inverse = sorted(range(t.dim()), key=lambda d: order[d])
    return flat.view([t.shape[d] for d in order]).permute(inverse)


def _buckets(names: list[str], tensors: dict[str, Tensor]) -> list[list[str]]:
    """``names`` grouped by (dtype, device), each group in order: one flat buffer per group."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        t = tensors[name]
        groups.setdefault((t.dtype, t.device), []).append(name)
    return list(groups.values())


class ShardedOptimizer:
    """Any convdescent optimizer with its state split across the processes of a group (ZeRO stage 1).

    Every process of the group builds it with the same optimizer and the same parameter names and shapes,
    and calls :meth:`step` (and :meth:`full_state`) together with the others.

    Args:
        optimizer: a GradientTransformation (``optim.adam(...)``, ``make_optimizer(...)``, a chain).
        params: ``name -> Tensor``, the model's parameters (``model.params()``), updated in place.
        group: the process group; None for the default group.

    Attributes:
        rank, world_size: this process's rank in the group and the group's size.
        shards: the names of each rank's shard (see :func:`partition`).
        owned: this rank's names, ``shards[rank]``.
        owner: ``name -> rank`` holding its state.
    """

    def __init__(self, optimizer: GradientTransformation, params: dict[str, Tensor], group=None):
        if not isinstance(optimizer, GradientTransformation):
            raise ValueError(f"ShardedOptimizer needs a GradientTransformation, got {optimizer!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs an initialized torch.distributed process group: "
                               "call torch.distributed.init_process_group first")
        self.inner = optimizer
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if len(params) < self.world_size:
            # A process without parameters would skip the collectives inside its optimizer's step.
            raise ValueError(f"sharding the optimizer needs at least one parameter tensor per process: the model "
                             f"has {len(params)} for {self.world_size} processes; use fewer processes or do not "
                             f"shard the optimizer")
        self.params = dict(params)
        self.shards = partition({k: p.numel() for k, p in params.items()}, self.world_size)
        self.owned = self.shards[self.rank]
        self.owner = {name: r for r, names in enumerate(self.shards) for name in names}
        self._ranks = [r if group is None else dist.get_global_rank(group, r) for r in range(self.world_size)]

    def __repr__(self) -> str:
        return (f"ShardedOptimizer(rank {self.rank} of {self.world_size}, {len(self.owned)} of "
                f"{len(self.owner)} tensors, {self.inner!r})")

    # -- the step ---------------------------------------------------------------------------------
    def init(self, params: dict[str, Tensor]) -> Any:
        """The wrapped optimizer's state for this rank's shard only."""
        self._check_keys(params, "params")
        return self.inner.init({k: params[k] for k in self.owned})

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], state: Any) -> Any:
        """One update of every parameter, the same on every process; returns this shard's new state.

        Args:
            params: ``name -> Tensor``, all parameters, updated in place (on every process).
            grads: this process's local gradients, all names (the mean over its slice of the batch); left
                unchanged (the reduction works on copies).
            state: this shard's state (from :meth:`init` or the previous step).
        """
        self._check_keys(params, "params")
        self._check_keys(grads, "grads")
        shard_grads = self._reduce_grads(grads)
        shard_params = {k: params[k] for k in self.owned}
        with across_shards(self._sum):
            state = update_and_apply(self.inner, shard_params, shard_grads, state)
        self._broadcast_params(params)
        return state

    def _sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def _reduce_grads(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's shard of the mean over processes of ``grads`` (fresh tensors, grads' layouts)."""
        works, mine = [], []
        for r, names in enumerate(self.shards):
            for bucket in _buckets(names, grads):
                buf = torch.cat([_flat(grads[k]) for k in bucket])
                works.append(dist.reduce(buf, dst=self._ranks[r], op=dist.ReduceOp.SUM, group=self.group,
                                         async_op=True))
                if r == self.rank:
                    mine.append((bucket, buf))
        for work in works:
            work.wait()
        out = {}
        for bucket, buf in mine:
            buf.div_(self.world_size)
            offset = 0
            for k in bucket:
                n = grads[k].numel()
                out[k] = _like(buf[offset:offset + n], grads[k])
                offset += n
        return {k: out[k] for k in self.owned}

    def _broadcast_params(self, params: dict[str, Tensor]) -> None:
        works, theirs = [], []
        for r, names in enumerate(self.shards):
            for bucket in _buckets(names, params):
                if r == self.rank:
                    buf = torch.cat([_flat(params[k]) for k in bucket])
                else:
                    first = params[bucket[0]]
                    buf = torch.empty(sum(params[k].numel() for k in bucket), dtype=first.dtype,
                                      device=first.device)
                    theirs.append((bucket, buf))
                works.append(dist.broadcast(buf, src=self._ranks[r], group=self.group, async_op=True))
        for work in works:
            work.wait()
        with torch.no_grad():
            for bucket, buf in theirs:
                offset = 0
                for k in bucket:
                    p = params[k]
                    p.copy_(_like(buf[offset:offset + p.numel()], p))
                    offset += p.numel()

    def _check_keys(self, tree: dict, what: str) -> None:
        if tree.keys() != self.owner.keys():
            missing = sorted(set(self.owner) - set(tree))
            extra = sorted(set(tree) - set(self.owner))
            raise ValueError(f"ShardedOptimizer: {what} must have the names it was built with; missing {missing}, "
                             f"unexpected {extra}")

    # -- state in the ordinary (unsharded) format -------------------------------------------------------
    def full_state(self, state: Any) -> Any:
        """The unsharded optimizer's state, on every process (collective: every process calls it).

        What ``optimizer.init(params)`` and its updates would hold on one process: each parameter's
        tensors come from its owner, the rest (step counts, schedules, flags, which every shard holds
        alike) from rank 0. Save it with ``optim.state_dict``.
        """
        local = _to_cpu(state_dict(state))
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=self.group)
        return load_state_dict(self.inner.init(self.params), _merge(gathered, self.owner))

    def shard_state(self, full_state: Any) -> Any:
        """This rank's shard of an unsharded state (``full_state`` or its ``optim.state_dict``), made on
        any number of processes: resume a checkpoint with another world size."""
        others = set(self.owner) - set(self.owned)
        saved = _drop(state_dict(full_state), others)
        return load_state_dict(self.inner.init({k: self.params[k] for k in self.owned}), saved)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree


def _merge(parts: list[Any], owner: dict[str, int]) -> Any:
    """One saved state from each rank's (nested dicts): a parameter's entry from its owner."""
    first = parts[0]
    if not isinstance(first, dict):
        return first
    keys = list(dict.fromkeys(k for p in parts for k in p))
    out = {}
    for k in keys:
        if k in owner:
            out[k] = parts[owner[k]][k]
        else:
            out[k] = _merge([p[k] for p in parts], owner)
    return out


def _drop(tree: Any, names: set[str]) -> Any:
    """A saved state without the entries of the parameters in ``names``."""
    if not isinstance(tree, dict):
        return tree
    return {k: _drop(v, names) for k, v in tree.items() if k not in names}


__all__ = ["ShardedOptimizer", "partition", "state_nbytes"]
