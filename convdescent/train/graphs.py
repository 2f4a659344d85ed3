"""The training step as one CUDA graph: recorded once, replayed for every batch of the same shape.

The engine runs without autograd and a step has static shapes, so everything a step launches (forward,
loss, explicit backward, the fused optimizer update) is the same sequence of kernels every time; only the
values in a few tensors change. :class:`StaticStep` is that step written against fixed tensors: the batch
is copied into two buffers, the learning rate and the step count are device scalars filled before each
step, and the loss and the count of correct predictions land in two output scalars. On the CPU it runs as
it is (the tests check it equals ``train_step`` there); on CUDA :class:`GraphedSteps` records one run of it
with ``torch.cuda.graph`` and replays the recording, which removes the launch cost of some hundred small
kernels per step (at batch 32 on a large GPU the eager step is launch-bound).

What can be recorded: the Adam and AdamW chains that the fused kernel computes (their state is updated in
place, and the kernel reads its learning rate and step count from device tensors), at constant first-moment
decay. Everything else (other optimizers, a rollback's scaled learning rate, mixed shapes) runs the eager
step; :class:`GraphedSteps` says once why. Random layers (Dropout) are recorded only where torch can register
their generators with the graph. The host fills the learning rate and step count from the optimizer's
Python state before each replay, so eager and replayed steps can alternate (the last, smaller batch of an
epoch runs eagerly) and checkpoints hold the same state as without graphs.
"""

from __future__ import annotations

import torch

from ..optim.fused import fused_step
from .step import compute_gradients, train_step


def capture_blocker(model, optimizer, opt_state, precision=None) -> str | None:
    """Why the step cannot be written against static tensors (None: it can).

    Args:
        model: a built ``Sequential``; optimizer, opt_state: the optimizer and its state.
        precision: the Trainer's ``Precision`` (None: fp32).
    """
    info = getattr(optimizer, "info", None)
    fused = fused_step(optimizer)
    if fused is None or not getattr(fused, "static", False):
        name = getattr(info, "name", type(optimizer).__name__) if info is not None else type(optimizer).__name__
        return f"the optimizer ({name}) has no fused step with device-side learning rate (Adam and AdamW do)"
    if fused.static_blocker is not None:
        return fused.static_blocker
    if not model.params():
        return "the model has no parameters"
    return None


