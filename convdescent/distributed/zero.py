"""ZeRO stage 1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models"): each process keeps the optimizer state of 1/N of the parameters (``--shard-optimizer``).

The parameters are split into N shards of about 1/N of the elements each (:func:`partition`): tensors of
fewer than 2 dims stay whole, larger ones may be cut into blocks of rows along dim 0, so a model whose
parameters sit mostly in one tensor (the tutorial CNN's first dense layer holds 99.7% of them) still has
its state spread evenly. At every step each process hands in its local gradients (the mean over its slice
of the batch); then

1. the gradients of each shard are summed onto their owner (one ``torch.distributed.reduce`` per owner and
   dtype, launched together; gloo has no reduce-scatter) and divided by N: the owner holds the mean over
   the processes, what the data-parallel all-reduce would have given it;
2. each owner runs the wrapped optimizer on its shard (its fused kernel where it has one), a block of rows
   under its tensor's name, inside :func:`convdescent.optim.sharding.across_shards`, so the global-norm
   clip, the clip flags, the recorded norms and the per-tensor norms of split tensors are those of the
   whole gradient (an optimizer with a transform not known to be exact on row blocks keeps whole tensors,
   see :class:`ShardedOptimizer`);
3. each owner broadcasts its updated parameters (one broadcast per owner and dtype), and every process
   ends the step with the same parameters.

Element for element this computes what the unsharded optimizer computes on the all-reduced gradient, and
its step counts and schedules advance once per step as there, so the trajectories agree to rounding.
:meth:`ShardedOptimizer.full_state` rebuilds the ordinary unsharded state (for a checkpoint) and
:meth:`ShardedOptimizer.shard_state` cuts one back into shards, for any number of processes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import dense_order, view_like
from ..optim import GradientTransformation, load_state_dict, state_dict, update_and_apply
from ..optim.sharding import across_shards, row_block_blockers


class Piece(NamedTuple):
    """Rows ``start:stop`` along dim 0 of the parameter ``name``, a part of one shard.

    ``whole`` when the piece is the entire tensor; then ``start, stop`` are ``0`` and the number of rows
    (1 for a 0-d tensor). A split piece's optimizer state has the piece's shape, ``(stop - start, *rest)``.
    """

    name: str
    start: int
    stop: int
    whole: bool

    def of(self, t: Tensor) -> Tensor:
        """This piece of ``t`` (a view; ``t`` itself when whole)."""
        return t if self.whole else t[self.start:self.stop]


def _rows(shape: Sequence[int]) -> int:
    return shape[0] if len(shape) else 1


def _fill_levels(loads: list[int], extra: int) -> list[float]:
    """How much of ``extra`` each rank takes so the final loads are as level as possible (water filling)."""
    low = sorted(loads)
    level = float(low[-1])
    for i in range(len(low)):
        level = (extra + sum(low[:i + 1])) / (i + 1)
        if i + 1 == len(low) or level <= low[i + 1]:
            break
    return [max(0.0, level - load) for load in loads]


def partition(shapes: Mapping[str, Sequence[int]], n: int, split: bool = True) -> list[list[Piece]]:
    """Split named tensors into ``n`` shards of about ``1/n`` of the elements each.

    Tensors of fewer than 2 dims (biases, norm scales), and every tensor when ``split`` is False, stay whole:
    they are placed first, largest first (ties: the earlier name), each on the shard with the fewest
    elements so far (ties: the lower rank). The other tensors are then laid end to end in the order of
    ``shapes`` and cut into consecutive runs, rank after rank, each run filling its shard up to the common
    level; a cut falls on the row boundary (dim 0) nearest to it, so each shard is within about one row of
    its share and a tensor may be spread over several consecutive ranks. Every process computes the same
    split from the same shapes.

    Args:
        shapes: ``name -> shape``, in the parameters' order.
        n: the number of shards (processes), at least 1.
        split: whether tensors of 2 or more dims may be cut into blocks of rows.

    Returns:
        ``n`` lists of :class:`Piece`, each in the order of ``shapes``; a shard holds at most one piece of a
        tensor, and a shard may be empty (too few rows for too many processes).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of shards must be a positive int, got {n!r}")
    order = {name: i for i, name in enumerate(shapes)}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    cuttable = [k for k, s in shapes.items() if split and len(s) >= 2 and s[0] >= 2 and numel[k] > 0]
    load = [0] * n
    pieces: list[list[Piece]] = [[] for _ in range(n)]
    for name in sorted(set(shapes) - set(cuttable), key=lambda k: (-numel[k], order[k])):
        r = min(range(n), key=lambda i: (load[i], i))
        pieces[r].append(Piece(name, 0, _rows(shapes[name]), True))
        load[r] += numel[name]
    # The runs: rank r takes the elements [bounds[r], bounds[r + 1]) of the cuttable tensors end to end.
    total = sum(numel[k] for k in cuttable)
    bounds = [0.0]
    for share in _fill_levels(load, total):
        bounds.append(bounds[-1] + share)
    bounds[-1] = float(total)
    offset = 0
    for name in cuttable:
        rows, row = shapes[name][0], numel[name] // shapes[name][0]
        cuts = [min(rows, max(0, math.floor((b - offset) / row + 0.5))) for b in bounds]
        for r in range(n):
            if cuts[r + 1] > cuts[r]:
                pieces[r].append(Piece(name, cuts[r], cuts[r + 1], cuts[r] == 0 and cuts[r + 1] == rows))
        offset += numel[name]
    return [sorted(shard, key=lambda p: order[p.name]) for shard in pieces]


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


