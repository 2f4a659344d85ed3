"""Gradient buckets all-reduced while the backward pass is still running.

Each parameter gets a slot in one of a few flat buffers (buckets of about ``bucket_mb`` MiB), in the order
the backward pass finishes them: the last layer's first. The model's ``after_backward`` hook copies a
layer's gradients into their slots as soon as they are final; when every slot of a bucket is filled the
bucket is handed to ``torch.distributed.all_reduce(..., async_op=True)`` and the backward goes on while the
bytes travel. ``finish`` launches what is left, then waits on the handles; the gradients it returns are
views of the reduced buckets.

The reduction is a plain sum: rank r, holding n_r of the step's n examples, computes its loss with the
global batch's denominator (the sum of its examples' losses over n), so its gradient is its share of the
global one and the sum over ranks is

    g = sum_r (1/n) sum_{i in r} dl_i/dtheta,

the gradient of the mean loss over the global batch, exactly what one process computes, also when the last
batch of an epoch does not split evenly. (Scaling each rank's dL/dlogits alike matters for synced batch
norm, whose backward sums dL/dy over all ranks.)

The first bucket also carries a few numbers of the step (the loss sum, the correct count, signal flags:
known once the loss is, before the backward starts), so loss, accuracy and the decision to stop reach every
rank without a collective of their own. As in torch's DDP the first bucket is small (at most 1 MiB), so the
last layers' gradients leave early; a bucket closes once it holds at least its size.

Buckets are launched strictly in index order on every rank (a bucket that fills early waits for those before
it), so all ranks issue the same collectives in the same order. After the first step the buckets are rebuilt
once if the backward finished the parameters in another order than assumed (the same on every rank).
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from ..layout import view_like

EXTRA = 5  # loss sum, correct count, SIGINT count, SIGTERM count, ranks whose callbacks read the gradients


class _Bucket:
    """One flat buffer holding the gradients of ``names``; each slot is laid out in memory as its parameter
    in ``params`` is, so the gradient is copied in and handed to the optimizer without a transposition."""

    def __init__(self, names: list[str], params: dict, dtype, device, extra: int):
        numel = sum(params[n].numel() for n in names)
        self.names = names
        self.buffer = torch.zeros(numel + extra, dtype=dtype, device=device)
        self.views: dict[str, torch.Tensor] = {}
        off = 0
        for n in names:
            size = params[n].numel()
            self.views[n] = view_like(self.buffer[off:off + size], params[n])
            off += size
        self.extra = self.buffer[off:] if extra else None
        self.pending = len(names)
        self.arrived: set[str] = set()
        self.handle = None
        self.launched_at = 0.0
        self.done_at: list[float] = []

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class GradientReducer:
    """Bucketed, overlapped all-reduce of a model's gradients (see the module docstring).

    Args:
        model: a built ``Sequential``; its hook is registered once and stays (``close`` removes it).
        bucket_mb: target bucket size in MiB.
        group: the process group (None: the default one).

    Use per step: ``begin()``, ``set_numbers(values)`` once the loss is known (before the backward), run
    the backward, then ``finish()``.
    """

    def __init__(self, model, bucket_mb: float = 25.0, group=None):
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        self.model = model
        self.group = group
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        params = model.params()
        self._params = params  # shapes and memory layouts of the slots (column-major Dense weights stay so)
        self._dtype = next(iter(params.values())).dtype if params else torch.float32
        self._device = next(iter(params.values())).device if params else torch.device("cpu")
        self._names = list(params)
        self._build(list(reversed(self._names)))
        self._observed: list[str] | None = []
        self._rebuilt = False
        self.active = False
        self.weight = 1.0
        self._lock = threading.Lock()
        self.steps = 0
        self.wait_s = 0.0
        self.comm_s = 0.0
        self.hidden_s = 0.0
        self._handle = model.register_hook("after_backward", self._on_grads)

    def _build(self, order: list[str]) -> None:
        groups: list[list[str]] = [[]]
        size = 0
        item = torch.empty((), dtype=self._dtype).element_size()
        for n in order:
            cap = min(2 ** 20, self.bucket_bytes) if len(groups) == 1 else self.bucket_bytes
            if size >= cap:
                groups.append([])
                size = 0
            groups[-1].append(n)
            size += self._params[n].numel() * item
        self.buckets = [_Bucket(g, self._params, self._dtype, self._device, EXTRA if i == 0 else 0)
                        for i, g in enumerate(groups)]
        self._where = {n: b for b in self.buckets for n in b.names}
        self.order = list(order)

    def describe(self) -> str:
        mb = [b.nbytes / 2 ** 20 for b in self.buckets]
        return f"{len(mb)} bucket{'s' if len(mb) != 1 else ''} ({', '.join(f'{m:.2f}' for m in mb)} MiB)"

    def close(self) -> None:
        self._handle.remove()

    # ------------------------------------------------------------------------------------------ per step
    def begin(self, weight: float = 1.0) -> None:
        """Start a step; the gradients are summed over ranks as they are, times ``weight``."""
        if self._observed is not None and len(self._observed) == len(self._names) and not self._rebuilt:
            if self._observed != self.order:
                self._build(self._observed)
            self._rebuilt = True
            self._observed = None
        elif self._observed is not None and self._observed:
            self._observed = None  # an incomplete first step: keep the assumed order
        for b in self.buckets:
            b.pending = len(b.names)
            b.arrived = set()
            b.handle = None
            b.done_at = []
        self._next = 0
        self.weight = float(weight)
        self.active = True

    def _on_grads(self, name, layer, grads) -> None:
        if not self.active:
            return
        for key, g in grads.items():
            b = self._where.get(key)
            if b is None:
                continue
            view = b.views[key]
            view.copy_(g)
            if self.weight != 1.0:
                view.mul_(self.weight)
            b.pending -= 1
            b.arrived.add(key)
            if self._observed is not None:
                self._observed.append(key)
        self._launch_ready(final=False)

    def _launch(self, b: _Bucket) -> None:
        b.launched_at = time.perf_counter()
        b.handle = dist.all_reduce(b.buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        try:
            stamps = b.done_at
            b.handle.get_future().then(lambda fut: stamps.append(time.perf_counter()))
        except (RuntimeError, AttributeError):
            pass  # no completion time: the wait below stands in for it

    def set_numbers(self, values: torch.Tensor) -> None:
        """The step's EXTRA numbers, summed over ranks with the first bucket."""
        slot = self.buckets[0].extra
        slot.copy_(values.to(device=slot.device, dtype=slot.dtype))

    def _launch_ready(self, final: bool) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if b.pending > 0 and not final:
                return
            self._launch(b)
            self._next += 1

    def finish(self) -> tuple[dict, torch.Tensor]:
        """Launch what is left, wait for every bucket.

        Returns:
            (gradients by parameter name: views of the reduced buckets, the reduced numbers).
        """
        for b in self.buckets[self._next:]:
            if b.pending > 0:  # parameters the backward did not reach: zero gradient, on every rank
                for n in b.names:
                    if n not in b.arrived:
                        b.views[n].zero_()
                b.pending = 0
        self._launch_ready(final=True)
        self.active = False
        end_backward = time.perf_counter()
        for b in self.buckets:
            b.handle.wait()
        done = time.perf_counter()
        first = min(b.launched_at for b in self.buckets)
        last_done = max([t for b in self.buckets for t in b.done_at] or [done])
        last_done = min(max(last_done, first), done)
        span = max(last_done - first, 0.0)
        self.steps += 1
        self.wait_s += done - end_backward
        self.comm_s += span
        self.hidden_s += max(min(last_done, end_backward) - first, 0.0)
        grads = {n: self._where[n].views[n] for n in self._names}
        return grads, self.buckets[0].extra.clone()

    def stats(self) -> dict:
        """Communication figures so far: steps, mean wait per step (s), share of communication overlapped."""
        steps = max(self.steps, 1)
        return {"steps": self.steps, "wait_per_step_s": self.wait_s / steps,
                "comm_per_step_s": self.comm_s / steps,
                "overlap": (self.hidden_s / self.comm_s) if self.comm_s > 0 else 0.0,
                "buckets": len(self.buckets), "bucket_bytes": [b.nbytes for b in self.buckets]}