class StaticStep:
    """``train_step`` against fixed input, learning-rate and step-count tensors (see the module doc).

    Args:
        model, loss_fn, optimizer: as for ``train_step`` (the optimizer must pass ``capture_blocker``).
        x_like: a batch of inputs (B, C, H, W) whose shape, dtype, layout and device the buffer copies.
        y_like: its labels (B,).
        precision: a ``Precision`` (None: fp32).

    Use: ``prepare(xb, yb, state)``, then ``body()`` (or a replay of its recording), then
    ``finish(state) -> new state``; ``loss`` and ``correct`` hold the step's results until the next step.
    """

    def __init__(self, model, loss_fn, optimizer, x_like: torch.Tensor, y_like: torch.Tensor, precision=None):
        self.model, self.loss_fn, self.precision = model, loss_fn, precision
        self.fused = fused_step(optimizer)
        device = x_like.device
        layout = torch.channels_last if (x_like.dim() == 4 and not x_like.is_contiguous()
                                         and x_like.is_contiguous(memory_format=torch.channels_last)) \
            else torch.contiguous_format
        self.x = torch.empty_like(x_like, memory_format=layout)
        self.y = torch.empty_like(y_like)
        first = next(iter(model.params().values()))
        # float64 on the CPU matches the eager kernel's double learning rate bit for bit; the CUDA kernel reads
        # a float32 scalar.
        self.lr = torch.zeros((), dtype=torch.float32 if device.type == "cuda" else torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float32, device=device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.shape = tuple(x_like.shape)
        self.state = None

    def matches(self, xb: torch.Tensor) -> bool:
        return tuple(xb.shape) == self.shape and xb.dtype == self.x.dtype and xb.device == self.x.device

    def prepare(self, xb: torch.Tensor, yb: torch.Tensor, opt_state) -> None:
        """Copy the batch in and set the learning rate and step count of the coming update (no host sync)."""
        self.x.copy_(xb)
        self.y.copy_(yb)
        self.state = opt_state
        lr, count = self.fused.next_lr_and_count(opt_state)
        self.lr.fill_(lr)
        self.count.fill_(float(count))

    def body(self) -> None:
        """The step itself, reading only the fixed tensors: what a CUDA graph records."""
        loss, correct, grads = compute_gradients(self.model, self.loss_fn, self.x, self.y, self.precision)
        if not self.fused.apply_static(self.model.params(), grads, self.state, self.lr, self.count):
            raise RuntimeError("the fused optimizer step does not apply to these parameters (device or dtype)")
        self.loss.copy_(loss)
        self.correct.copy_(correct)

    def finish(self, opt_state):
        """The optimizer state after the update (the counters advance on the host; tensors were updated in place)."""
        return self.fused.advance(opt_state)

    def run(self, xb, yb, opt_state):
        """One eager step through the fixed tensors: ``(loss, correct, new state)`` like ``train_step``."""
        self.prepare(xb, yb, opt_state)
        self.body()
        return self.loss, self.correct, self.finish(opt_state)


def _state_tensors(model, opt_state) -> tuple:
    """Identities of every tensor a recorded step reads or writes in place: a replay is valid only while
    these are the same objects (a restore that swaps in new tensors must trigger a new recording)."""
    out = [id(t) for t in model.params().values()]
    out += [id(t) for t in model.buffers().values()]

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(id(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)

    walk(opt_state)
    return tuple(out)


class GraphedSteps:
    """Training steps that replay one CUDA-graph recording of :class:`StaticStep` where they can.

    Args:
        model, loss_fn, optimizer: as for ``train_step``.
        precision: a ``Precision`` (None: fp32).
        enabled: False runs every step eagerly (``--no-cuda-graph``).
        warmup: eager steps through the static step before recording (cuBLAS and the allocator settle on a
            side stream first, as CUDA graphs require); they are real training steps, not thrown away.
        notice: ``fn(text)`` told once per reason when a step runs eagerly instead of replaying.

    ``step(xb, yb, opt_state) -> (loss, correct, new state)``; ``replays`` and ``eager_steps`` count what ran.
    """

    def __init__(self, model, loss_fn, optimizer, precision=None, enabled: bool = True, warmup: int = 3,
                 notice=None):
        self.model, self.loss_fn, self.optimizer, self.precision = model, loss_fn, optimizer, precision
        self.enabled = bool(enabled)
        self.warmup = int(warmup)
        self.notice = notice
        self._told: set[str] = set()
        self._static: StaticStep | None = None
        self._graph = None
        self._graph_keys = None
        self._warm = 0
        self.replays = 0
        self.eager_steps = 0
        self.recordings = 0

    def _tell(self, text: str) -> None:
        if text not in self._told:
            self._told.add(text)
            if self.notice is not None:
                self.notice(f"CUDA graph: {text}; running eager steps there")

    def _blocker(self, xb, opt_state) -> str | None:
        if not self.enabled:
            return "disabled"
        if xb.device.type != "cuda" or not torch.cuda.is_available():
            return "not on a CUDA device"
        return capture_blocker(self.model, self.optimizer, opt_state, self.precision)

    def _eager(self, xb, yb, opt_state):
        self.eager_steps += 1
        if self.precision is not None and self.precision.mixed:
            from ..optim import update_and_apply

            loss, correct, grads = compute_gradients(self.model, self.loss_fn, xb, yb, self.precision)
            opt_state = update_and_apply(self.optimizer, self.model.params(), grads, opt_state)
            return loss, correct, opt_state
        return train_step(self.model, self.loss_fn, self.optimizer, opt_state, xb, yb)

    def _register_generators(self, graph) -> str | None:
        gens = [layer._require_generator() for _, layer in self.model.all_layers() if hasattr(layer, "get_rng_state")]
        if not gens:
            return None
        register = getattr(graph, "register_generator_state", None)
        if register is None:
            return "random layers (Dropout) need torch >= 2.4 to be recorded"
        for g in gens:
            if g.device.type == "cuda":
                register(g)
        return None

    def _record(self, opt_state):
        graph = torch.cuda.CUDAGraph()
        why = self._register_generators(graph)
        if why is not None:
            return why
        try:
            with torch.cuda.graph(graph):
                self._static.body()
        except Exception as exc:  # capture refuses host syncs and some ops; the eager step still works
            torch.cuda.synchronize()
            return f"recording failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        self._graph = graph
        self._graph_keys = _state_tensors(self.model, opt_state)
        self.recordings += 1
        return None

    def step(self, xb: torch.Tensor, yb: torch.Tensor, opt_state):
        """One training step; replays the recording when the batch and the state tensors allow it."""
        why = self._blocker(xb, opt_state)
        if why is not None:
            if why != "disabled" and why != "not on a CUDA device":
                self._tell(why)
            return self._eager(xb, yb, opt_state)
        if self._static is None:
            self._static = StaticStep(self.model, self.loss_fn, self.optimizer, xb, yb, self.precision)
        static = self._static
        if not static.matches(xb):
            self._tell(f"a batch of shape {tuple(xb.shape)} differs from the recorded {static.shape}")
            return self._eager(xb, yb, opt_state)
        if self._graph is not None and self._graph_keys != _state_tensors(self.model, opt_state):
            self._graph = None  # the state was replaced (restore, load): record again
            self._warm = self.warmup
        if self._graph is None and self._warm < self.warmup:
            # Warm-up steps run the static step on a side stream, as torch requires before a capture.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                static.prepare(xb, yb, opt_state)
                static.body()
            torch.cuda.current_stream().wait_stream(stream)
            self._warm += 1
            self.eager_steps += 1
            return static.loss.clone(), static.correct.clone(), static.finish(opt_state)
        static.prepare(xb, yb, opt_state)
        if self._graph is None:
            failed = self._record(opt_state)
            if failed is not None:
                self.enabled = False
                self._tell(failed)
                return self._eager(xb, yb, opt_state)
        self._graph.replay()
        self.replays += 1
        # The outputs are overwritten by the next replay: hand out copies (two scalar copies on the device).
        return static.loss.clone(), static.correct.clone(), static.finish(opt_state)