def _flat(t: Tensor) -> Tensor:
    """``t`` as one vector in its memory order (a view where it can be)."""
    return t.permute(dense_order(t)).reshape(-1)


def _flat_piece(t: Tensor, piece: Piece) -> Tensor:
    """``piece`` of ``t`` as one vector: a whole tensor in its memory order, a block of rows row by row."""
    return _flat(t) if piece.whole else piece.of(t).reshape(-1)


def _shaped_piece(flat: Tensor, t: Tensor, piece: Piece) -> Tensor:
    """The vector ``flat`` (from :func:`_flat_piece`) viewed as ``piece`` of ``t``."""
    if piece.whole:
        return view_like(flat, t)
    return flat.view((piece.stop - piece.start, *t.shape[1:]))


def _buckets(pieces: list[Piece], tensors: dict[str, Tensor]) -> list[list[Piece]]:
    """``pieces`` grouped by (dtype, device), each group in order: one flat buffer per group."""
    groups: dict[tuple, list[Piece]] = {}
    for piece in pieces:
        t = tensors[piece.name]
        groups.setdefault((t.dtype, t.device), []).append(piece)
    return list(groups.values())


class ShardedOptimizer:
    """Any convdescent optimizer with its state split across the processes of a group (ZeRO stage 1).

    Every process of the group builds it with the same optimizer and the same parameter names and shapes,
    and calls :meth:`step` (and :meth:`full_state`) together with the others.

    The state is split by elements, not by whole tensors (:func:`partition`): a tensor of 2 or more dims
    may be cut into blocks of rows along dim 0, one per process, so each process keeps about ``1/N`` of the
    state even when one tensor holds nearly all the parameters. The optimizer then runs on each block under
    the tensor's name; that is exact for every transform in
    :data:`convdescent.optim.sharding.EXACT_ON_ROW_BLOCKS` (per-tensor norms are reduced over the blocks,
    units of adaptive clipping are rows, masks go by name). An optimizer containing any other transform (a
    user-written one, say) may take values over whole tensors: its tensors are kept whole, with a warning
    unless ``split=False`` asks for that, and ``split=True`` is refused.

    Args:
        optimizer: a GradientTransformation (``optim.adam(...)``, ``make_optimizer(...)``, a chain).
        params: ``name -> Tensor``, the model's parameters (``model.params()``), updated in place.
        group: the process group; None for the default group.
        split: cut tensors into blocks of rows: None (default) where the optimizer allows it, True (an
            error where it does not), False never (whole tensors, balanced greedily).

    Attributes:
        rank, world_size: this process's rank in the group and the group's size.
        split: whether tensors may be cut into blocks of rows (the ``split`` argument, resolved).
        shards: each rank's :class:`Piece` list (see :func:`partition`).
        owned: this rank's pieces, ``shards[rank]``: the tensors (or the row blocks of tensors, under the
            tensor's name) whose optimizer state this process keeps.
        holders: ``name -> [(rank, piece), ...]``, the pieces of each tensor in row order.
        split_names: the tensors spread over more than one process.
        sizes: the number of parameter elements in each rank's shard.
    """

    def __init__(self, optimizer: GradientTransformation, params: dict[str, Tensor], group=None,
                 split: bool | None = None):
        if not isinstance(optimizer, GradientTransformation):
            raise ValueError(f"ShardedOptimizer needs a GradientTransformation, got {optimizer!r}")
        if split is not None and not isinstance(split, bool):
            raise ValueError(f"ShardedOptimizer: split must be None, True or False, got {split!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs an initialized torch.distributed process group: "
                               "call torch.distributed.init_process_group first")
        self.inner = optimizer
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.split = self._choose_split(split)
        self.params = dict(params)
        self.shards = partition({k: tuple(p.shape) for k, p in params.items()}, self.world_size, self.split)
        if not all(self.shards):
            # A process without parameters would skip the collectives inside its optimizer's step.
            pieces = sum(len(s) for s in self.shards)
            raise ValueError(f"sharding the optimizer needs a share of the parameters on every process: the "
                             f"model's {len(params)} tensors make {pieces} pieces for {self.world_size} processes "
                             f"(only tensors of 2 or more dims are cut, by rows); use fewer processes or do not "
                             f"shard the optimizer")
        self.owned = self.shards[self.rank]
        self.holders: dict[str, list[tuple[int, Piece]]] = {k: [] for k in params}
        for r, pieces in enumerate(self.shards):
            for piece in pieces:
                self.holders[piece.name].append((r, piece))
        for held in self.holders.values():
            held.sort(key=lambda rp: rp[1].start)
        self.split_names = [k for k, held in self.holders.items() if len(held) > 1]
        self.sizes = [sum(math.prod(piece.of(params[piece.name]).shape) for piece in s) for s in self.shards]
        self._ranks = [r if group is None else dist.get_global_rank(group, r) for r in range(self.world_size)]

    def _choose_split(self, split: bool | None) -> bool:
        blockers = row_block_blockers(self.inner)
        if not blockers:
            return split is not False
        if split:
            raise ValueError(f"ShardedOptimizer(split=True): {', '.join(blockers)} may take values over whole "
                             f"tensors, which blocks of rows would change; keep tensors whole with split=False "
                             f"or build the optimizer from convdescent.optim's transforms")
        if split is None and self.world_size > 1:
            warnings.warn(f"ShardedOptimizer: {', '.join(blockers)} may take values over whole tensors, so every "
                          f"parameter tensor stays whole on one process and the state is balanced by whole "
                          f"tensors only (one process may keep much more than 1/{self.world_size} of it); pass "
                          f"split=False to choose this without the warning", stacklevel=3)
        return False

    def __repr__(self) -> str:
        return (f"ShardedOptimizer(rank {self.rank} of {self.world_size}, {len(self.owned)} pieces of "
                f"{len(self.holders)} tensors, {self.sizes[self.rank]} of {sum(self.sizes)} elements, "
                f"{self.inner!r})")

    # -- the step ---------------------------------------------------------------------------------
    def _work(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors the wrapped optimizer updates: whole owned tensors themselves, owned blocks of rows
        as contiguous tensors (views where the rows are contiguous already, copies otherwise)."""
        return {p.name: params[p.name] if p.whole else p.of(params[p.name]).contiguous() for p in self.owned}

    def init(self, params: dict[str, Tensor]) -> Any:
        """The wrapped optimizer's state for this rank's pieces only."""
        self._check_keys(params, "params")
        return self.inner.init(self._work(params))

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
        work = self._work(params)
        with across_shards(self._sum, self.split_names):
            state = update_and_apply(self.inner, work, shard_grads, state)
        with torch.no_grad():
            for piece in self.owned:
                view = piece.of(params[piece.name])
                if not piece.whole and work[piece.name].data_ptr() != view.data_ptr():
                    view.copy_(work[piece.name])  # the rows were not contiguous: the update ran on a copy
        self._broadcast_params(params, work)
        return state

    def _sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def _reduce_grads(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's pieces of the mean over processes of ``grads`` (fresh tensors)."""
        works, mine = [], []
        for r, pieces in enumerate(self.shards):
            for bucket in _buckets(pieces, grads):
                buf = torch.cat([_flat_piece(grads[p.name], p) for p in bucket])
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
            for piece in bucket:
                g = grads[piece.name]
                n = math.prod(piece.of(g).shape)
                out[piece.name] = _shaped_piece(buf[offset:offset + n], g, piece)
                offset += n
        return {p.name: out[p.name] for p in self.owned}

    def _broadcast_params(self, params: dict[str, Tensor], work: dict[str, Tensor]) -> None:
        works, theirs = [], []
        for r, pieces in enumerate(self.shards):
            for bucket in _buckets(pieces, params):
                if r == self.rank:
                    buf = torch.cat([_flat_piece(params[p.name], p) if p.whole else work[p.name].reshape(-1)
                                     for p in bucket])
                else:
                    first = params[bucket[0].name]
                    size = sum(math.prod(p.of(params[p.name]).shape) for p in bucket)
                    buf = torch.empty(size, dtype=first.dtype, device=first.device)
                    theirs.append((bucket, buf))
                works.append(dist.broadcast(buf, src=self._ranks[r], group=self.group, async_op=True))
        for work_handle in works:
            work_handle.wait()
        with torch.no_grad():
            for bucket, buf in theirs:
                offset = 0
                for piece in bucket:
                    p = params[piece.name]
                    view = piece.of(p)
                    n = math.prod(view.shape)
                    view.copy_(_shaped_piece(buf[offset:offset + n], p, piece))
                    offset += n

    def _check_keys(self, tree: dict, what: str) -> None:
        if tree.keys() != self.holders.keys():
            missing = sorted(set(self.holders) - set(tree))
            extra = sorted(set(tree) - set(self.holders))
            raise ValueError(f"ShardedOptimizer: {what} must have the names it was built with; missing {missing}, "
                             f"unexpected {extra}")

    # -- state in the ordinary (unsharded) format -------------------------------------------------------
    def full_state(self, state: Any) -> Any:
        """The unsharded optimizer's state, on every process (collective: every process calls it).

        What ``optimizer.init(params)`` and its updates would hold on one process, tensors laid out as
        there: a whole tensor's entries come from its holder, a split tensor's are its pieces' stacked in
        row order, the rest (step counts, schedules, flags, which every shard holds alike) from rank 0.
        Save it with ``optim.state_dict``.
        """
        local = _to_cpu(state_dict(state))
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=self.group)
        template = self.inner.init(self.params)
        ranks = {k: [r for r, _ in held] for k, held in self.holders.items()}
        return load_state_dict(template, _merge(state_dict(template), gathered, ranks))

    def shard_state(self, full_state: Any) -> Any:
        """This rank's shard of an unsharded state (``full_state`` or its ``optim.state_dict``), made on
        any number of processes: resume a checkpoint with another world size."""
        mine = {p.name: p for p in self.owned}
        saved = _cut(state_dict(full_state), set(self.holders), mine)
        return load_state_dict(self.inner.init(self._work(self.params)), saved)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree


def _merge(template: Any, parts: list[Any], ranks: dict[str, list[int]]) -> Any:
    """One saved state from each rank's (nested dicts), shaped as ``template`` (the unsharded one's
    ``state_dict``): a parameter's entry from its holder, or its holders' row blocks joined in order."""
    if not isinstance(template, dict):
        return parts[0]
    out = {}
    for k, v in template.items():
        if k in ranks and isinstance(v, Tensor) and len(ranks[k]) > 1:
            out[k] = v.copy_(torch.cat([parts[r][k] for r in ranks[k]]))
        elif k in ranks:
            out[k] = parts[ranks[k][0]][k]
        else:
            out[k] = _merge(v, [p[k] for p in parts], ranks)
    return out


def _cut(tree: Any, names: set[str], mine: dict[str, Piece]) -> Any:
    """A saved unsharded state reduced to the pieces in ``mine`` (``names``: every parameter's name)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if k not in names:
            out[k] = _cut(v, names, mine)
        elif k in mine:
            piece = mine[k]
            out[k] = v if piece.whole or not isinstance(v, Tensor) else piece.of(v).contiguous()
    return out


__all__ = ["Piece", "ShardedOptimizer", "partition", "state_nbytes"]
