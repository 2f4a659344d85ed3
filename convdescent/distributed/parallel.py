"""What the trainer asks of a data-parallel run: reduced gradients, agreed decisions, global figures.

``DataParallel`` is the trainer's only contact with torch.distributed (``Trainer(parallel=...)``). Every
method here is a collective: each rank calls it at the same point of the loop, so the ranks always issue the
same collectives in the same order. Code that runs on rank 0 alone (writing checkpoints, metrics, the report)
never calls one.

Per step (``begin`` ... ``finish``) the gradients travel in buckets during the backward
(:class:`~convdescent.distributed.reducer.GradientReducer`); with a sharded optimizer (ZeRO stage 1) the
local gradients are handed to it instead, and only the step's numbers are all-reduced. The step's numbers
are the loss sum and correct count of each rank's slice, and whether a rank has seen SIGINT or SIGTERM: a
signal that reaches one rank stops every rank after the same step.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time

import torch
import torch.distributed as dist

from ..data.loader import shard_bounds
from .reducer import GradientReducer
from .world import DistributedError, World, lost_contact


class DataParallel:
    """Data-parallel collectives for one trainer (see the module docstring).

    Args:
        world: this process's place (``World``); the process group is already joined.
        bucket_mb: gradient bucket size in MiB.
        sharded: a ``ShardedOptimizer`` that owns the update (ZeRO stage 1), or None.
        group: the process group (None: the default one).
    """

    def __init__(self, world: World, bucket_mb: float = 25.0, sharded=None, group=None):
        self.world = world
        self.bucket_mb = float(bucket_mb)
        self.sharded = sharded
        self.group = group
        self.reducer: GradientReducer | None = None
        self._n_global = 1
        self._flags = [0.0, 0.0, 0.0]
        self._numbers = None
        self._seen_grads = None
        self._extra_handle = None
        self.steps = 0
        self.extra_wait_s = 0.0
        self.sharded_s = 0.0

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    def attach(self, model) -> None:
        """Register the gradient hook on the model (once, before training)."""
        if self.sharded is None and self.reducer is None:
            self.reducer = GradientReducer(model, self.bucket_mb, self.group)

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.close()
            self.reducer = None

    def guard(self, what: str, fn, *args):
        """``fn(*args)``; a gloo or NCCL failure (a peer gone, a collective timed out) becomes one
        DistributedError naming this rank and ``what`` it was doing."""
        try:
            return fn(*args)
        except DistributedError:
            raise
        except RuntimeError as e:  # gloo/NCCL: a peer closed its connection or the collective timed out
            raise lost_contact(e, what, self.rank) from None

    # ------------------------------------------------------------------------------------------ steps
    def begin(self, n_global: int, signum: int | None, wants_grads: bool = False) -> None:
        """A step starts over a global batch of ``n_global`` examples; ``signum``: the signal this process
        has received (None: none); ``wants_grads``: a callback of this rank reads this step's gradients.
        Each rank's loss is taken with the global denominator ``n_global`` (see the reducer's docstring)."""
        self._n_global = n_global
        self._flags = [1.0 if signum == signal.SIGINT else 0.0, 1.0 if signum == signal.SIGTERM else 0.0,
                       1.0 if wants_grads else 0.0]
        self._numbers = None
        self._seen_grads = None
        if self.reducer is not None:
            self.reducer.begin()

    def step_loss(self, loss_fn):
        """``loss_fn`` for this step: the same values, and the step's numbers (loss sum, correct count,
        signal flags) handed to the reducer as soon as the loss is known, before the backward starts."""
        def loss_and_numbers(logits, labels, denominator=None):
            loss, dlogits = loss_fn(logits, labels, denominator=denominator)
            correct = (logits.argmax(dim=1) == labels).sum()
            numbers = torch.cat([(loss.detach().double() * self._n_global).reshape(1), correct.double().reshape(1),
                                 torch.tensor(self._flags, dtype=torch.float64, device=loss.device)])
            self._numbers = numbers
            if self.reducer is not None:
                self.reducer.set_numbers(numbers)
            return loss, dlogits

        return loss_and_numbers

    def finish(self, grads: dict, step: int):
        """The backward is done: returns (global gradients, global loss sum, global correct, signal or None).

        ``grads`` are this rank's gradient (its examples' losses over the global batch size), only read when
        the optimizer is sharded (the reducer has copied them otherwise).
        """
        return self.guard(f"step {step}", self._finish, grads)

    def _finish(self, grads):
        if self._numbers is None:
            raise RuntimeError("DataParallel.finish: the step's loss was not computed with step_loss()")
        if self.reducer is not None:
            grads, reduced = self.reducer.finish()
            reduced = reduced.double()
        else:
            # ZeRO: the sharded optimizer takes the mean over ranks of the gradients it is given; this rank's
            # share of the global gradient times the world size has that mean
            grads = {k: g * self.size for k, g in grads.items()}
            t0 = time.perf_counter()
            reduced = self._numbers.clone()
            dist.all_reduce(reduced, group=self.group)
            self.extra_wait_s += time.perf_counter() - t0
        self.steps += 1
        values = reduced.tolist()
        agreed = signal.SIGINT if values[2] > 0 else signal.SIGTERM if values[3] > 0 else None
        if self.sharded is not None and values[4] > 0:
            # a callback on some rank reads this step's gradients: they must be the global ones there too,
            # and every rank takes part in reducing them (the sharded step reduces its own copies)
            self._seen_grads = self._global_copy(grads)
        return grads, reduced[0], reduced[1].round().to(torch.int64), agreed

    def _global_copy(self, grads: dict) -> dict:
        names = list(grads)
        flat = torch.cat([grads[k].reshape(-1) for k in names]).div_(self.size)
        dist.all_reduce(flat, group=self.group)
        out, off = {}, 0
        for k in names:
            n = grads[k].numel()
            out[k] = flat[off:off + n].view(grads[k].shape)
            off += n
        return out

    def visible_grads(self, grads: dict) -> dict:
        """The gradients callbacks see: the global ones (with a sharded optimizer, reduced for them)."""
        return self._seen_grads if self._seen_grads is not None else grads

    def init_state(self, optimizer, params: dict):
        """The optimizer state this rank keeps: all of it, or its shard's with a sharded optimizer."""
        return optimizer.init(params) if self.sharded is None else self.sharded.init(params)

    def full_state(self, opt_state):
        """The unsharded optimizer state (collective with a sharded optimizer), for checkpoints."""
        if self.sharded is None:
            return opt_state
        return self.guard("gathering the optimizer state", self.sharded.full_state, opt_state)

    def shard_state(self, full_state):
        """This rank's part of an unsharded optimizer state (resume on any number of ranks)."""
        return full_state if self.sharded is None else self.sharded.shard_state(full_state)

    def update(self, optimizer, params: dict, grads: dict, opt_state, step: int):
        """The optimizer step: the sharded optimizer's collective step, or None (the caller updates)."""
        if self.sharded is None:
            return None
        t0 = time.perf_counter()
        state = self.guard(f"the update of step {step}", self.sharded.step, params, grads, opt_state)
        self.sharded_s += time.perf_counter() - t0
        return state

    # ------------------------------------------------------------------------------------------ agreement
    def wire(self) -> torch.device:
        """Where the small tensors of the agreement collectives live: NCCL carries CUDA tensors only (on this
        process's GPU), gloo takes CPU ones."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_true(self, ok: bool, what: str = "a finiteness check") -> bool:
        """True on every rank when ``ok`` holds on every rank."""
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=self.wire())
        self.guard(what, dist.all_reduce, flag, dist.ReduceOp.SUM, self.group)
        return float(flag) == 0.0

    def gather_objects(self, obj, what: str) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        out = [None] * self.size
        self.guard(what, dist.all_gather_object, out, obj, self.group)
        return out

    def sum_tensors(self, tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Element-wise sums over ranks of float tensors (one collective)."""
        return self._reduce_tensors(tensors, what, dist.ReduceOp.SUM)

    def max_tensors(self, tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Element-wise maxima over ranks (one collective)."""
        return self._reduce_tensors(tensors, what, dist.ReduceOp.MAX)

    def _reduce_tensors(self, tensors: list[torch.Tensor], what: str, op) -> list[torch.Tensor]:
        if not tensors:
            return []
        flat = torch.cat([t.detach().double().reshape(-1).to(self.wire()) for t in tensors])
        self.guard(what, dist.all_reduce, flat, op, self.group)
        out, off = [], 0
        for t in tensors:
            out.append(flat[off:off + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
            off += t.numel()
        return out

    def evaluate(self, evaluate_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Mean loss and accuracy over (x, y), each rank evaluating a contiguous 1/size of the rows.

        ``evaluate_fn(x_part, y_part) -> (mean loss, accuracy)`` as ``train.step.evaluate`` returns them.
        """
        n = x.shape[0]
        lo, hi = shard_bounds(n, self.rank, self.size)
        if hi > lo:
            loss, acc = evaluate_fn(x[lo:hi], y[lo:hi])
            sums = torch.tensor([loss * (hi - lo), acc * (hi - lo)], dtype=torch.float64, device=self.wire())
        else:
            sums = torch.zeros(2, dtype=torch.float64, device=self.wire())
        self.guard("the validation pass", dist.all_reduce, sums, dist.ReduceOp.SUM, self.group)
        if n == 0:
            return float("nan"), float("nan")
        total = sums.tolist()
        return total[0] / n, total[1] / n

    def check_same(self, settings: dict) -> None:
        """Every rank was started with the same settings; otherwise one error naming what differs.

        Raises:
            DistributedError: (on every rank) the first rank whose settings differ from rank 0's, key by key.
        """
        text = json.dumps(settings, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()
        digests = self.gather_objects(digest, "the start-up check of the settings")
        if len(set(digests)) == 1:
            return
        every = self.gather_objects(settings, "the start-up check of the settings")
        base = every[0]
        for r, other in enumerate(every):
            if other == base:
                continue
            keys = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            diff = "; ".join(f"{k} {other.get(k)!r} on rank {r}, {base.get(k)!r} on rank 0" for k in keys)
            err = DistributedError(f"the processes of this run were started with different settings ({diff}); "
                                   f"start every process with the same command and configuration")
            err.quiet_rank = self.rank != 0  # every rank stops with it; rank 0 says it for the run
            raise err

    def broadcast(self, obj, what: str):
        """Rank 0's ``obj`` on every rank."""
        box = [obj if self.rank == 0 else None]
        self.guard(what, dist.broadcast_object_list, box, 0, self.group)
        return box[0]

    def barrier(self, what: str) -> None:
        self.guard(what, dist.barrier, self.group)

    # ------------------------------------------------------------------------------------------ figures
    def stats(self) -> dict:
        """Communication figures of this rank: world size, buckets, wait per step and the overlapped share."""
        out = {"world_size": self.size, "sharded_optimizer": self.sharded is not None}
        if self.reducer is not None:
            out.update(self.reducer.stats())
            out["bucket_mb"] = self.bucket_mb
        else:
            steps = max(self.steps, 1)
            out.update({"steps": self.steps, "wait_per_step_s": self.extra_wait_s / steps, "overlap": 0.0,
                        "sharded_step_per_step_s": self.sharded_s / steps})
        return out


def describe_stats(stats: dict) -> str:
    """The summary's line: communication wait per step, the share of it that overlapped the backward, and
    the optimizer state rank 0 keeps."""
    line = f"Communication ({stats.get('world_size')} processes"
    if stats.get("buckets"):
        line += f", {stats['buckets']} gradient bucket{'s' if stats['buckets'] != 1 else ''}"
    if stats.get("sharded_optimizer"):
        line += ", sharded optimizer"
    line += f"): {stats.get('wait_per_step_s', 0.0) * 1e3:.2f} ms waited per step"
    if "comm_per_step_s" in stats:
        line += (f", {stats['comm_per_step_s'] * 1e3:.2f} ms in flight per step, "
                 f"{stats.get('overlap', 0.0) * 100:.0f}% of it overlapped with the backward")
    if "sharded_step_per_step_s" in stats:
        line += (f", {stats['sharded_step_per_step_s'] * 1e3:.2f} ms per step in the sharded update (gradient "
                 f"reduction, the shard's update, parameter broadcast)")
    if stats.get("optimizer_state_bytes") is not None:
        line += f"; optimizer state {stats['optimizer_state_bytes'] / 2 ** 20:.2f} MiB on rank 0"
    return line
