"""The training loop shared by ``fit``, ``convdescent train`` and every tool built on them.

One ``Trainer`` runs epochs of steps over a ``BatchLoader``. Per step it does the least it can: when no
callback asks for this step's gradients, it calls ``train_step`` (forward, loss, explicit backward, update)
and adds the loss and the number of correct predictions to two device tensors; nothing is read back to
the host. Everything else happens at coarser boundaries:

- every ``nan_check_every`` steps and at every epoch end, one host sync checks that the epoch's loss sum
  and every parameter are finite, and keeps an in-memory copy of that verified state;
- when a check fails, the loop goes back to the verified copy and replays the steps since then one by one,
  layer by layer (the batches, dropout masks and updates are deterministic), to name the first step, layer
  and tensor that went non-finite. It then stops (``on_nan="stop"``) or restores the verified state, halves
  the learning rate and carries on (``on_nan="rollback"``, at most ``max_rollbacks`` times);
- SIGINT/SIGTERM set a flag; the current step finishes, the state is verified, callbacks write the
  checkpoint and ``TrainingInterrupted`` is raised.

Why not check every step: reading a value back costs a sync per step (and on a GPU, the pipelining of the
whole step); the epoch loss sum turns non-finite as soon as one step's loss does, and a non-finite gradient
makes the parameters non-finite at the update, so the periodic check misses nothing, and the replay
recomputes the same steps (to float rounding where the fast step updated a Dense weight inside its backward:
the replay reads every gradient, so it writes them all and updates after).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Any, Iterable

import torch

from .. import optim
from ..native import flush_subnormals
from ..optim.updates import as_lazy
from .callbacks import Callback, Checkpointer, EpochLogger, ProgressBar, layer_of, uses
from .graphs import GraphedSteps
from .history import History
from .precision import Precision
from .snapshot import Snapshot, random_states, set_random_states
from .step import accumulate_gradients, checked_gradients, compute_gradients, evaluate, train_step


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter and stopped.

    Attributes:
        step: the first update (1-based) that went non-finite, or None if it could not be reproduced.
        layer, tensor, where: the first non-finite value ("forward", "loss", "backward" or "update").
        history: the History up to the last good epoch.
        rank: in a data-parallel run, the rank whose part of the batch went non-finite first (else None).
    """

    def __init__(self, message: str, step=None, layer=None, tensor=None, where=None, history=None, rank=None):
        super().__init__(message)
        self.step, self.layer, self.tensor, self.where, self.history = step, layer, tensor, where, history
        self.rank = rank


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a finished step (callbacks have saved a checkpoint).

    Attributes:
        signal_name: "SIGINT" or "SIGTERM".
        signum: the signal number (exit status 128 + signum is customary).
        step, epoch: where training stopped.
        history: the History so far.
    """

    def __init__(self, signal_name: str, signum: int, step: int, epoch: int, history=None):
        super().__init__(f"{signal_name} received: stopped after step {step} (epoch {epoch})")
        self.signal_name, self.signum, self.step, self.epoch, self.history = signal_name, signum, step, epoch, history


def _first_nonfinite(tensors: dict) -> str | None:
    names = list(tensors)
    if not names:
        return None
    peaks = torch.stack(optim.peak_magnitudes([t.float() for t in tensors.values()]))
    bad = (~torch.isfinite(peaks)).nonzero()
    return names[int(bad[0])] if len(bad) else None


class Trainer:
    """Runs the training loop; ``fit`` and ``train_from_config`` build one and call ``run``.

    Args:
        model: a built ``Sequential`` on the loader's device.
        loss: a loss object (``SoftmaxCrossEntropy()``).
        optimizer: a ``GradientTransformation``.
        loader: a ``BatchLoader`` over the training split (mini-batch or full-batch mode).
        val_data: (x_val uint8 (N, C, H, W), y_val (N,)) on the device, or None.
        epochs: passes over the training set; or ``steps``: total updates (one of them).
        callbacks: ``Callback`` objects, called in order.
        precision: "fp32" or "bf16" (bf16 compute, fp32 master weights).
        on_nan: "stop" or "rollback".
        max_rollbacks: rollbacks allowed with on_nan="rollback".
        nan_check_every: steps between finiteness checks (each is one host sync).
        eval_batch_size: images per validation batch.
        handle_signals: catch SIGINT/SIGTERM (main thread only) to stop cleanly after a step.
        notice_stream: where signal notices go (None: nowhere).
        cuda_graph: on a CUDA device, replay one CUDA-graph recording of the step where it can (see
            :mod:`convdescent.train.graphs`); False runs every step eagerly.
        parallel: a ``convdescent.distributed.DataParallel`` when this process is one rank of a
            data-parallel run (the loader then yields this rank's part of each global batch). Its gradients
            are reduced during the backward, and losses, counts, finiteness checks, the NaN replay, signals
            and validation are agreed over all ranks, so every rank takes the same decisions at the same step.

    Attributes read by callbacks: ``model``, ``optimizer``, ``opt_state``, ``loader``, ``history``, ``step``
    (updates made), ``epochs`` (planned epochs), ``total_steps``, ``stop`` (set True to stop after this
    epoch), ``stop_reason``, ``lr_scale`` (rollback factor), ``current_lr()``, ``elapsed`` (training seconds).
    """

    def __init__(self, model, loss, optimizer, loader, val_data=None, *, epochs: int | None = None,
                 steps: int | None = None, callbacks: Iterable[Callback] = (), precision: str = "fp32",
                 on_nan: str = "stop", max_rollbacks: int = 3, nan_check_every: int = 50,
                 eval_batch_size: int = 1000, handle_signals: bool = True, notice_stream=sys.stderr,
                 cuda_graph: bool = True, parallel=None):
        if on_nan not in ("stop", "rollback"):
            raise ValueError(f"on_nan must be 'stop' or 'rollback', got {on_nan!r}")
        for name, value, low in (("max_rollbacks", max_rollbacks, 0), ("nan_check_every", nan_check_every, 1),
                                 ("eval_batch_size", eval_batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        spe = loader.steps_per_epoch
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive int, got {steps!r}")
            self.total_steps = steps
            self.epochs = math.ceil(steps / spe)
        else:
            epochs = 1 if epochs is None else epochs
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ValueError(f"epochs must be a positive int, got {epochs!r}")
            self.total_steps = epochs * spe
            self.epochs = epochs
        cbs = list(callbacks)
        for cb in cbs:
            if not isinstance(cb, Callback):
                raise ValueError(f"callbacks must be Callback instances, got {cb!r}")
        self.model = model
        self.loss_fn = loss
        self.optimizer = optimizer
        self.loader = loader
        self.normalizer = loader.normalizer
        if val_data is not None and len(val_data[0]) == 0:
            val_data = None
        self.val_data = val_data
        self.callbacks = cbs
        self.precision = Precision(model, precision)
        self.on_nan = on_nan
        self.max_rollbacks = max_rollbacks
        self.nan_check_every = nan_check_every
        self.eval_batch_size = eval_batch_size
        self.handle_signals = handle_signals
        self.notice_stream = notice_stream
        self.parallel = parallel
        if parallel is not None:
            parallel.attach(model)
            self.opt_state = parallel.init_state(optimizer, model.params())
        else:
            self.opt_state = optimizer.init(model.params())
        self.plateau = optim.find_plateau(optimizer) if getattr(optimizer, "info", None) is not None else None
        self.history = History()
        self.step = 0
        self.stop = False
        self.stop_reason: str | None = None
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.extra: dict[str, Any] = {}  # added to every checkpoint (the run's config, classes, normalizer)
        device = next(iter(model.params().values())).device if model.params() else torch.device("cpu")
        self._loss_sum = torch.zeros((), device=device)
        self._correct = torch.zeros((), dtype=torch.int64, device=device)
        # On CUDA the plain fast step replays a recording (graphs.py); it falls back to train_step by itself.
        self.graph_steps = (GraphedSteps(model, loss, optimizer, self.precision, enabled=cuda_graph,
                                         notice=self._notice)
                            if device.type == "cuda" and parallel is None else None)
        self._seen = 0
        self._epoch_time = 0.0
        self._elapsed_base = 0.0
        self._t_start: float | None = None
        self._good: dict | None = None
        self._interrupt: int | None = None  # the signal that stops training (agreed by all ranks)
        self._signal: int | None = None  # the signal this process received
        self._finished = False

    # ------------------------------------------------------------------------------------------ info
    @property
    def elapsed(self) -> float:
        """Seconds spent training, over every session of a resumed run."""
        if self._t_start is None:
            return self._elapsed_base
        return self._elapsed_base + time.perf_counter() - self._t_start

    @property
    def has_validation(self) -> bool:
        return self.val_data is not None

    def current_lr(self) -> float:
        """The learning rate of the next update (schedule value times the rollback factor); nan if the
        optimizer does not say."""
        try:
            return optim.current_lr(self.optimizer, self.opt_state) * self.lr_scale
        except (ValueError, TypeError, AttributeError):
            return math.nan

    def emit(self, event: dict) -> None:
        """Record an event in the history and pass it to every callback's ``on_event``."""
        self.history.events.append(dict(event))
        for cb in self.callbacks:
            cb.on_event(self, event)

    def _notice(self, text: str) -> None:
        if self.notice_stream is not None:
            self.notice_stream.write(text + "\n")
            self.notice_stream.flush()

    # ------------------------------------------------------------------------------------------ state
    def _snapshot(self) -> dict:
        return {"state": Snapshot(self.model, self.opt_state, self.loader), "step": self.step,
                "loss_sum": self._loss_sum.clone(), "correct": self._correct.clone(), "seen": self._seen,
                "epoch_time": self._epoch_time, "history": len(self.history)}

    def _restore(self, snap: dict) -> None:
        self.opt_state = snap["state"].restore(self.model, self.opt_state, self.loader)
        self.step = snap["step"]
        self._loss_sum.copy_(snap["loss_sum"])
        self._correct.copy_(snap["correct"])
        self._seen = snap["seen"]
        self._epoch_time = snap["epoch_time"]
        keep = snap["history"]
        if len(self.history) > keep:
            events = self.history.events
            self.history = History.from_dict({k: v[:keep] for k, v in self.history.to_dict().items()
                                              if k != "events"})
            self.history.events = events

    def checkpoint_payload(self) -> dict:
        """Everything needed to continue exactly where training is now (tensors are the live ones;
        ``save_checkpoint`` copies them)."""
        payload = {
            "model": self.model.state_dict(), "model_config": self.model.get_config(),
            "optimizer": optim.state_dict(self._full_opt_state()), "optimizer_describe": _describe(self.optimizer),
            "loader": self.loader.state_dict(), "rng": random_states(self.model), "epoch": self.loader.epoch,
            "epochs_done": len(self.history), "step": self.step, "total_steps": self.total_steps,
            "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "history": self.history.to_dict(),
            "accum": {"loss_sum": self._loss_sum, "correct": self._correct, "seen": self._seen,
                      "epoch_time": self._epoch_time},
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_key},
            "elapsed": self.elapsed, "precision": self.precision.name,
        }
        payload.update(self.extra)
        return payload

    def load_checkpoint_state(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by ``checkpoint_payload`` (model, optimizer, data order,
        random generators, counters, history and callback states)."""
        self.model.load_state_dict(ckpt["model"])
        if self.parallel is not None and self.parallel.sharded is not None:
            full = optim.load_state_dict(self.optimizer.init(self.model.params()), ckpt["optimizer"])
            self.opt_state = self.parallel.shard_state(full)
        else:
            self.opt_state = optim.load_state_dict(self.opt_state, ckpt["optimizer"])
        self.loader.load_state_dict(ckpt["loader"])
        set_random_states(self.model, ckpt["rng"])
        self.step = int(ckpt["step"])
        self.lr_scale = float(ckpt.get("lr_scale", 1.0))
        self.rollbacks = int(ckpt.get("rollbacks", 0))
        self.history = History.from_dict(ckpt.get("history", {}))
        accum = ckpt.get("accum", {})
        if "loss_sum" in accum:
            self._loss_sum.copy_(accum["loss_sum"])
            self._correct.copy_(accum["correct"])
        self._seen = int(accum.get("seen", 0))
        self._epoch_time = float(accum.get("epoch_time", 0.0))
        self._elapsed_base = float(ckpt.get("elapsed", 0.0))
        states = ckpt.get("callbacks", {})
        for cb in self.callbacks:
            if cb.state_key and cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])

    def _full_opt_state(self):
        return self.opt_state if self.parallel is None else self.parallel.full_state(self.opt_state)

    # ------------------------------------------------------------------------------------------ checks
    def all_finite(self) -> bool:
        """``check_finite`` on every rank of a data-parallel run, agreed (a collective there)."""
        ok = self.check_finite()
        return ok if self.parallel is None else self.parallel.all_true(ok)

    def check_finite(self) -> bool:
        """One host sync: are the epoch's loss sum, every parameter and every float buffer finite?"""
        tensors = list(self.model.params().values())
        tensors += [b for b in self.model.buffers().values() if b.is_floating_point()]
        parts = [self._loss_sum.float().view(1)]
        if tensors:
            parts.append(torch.stack(optim.peak_magnitudes([t.float() for t in tensors])))
        return bool(torch.isfinite(torch.cat(parts)).all())

    def _verify(self) -> bool:
        """Check finiteness; on success remember this state as the last good one and return True. On
        failure stop (raise NonFiniteError) or roll back, and return False."""
        if self.all_finite():
            self._good = self._snapshot()
            return True
        self._handle_nonfinite()
        return False

    def _apply(self, step: int, grads: dict, hooks) -> None:
        params = self.model.params()
        seen = grads if self.parallel is None else self.parallel.visible_grads(grads)
        for cb in hooks:
            cb.on_gradients(self, step, seen, params)
        if self.parallel is not None:
            self._apply_parallel(step, grads, hooks, params)
            return
        if self.lr_scale == 1.0 and not any(uses(cb, "on_update") for cb in hooks):
            # Nobody reads the updates: one fused pass where the optimizer has one, as in train_step.
            with flush_subnormals:  # as in train_step: the moments decay into subnormals otherwise
                self.opt_state = optim.update_and_apply(self.optimizer, params, grads, self.opt_state)
            return
        with flush_subnormals:
            updates, self.opt_state = self.optimizer.update(grads, self.opt_state, params)
        if self.lr_scale != 1.0:
            updates = as_lazy(updates, owned=False).scaled(self.lr_scale)
        for cb in hooks:
            cb.on_update(self, step, updates, params)
        optim.apply_updates(params, updates)

    def _apply_parallel(self, step: int, grads: dict, hooks, params: dict) -> None:
        """The update of a data-parallel step: the same arithmetic on every rank, whichever callbacks a rank
        has (rank 0 may have more): readers of the update see the change of the weights it made."""
        readers = [cb for cb in hooks if uses(cb, "on_update")]
        before = {k: p.detach().clone() for k, p in params.items()} if readers else None
        with flush_subnormals:
            state = self.parallel.update(self.optimizer, params, grads, self.opt_state, step)
            if state is not None:
                self.opt_state = state
            elif self.lr_scale == 1.0:
                self.opt_state = optim.update_and_apply(self.optimizer, params, grads, self.opt_state)
            else:
                updates, self.opt_state = self.optimizer.update(grads, self.opt_state, params)
                optim.apply_updates(params, as_lazy(updates, owned=False).scaled(self.lr_scale))
        if readers:
            updates = {k: before[k] - params[k] for k in params}
            for cb in readers:
                cb.on_update(self, step, updates, before)

    def _parallel_step(self, step: int, xb, yb, checked: bool = False, wants_grads: bool = False):
        """Forward and backward on this rank's part of the batch, gradients reduced over the ranks.

        Returns:
            (global mean loss, global correct count, global batch size, global gradients, problem) where
            problem (with ``checked``) is the first non-finite value of any rank, the same on every rank.
        """
        par = self.parallel
        n_global = self.loader.last_batch_size
        par.begin(n_global, self._signal, wants_grads)
        loss_fn = par.step_loss(self.loss_fn)  # hands the step's loss and counts to the first bucket
        problem = None
        # each rank's loss over the global denominator: its gradient is its share of the global one
        if checked:
            _, _, grads, problem = checked_gradients(self.model, loss_fn, xb, yb, self.precision,
                                                     denominator=n_global)
        else:
            _, _, grads = compute_gradients(self.model, loss_fn, xb, yb, self.precision, denominator=n_global)
        grads, loss_sum, correct, agreed = par.finish(grads, step)
        if agreed is not None:
            self._interrupt = int(agreed)
        if checked:
            found = par.gather_objects(problem, f"the replay of step {step}")
            problem = next(({**p, "rank": r} for r, p in enumerate(found) if p is not None), None)
        return loss_sum / n_global, correct, n_global, grads, problem

    def _locate(self, snap: dict, detected: int) -> dict | None:
        """Replay from ``snap`` step by step with every tensor checked; leave the state just before the
        first bad step and describe it (None if the replay reached ``detected`` without a problem)."""
        self._restore(snap)
        loader = self.loader
        if loader.position >= len(loader):
            loader.set_epoch(loader.epoch + 1)
        while self.step < detected:
            pre = self._snapshot()
            epoch_no, batch_no = loader.epoch + 1, loader.position + 1
            if loader.is_full_batch:
                grads, loss, correct, problem = accumulate_gradients(self.model, self.loss_fn, loader,
                                                                     loader.num_samples, self.precision,
                                                                     checked=True)
                n = loader.num_samples
            elif self.parallel is not None:
                xb, yb = next(iter(loader))
                loss, correct, n, grads, problem = self._parallel_step(self.step + 1, xb, yb, checked=True)
            else:
                xb, yb = next(iter(loader))
                loss, correct, grads, problem = checked_gradients(self.model, self.loss_fn, xb, yb, self.precision)
                n = yb.shape[0]
            if problem is None:
                self._apply(self.step + 1, grads, ())
                bad = _first_nonfinite(self.model.params())
                if bad is not None:
                    problem = {"where": "update", "layer": layer_of(bad), "tensor": f"parameter {bad}"}
            if problem is not None:
                loss_value = float(loss)
                self._restore(pre)
                return {**problem, "step": self.step + 1, "epoch": epoch_no, "batch": batch_no, "loss": loss_value}
            self.step += 1
            self._loss_sum.add_(loss, alpha=n)
            self._correct.add_(correct)
            self._seen += n
        return None

    def _describe_problem(self, diag: dict | None, detected: int) -> str:
        lr = self.current_lr()
        if diag is None:
            head = (f"non-finite values appeared between step {self._good['step'] + 1} and step {detected}, "
                    f"but replaying those steps did not reproduce them (non-deterministic kernels?)")
        else:
            where = {
                "forward": f"the forward pass first produced a non-finite value in the {diag['tensor']}",
                "loss": "the loss was non-finite although every layer's output was finite",
                "backward": f"the backward pass produced a non-finite {diag['tensor']} (layer {diag['layer']})",
                "update": f"the update made {diag['tensor']} non-finite (layer {diag['layer']}; its gradient "
                          f"was finite)",
            }[diag["where"]]
            on_rank = f" on rank {diag['rank']}" if diag.get("rank") is not None else ""
            head = (f"non-finite loss or gradient at step {diag['step']}{on_rank} (epoch {diag['epoch']}, batch "
                    f"{diag['batch']}; loss {diag['loss']:.4g}): {where}")
        params = self.model.params()
        peaks = torch.stack(optim.peak_magnitudes([p.float() for p in params.values()])).tolist()
        name, peak = max(zip(params, peaks), key=lambda kv: kv[1] if math.isfinite(kv[1]) else -1.0)
        return (f"{head}. Before that step the largest parameter magnitude was {peak:.3g} ({name}); the "
                f"learning rate is {lr:.3g}. Lower the learning rate, clip gradients (--clip-norm 1.0), or "
                f"pass --on-nan rollback")

    def _handle_nonfinite(self) -> None:
        detected = self.step
        snap = self._good
        diag = self._locate(snap, detected)
        message = self._describe_problem(diag, detected)
        info = {k: diag.get(k) for k in ("step", "layer", "tensor", "where")} if diag else \
            {"step": None, "layer": None, "tensor": None, "where": None}
        if diag and diag.get("rank") is not None:
            info["rank"] = diag["rank"]
        if self.on_nan == "rollback" and self.rollbacks < self.max_rollbacks:
            self._restore(snap)
            self.rollbacks += 1
            self.lr_scale *= 0.5
            short = (f"{diag['where']}: {diag['tensor']}" if diag else "not reproduced on replay")
            self.emit({"event": "rollback", "step": info["step"] if info["step"] is not None else detected,
                       "detected_at": detected, "to_step": snap["step"], "layer": info["layer"],
                       "tensor": info["tensor"], "where": info["where"], "detail": short,
                       "lr": self.current_lr(), "lr_scale": self.lr_scale, "count": self.rollbacks,
                       "max": self.max_rollbacks})
            return
        if self.on_nan == "rollback":
            message += f" (gave up after {self.rollbacks} rollbacks)"
        self.stop_reason = "nonfinite"
        self.emit({"event": "nonfinite", "message": message, **info})
        raise NonFiniteError(message, history=self.history, **info)

    # ------------------------------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None or self._interrupt is not None:
            raise KeyboardInterrupt
        self._signal = signum
        if self.parallel is None:  # a data-parallel run stops when every rank has heard of it (next step)
            self._interrupt = signum
        what = "and saving a checkpoint" if self.saves_checkpoints else "(no checkpoint is configured)"
        self._notice(f"\n{signal.Signals(signum).name} received: finishing the current step {what} (send it "
                     f"again to stop at once)")

    @property
    def saves_checkpoints(self) -> bool:
        """Whether a callback writes a checkpoint when training is interrupted."""
        return any(isinstance(cb, Checkpointer) for cb in self.callbacks)

    def _install_signals(self) -> dict:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return old

    def _interrupted(self) -> None:
        self._verify()
        name = signal.Signals(self._interrupt).name
        self.stop_reason = "interrupted"
        self.emit({"event": "interrupted", "signal": name, "step": self.step, "epoch": self.loader.epoch + 1})
        raise TrainingInterrupted(name, int(self._interrupt), self.step, self.loader.epoch + 1, self.history)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> History:
        """Train until the planned steps are done or a callback stops it; returns the History.

        Raises:
            NonFiniteError: a non-finite value stopped training (after rollbacks, if enabled).
            TrainingInterrupted: SIGINT/SIGTERM stopped training after a step.
        """
        if self._finished:
            raise RuntimeError("this Trainer has already run; build a new one (or resume from a checkpoint)")
        self._grad_cbs = [cb for cb in self.callbacks if uses(cb, "wants_grads")]
        self._step_cbs = [cb for cb in self.callbacks if uses(cb, "on_step_end")]
        old = self._install_signals()
        self._t_start = time.perf_counter()
        try:
            for cb in self.callbacks:
                cb.on_train_begin(self)
            self._good = self._snapshot()
            while self.step < self.total_steps and not self.stop:
                self._run_epoch()
            if self.stop_reason is None:
                self.stop_reason = "completed"
        except BaseException:
            if self.stop_reason is None:
                self.stop_reason = "error"
            self._end()
            raise
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        self._end()
        return self.history

    def _end(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._elapsed_base = self.elapsed
        self._t_start = None
        for cb in self.callbacks:
            cb.on_train_end(self)

    def _run_epoch(self) -> None:
        loader = self.loader
        if loader.position >= len(loader):
            loader.set_epoch(loader.epoch + 1)
        if loader.position == 0:
            self._loss_sum.zero_()
            self._correct.zero_()
            self._seen = 0
            self._epoch_time = 0.0
        epoch_no = loader.epoch + 1
        if self._interrupt is not None:
            self._interrupted()
        for cb in self.callbacks:
            cb.on_epoch_begin(self, epoch_no)
        t0 = time.perf_counter()
        if loader.is_full_batch:
            ok = self._full_batch_step(epoch_no)
        else:
            ok = self._minibatch_steps(epoch_no)
        self._epoch_time += time.perf_counter() - t0
        if not ok:
            return  # rolled back: the loop goes on from the restored state
        if self._interrupt is not None:
            self._interrupted()
        self._end_epoch(epoch_no)

    def _step_logs(self, loss, correct, n, epoch_no, batch, batches) -> dict:
        return {"loss": loss, "correct": correct, "batch_size": n, "epoch": epoch_no, "batch": batch,
                "batches": batches, "epoch_loss_sum": self._loss_sum, "epoch_correct": self._correct,
                "epoch_seen": self._seen}

    def _minibatch_steps(self, epoch_no: int) -> bool:
        loader, model, loss_fn = self.loader, self.model, self.loss_fn
        batches = len(loader)
        grad_cbs, step_cbs = self._grad_cbs, self._step_cbs
        fast = not self.precision.mixed and self.lr_scale == 1.0
        check_every = self.nan_check_every
        for xb, yb in loader:
            step = self.step + 1
            hooks = [cb for cb in grad_cbs if cb.wants_grads(step)] if grad_cbs else ()
            n = yb.shape[0]
            if self.parallel is not None:
                loss, correct, n, grads, _ = self._parallel_step(step, xb, yb, wants_grads=bool(hooks))
                self._apply(step, grads, hooks)
            elif self.graph_steps is not None and not hooks and self.lr_scale == 1.0:
                # fp32 and bf16 alike: the recorded step holds the bf16 shadows' refresh too
                loss, correct, self.opt_state = self.graph_steps.step(xb, yb, self.opt_state)
            elif fast and not hooks:
                loss, correct, self.opt_state = train_step(model, loss_fn, self.optimizer, self.opt_state, xb, yb)
            else:
                loss, correct, grads = compute_gradients(model, loss_fn, xb, yb, self.precision)
                self._apply(step, grads, hooks)
            self.step = step
            self._loss_sum.add_(loss, alpha=n)
            self._correct.add_(correct)
            self._seen += n
            if step_cbs:
                logs = self._step_logs(loss, correct, n, epoch_no, loader.position, batches)
                for cb in step_cbs:
                    cb.on_step_end(self, step, logs)
            if step % check_every == 0 and not self._verify():
                return False
            if self._interrupt is not None or self.stop or step >= self.total_steps:
                break
        return True

    def _full_batch_step(self, epoch_no: int) -> bool:
        step = self.step + 1
        hooks = [cb for cb in self._grad_cbs if cb.wants_grads(step)]
        n = self.loader.num_samples
        grads, loss, correct = accumulate_gradients(self.model, self.loss_fn, self.loader, n, self.precision)
        self._apply(step, grads, hooks)
        self.step = step
        self._loss_sum.add_(loss, alpha=n)
        self._correct.add_(correct)
        self._seen += n
        if self._step_cbs:
            logs = self._step_logs(loss, correct, n, epoch_no, 1, 1)
            for cb in self._step_cbs:
                cb.on_step_end(self, step, logs)
        return True

    def _end_epoch(self, epoch_no: int) -> None:
        loader = self.loader
        if loader.position >= len(loader):
            loader.set_epoch(loader.epoch + 1)
        if not self._verify():
            return
        t0 = time.perf_counter()
        seen = max(self._seen, 1)
        sums = torch.stack([self._loss_sum.double(), self._correct.double()]).tolist()
        loss, acc = sums[0] / seen, sums[1] / seen
        if self.val_data is not None and self.parallel is not None:
            val_loss, val_acc = self.parallel.evaluate(
                lambda x, y: evaluate(self.model, self.loss_fn, x, y, self.eval_batch_size, self.normalizer),
                self.val_data[0], self.val_data[1])
        elif self.val_data is not None:
            val_loss, val_acc = evaluate(self.model, self.loss_fn, self.val_data[0], self.val_data[1],
                                         self.eval_batch_size, self.normalizer)
        else:
            val_loss = val_acc = math.nan
        lr = self.current_lr()
        self._epoch_time += time.perf_counter() - t0
        record = {"epoch": epoch_no, "step": self.step, "loss": loss, "acc": acc, "val_loss": val_loss,
                  "val_acc": val_acc, "lr": lr, "time": self._epoch_time}
        if self.plateau is not None:
            key = "val" if self.val_data is not None else ""
            mode = getattr(self.plateau, "mode", "min")
            metric = record[f"{key}_acc" if key else "acc"] if mode == "max" else record[f"{key}_loss" if key else "loss"]
            self.plateau.step(metric)
        self.history.append(record)
        self._good = self._snapshot()
        logs = dict(record, partial=loader.position != 0, epochs=self.epochs)
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch_no, logs)


def _describe(optimizer) -> str:
    try:
        return optim.describe(optimizer)
    except (AttributeError, TypeError, ValueError):
        return repr(optimizer)


def _unpack(data) -> tuple:
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data.x_train, data.y_train, getattr(data, "x_val", None), getattr(data, "y_val", None)
    if isinstance(data, (tuple, list)) and len(data) in (2, 4):
        return (tuple(data) + (None, None))[:4]
    raise ValueError("data must be a Dataset (from load_dataset) or a tuple (x_train, y_train) / "
                     f"(x_train, y_train, x_val, y_val) of uint8 images (N, C, H, W) and labels (N,), got "
                     f"{type(data).__name__}")


def display_callbacks(verbose, stream=None) -> list[Callback]:
    """The display callbacks for a verbosity: 0/"quiet" nothing, 1/"lines" epoch lines, 2/"bar" progress
    bar and epoch lines, "json" JSON lines, "auto" the bar only on a terminal."""
    out = stream if stream is not None else sys.stdout
    if verbose in (0, False, "quiet", None):
        return []
    if verbose == "json":
        return [EpochLogger(stream, json_lines=True)]
    if verbose in (1, "lines"):
        return [EpochLogger(stream)]
    if verbose in (2, "bar") or (verbose == "auto" and hasattr(out, "isatty") and out.isatty()):
        return [ProgressBar(stream), EpochLogger(stream)]
    if verbose == "auto":
        return [EpochLogger(stream)]
    raise ValueError(f"verbose must be 0, 1, 2, 'auto', 'quiet', 'lines', 'bar' or 'json', got {verbose!r}")


def fit(model, loss, optimizer, data, epochs: int | None = None, steps: int | None = None, batch_size=32,
        callbacks: Iterable[Callback] = (), seed: int = 0, device="cpu", normalizer=None, augment=None,
        on_nan: str = "stop", max_rollbacks: int = 3, precision: str = "fp32", verbose="auto",
        nan_check_every: int = 50, shuffle: bool = True, drop_last: bool = False, eval_batch_size: int = 1000,
        chunk_size: int | None = None, handle_signals: bool = True, stream=None, cuda_graph: bool = True) -> History:
    """Train ``model`` with the same loop as ``convdescent train``, for notebooks and scripts.

    Args:
        model: a built ``Sequential`` (moved to ``device`` if it is elsewhere).
        loss: a loss object or name ("cross_entropy", "mse").
        optimizer: a ``GradientTransformation`` (e.g. ``make_optimizer("adam", lr=1e-3)``) or a name.
        data: a ``Dataset`` or ``(x_train, y_train[, x_val, y_val])`` with uint8 images (N, C, H, W) and
            int labels (N,); the validation part may be empty or None.
        epochs: passes over the training data (default 1), or ``steps``: total updates.
        batch_size: images per step, or "full" for full-batch gradient descent.
        callbacks: extra ``Callback`` objects.
        seed: seed of the batch order and augmentation.
        device: where the batches and the model live.
        normalizer: a ``Normalizer`` (default: x / 255).
        augment: an augmentation spec ("crop:4,flip") or ``Augment``.
        on_nan, max_rollbacks, nan_check_every: what to do about non-finite values (see ``Trainer``).
        precision: "fp32" or "bf16".
        verbose: "auto" (progress bar on a terminal, else epoch lines), 0, 1, 2, "json".
        shuffle, drop_last, chunk_size: batching (chunk_size: images per chunk in full-batch mode).
        eval_batch_size: images per validation batch.
        handle_signals: stop cleanly after the current step on Ctrl-C/SIGTERM.
        stream: where display lines go (default sys.stdout).
        cuda_graph: on CUDA, replay the step as one CUDA graph where it can (see ``Trainer``).

    Returns:
        The ``History``; after Ctrl-C or SIGTERM (with ``handle_signals``), the history up to the step that
        was finishing when the signal came, with a message on stderr.
    """
    from ..data import BatchLoader, Normalizer
    from ..losses import make_loss

    if isinstance(loss, str):
        loss = make_loss(loss)
    if isinstance(optimizer, str):
        optimizer = optim.make_optimizer(optimizer)
    x_train, y_train, x_val, y_val = _unpack(data)
    dev = torch.device(device)
    if model.device != dev:
        model.to(device=dev)
    loader = BatchLoader(x_train, y_train, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         normalizer=normalizer if normalizer is not None else Normalizer.unit(),
                         augment=augment or None, device=dev, dtype=model.dtype, chunk_size=chunk_size)
    val = None
    if x_val is not None and y_val is not None and len(x_val):
        val = (x_val.to(dev), y_val.to(device=dev, dtype=torch.int64))
    cbs = list(callbacks) + display_callbacks(verbose, stream)
    trainer = Trainer(model, loss, optimizer, loader, val, epochs=epochs, steps=steps, callbacks=cbs,
                      precision=precision, on_nan=on_nan, max_rollbacks=max_rollbacks,
                      nan_check_every=nan_check_every, eval_batch_size=eval_batch_size,
                      handle_signals=handle_signals, notice_stream=None if verbose in (0, "quiet") else sys.stderr,
                      cuda_graph=cuda_graph)
    try:
        return trainer.run()
    except TrainingInterrupted as e:
        # as an interactive loop should: Ctrl-C ends training, not the notebook cell's results
        epochs = len(trainer.history)
        saved = ("; a checkpoint was written" if trainer.saves_checkpoints
                 else "; no checkpoint was written (none is configured: pass a Checkpointer callback for one)")
        print(f"Training interrupted by {e.signal_name} after step {e.step} (epoch {e.epoch}): returning the "
              f"history so far ({epochs} finished epoch{'s' if epochs != 1 else ''}){saved}", file=sys.stderr)
        return trainer.history
