"""Callbacks: small objects the training loop calls at its step and epoch boundaries.

Hooks, in the order the loop calls them:

- ``on_train_begin(trainer)``
- ``on_epoch_begin(trainer, epoch)``                    epoch is 1-based
- per step, only when ``wants_grads(step)`` is true for this callback:
  ``on_gradients(trainer, step, grads, params)`` after backward and before the optimizer, then
  ``on_update(trainer, step, updates, params)`` after the optimizer and before the parameters change.
  The optimizer may overwrite ``grads`` in place, so read gradient statistics in ``on_gradients``; do not
  modify ``grads`` or ``params`` there. Reading ``updates`` evaluates the optimizer's deferred update.
- ``on_step_end(trainer, step, logs)``                 step counts updates from 1; logs hold 0-d tensors
- ``on_epoch_end(trainer, epoch, logs)``               logs hold floats; may set ``trainer.stop = True``
- ``on_event(trainer, event)``                          rollback, interruption, non-finite stop, early stop
- ``on_train_end(trainer)``

Steps on which no callback asks for gradients take the fast path (no extra work at all), and a callback
that does not override ``on_step_end`` is never called per step. Nothing here reads a tensor back to the
host on every step: the progress bar reads the running loss at most ten times a second and the metrics
writer every ``every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from ..optim import optimizer_stats
from .checkpoint import atomic_copy_of, atomic_write_bytes, atomic_write_text, encode_checkpoint
from .output import OutputWriteError, write_failure

class Callback:
    """Base class: override the hooks you need (see the module docstring for when each runs).

    A callback that must survive ``--resume`` sets ``state_key`` and implements ``state_dict`` /
    ``load_state_dict`` (tensors and plain values only); the trainer stores that state in checkpoints.
    """

    state_key: str | None = None

    def on_train_begin(self, trainer) -> None:
        pass

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        pass

    def wants_grads(self, step: int) -> bool:
        """Whether ``on_gradients``/``on_update`` should run for update number ``step`` (1-based)."""
        return False

    def on_gradients(self, trainer, step: int, grads: dict, params: dict) -> None:
        pass

    def on_update(self, trainer, step: int, updates: dict, params: dict) -> None:
        pass

    def on_step_end(self, trainer, step: int, logs: dict) -> None:
        pass

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        pass

    def on_event(self, trainer, event: dict) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def overrides(cb: Callback, hook: str) -> bool:
    """True when ``cb``'s class defines its own ``hook`` (so the loop needs to call it)."""
    return getattr(type(cb), hook, None) is not getattr(Callback, hook)


class LambdaCallback(Callback):
    """A callback from plain functions, e.g. ``LambdaCallback(on_epoch_end=lambda t, e, logs: print(e))``."""

    _HOOKS = ("on_train_begin", "on_epoch_begin", "wants_grads", "on_gradients", "on_update", "on_step_end",
              "on_epoch_end", "on_event", "on_train_end")

    def __init__(self, **hooks):
        for name, fn in hooks.items():
            if name not in self._HOOKS:
                raise ValueError(f"unknown callback hook {name!r}; hooks are {', '.join(self._HOOKS)}")
            if not callable(fn):
                raise ValueError(f"{name} must be callable, got {fn!r}")
            setattr(self, name, fn)


def uses(cb: Callback, hook: str) -> bool:
    """Whether the loop has to call ``hook`` on ``cb`` (its class or the instance defines it)."""
    return hook in vars(cb) or overrides(cb, hook)


# ----------------------------------------------------------------------------------------------- display

def format_epoch_line(logs: dict, epochs: int) -> str:
    """``Epoch 3/10 - loss 0.2871 - acc 0.894 - val_loss 0.301 - val_acc 0.889 - lr 1.0e-03 - 3.2s``."""
    parts = [f"Epoch {logs['epoch']}/{epochs}"]
    for key, fmt in (("loss", ".4f"), ("acc", ".3f"), ("val_loss", ".3f"), ("val_acc", ".3f"), ("lr", ".1e")):
        v = logs.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v) and key.startswith("val")):
            parts.append(f"{key} {v:{fmt}}")
    parts.append(f"{logs.get('time', 0.0):.1f}s")
    return " - ".join(parts)


def format_event(event: dict) -> str:
    """One readable line for a trainer event."""
    kind = event.get("event")
    if kind == "rollback":
        return (f"non-finite values at step {event['step']} ({event['detail']}); rolled back to step "
                f"{event['to_step']} and halved the learning rate to {event['lr']:.3g} "
                f"(rollback {event['count']} of at most {event['max']})")
    if kind == "early_stopping":
        return (f"early stopping: {event['monitor']} has not improved for {event['patience']} epochs "
                f"(best {event['best']:.4f} at epoch {event['best_epoch']})")
    if kind == "interrupted":
        return f"{event['signal']} received: finished step {event['step']} and stopped"
    if kind == "nonfinite":
        return event.get("message", "non-finite values")
    if kind == "restored_best":
        return f"restored the weights of epoch {event['epoch']} ({event['monitor']} {event['value']:.4f})"
    return json.dumps(event)


class EpochLogger(Callback):
    """Prints one line per epoch (and a line per event), or JSON objects with ``json_lines``.

    Args:
        stream: where to write (default sys.stdout).
        json_lines: write each epoch record and event as a JSON object on its own line.
    """

    def __init__(self, stream: TextIO | None = None, json_lines: bool = False):
        self.stream = stream
        self.json_lines = json_lines

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def on_epoch_end(self, trainer, epoch, logs):
        out = self._out()
        if self.json_lines:
            rec = {"type": "epoch", **{k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool))}}
            out.write(json.dumps(_finite_json(rec)) + "\n")
        else:
            out.write(format_epoch_line(logs, trainer.epochs) + "\n")
        out.flush()

    def on_event(self, trainer, event):
        out = self._out()
        if self.json_lines:
            out.write(json.dumps(_finite_json({"type": "event", **event})) + "\n")
        elif event.get("event") not in ("nonfinite", "interrupted"):
            # those two end training with an exception whose message says the same
            out.write(format_event(event) + "\n")
        out.flush()


class ProgressBar(Callback):
    """A progress bar per epoch on a terminal (tqdm): steps done of the epoch, elapsed time, ETA, steps per
    second, running loss and accuracy; it fits the terminal's width and is redrawn in place.

    The running loss and accuracy are read (one host sync) only when the figures are refreshed, at most
    ``1 / interval`` times per second. The bar of a run that ends inside an epoch (``steps``) counts to
    where the run ends. The bar is removed when the epoch ends, and ``EpochLogger``'s line takes its place.

    Args:
        stream: a terminal (default sys.stdout).
        interval: seconds between refreshes of the figures.
        ncols: width in characters (default: the terminal's, followed when it is resized).
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 0.1, ncols: int | None = None):
        self.stream = stream
        self.interval = interval
        self.ncols = ncols
        self._bar = None
        self._last = 0.0

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def on_epoch_begin(self, trainer, epoch):
        from tqdm import tqdm

        self._close()
        loader = trainer.loader
        start = 0 if loader.is_full_batch else loader.position
        batches = 1 if loader.is_full_batch else len(loader)
        total = min(batches, start + max(trainer.total_steps - trainer.step, 0))
        width = self.ncols or _terminal_columns(self._out())
        # under 90 columns the figures are shortened so that loss and accuracy still fit beside a bar
        self._compact = width < 90
        kw = dict(desc=f"{epoch}/{trainer.epochs}", unit="", bar_format="{desc} {bar} {n_fmt}/{total_fmt} "
                  "{elapsed}<{remaining} {rate_fmt}{postfix}") if self._compact else \
            dict(desc=f"Epoch {epoch}/{trainer.epochs}", unit="step")
        self._bar = tqdm(total=total, initial=start, file=self._out(), leave=False, dynamic_ncols=self.ncols is None,
                         ncols=self.ncols, mininterval=self.interval, smoothing=0.1, **kw)
        self._last = 0.0

    def on_step_end(self, trainer, step, logs):
        bar = self._bar
        if bar is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval and logs["batch"] < bar.total:
            return  # tqdm would not redraw yet either: the steps are counted in at the next refresh
        self._last = now
        seen = logs["epoch_seen"]
        if seen:
            loss = float(logs["epoch_loss_sum"]) / seen
            acc = float(logs["epoch_correct"]) / seen
            figures = f"loss {loss:.3f} acc {acc:.3f}" if self._compact else f"loss {loss:.4f} acc {acc:.3f}"
            bar.set_postfix_str(figures, refresh=False)
        bar.update(logs["batch"] - bar.n)
        if logs["batch"] >= bar.total:
            # the epoch's final state is always drawn once, with its figures, however fast the epoch was
            bar.refresh()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_epoch_end(self, trainer, epoch, logs):
        self._close()

    def on_event(self, trainer, event):
        if self._bar is not None:
            self._bar.clear()  # the event's line is printed on a clean line; the next step redraws the bar

    def on_train_end(self, trainer):
        self._close()


def _terminal_columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


def _finite_json(value: Any) -> Any:
    """JSON has no nan/inf: write them as null (floats) so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- metrics

def layer_of(param_name: str) -> str:
    """``conv1.weight`` -> ``conv1`` (nested names keep their container prefix)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


class MetricsWriter(Callback):
    """Appends records to ``metrics.jsonl``: one per epoch and one every ``every`` steps.

    Step records hold the mean loss and accuracy of the steps since the previous step record (within the
    epoch), the learning rate, the gradient norm before the optimizer (global and per layer) and the time;
    with an optimizer built with ``record_norms`` also its update norm and whether clipping fired.
    Epoch records hold the epoch's ``logs``. Each line is flushed as written, so a crash loses nothing
    already recorded.

    Args:
        path: the .jsonl file (appended to).
        every: steps between step records (0: epoch records only).
    """

    def __init__(self, path: str | Path, every: int = 50):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be a non-negative int, got {every!r}")
        self.path = Path(path)
        self.every = every
        self._f = None
        self._norms = None
        self._names: list[str] = []
        self._mark = (0, 0.0, 0.0, 0)  # (epoch, loss_sum, correct, seen) at the previous step record

    def on_train_begin(self, trainer):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._t0 = time.perf_counter() - trainer.elapsed

    def wants_grads(self, step):
        return self.every > 0 and step % self.every == 0

    def on_gradients(self, trainer, step, grads, params):
        self._names = list(grads)
        self._norms = torch.stack(torch._foreach_norm(list(grads.values()))).float()

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(_finite_json(record)) + "\n")
            self._f.flush()
        except OSError as e:
            f, self._f = self._f, None
            with contextlib.suppress(OSError):
                f.close()  # what is still buffered cannot be written either
            run_dir = self.path.parent
            raise write_failure(self.path, e, run_dir, None, run_dir / "checkpoints" / "last.pt", None) from None

    def on_step_end(self, trainer, step, logs):
        if not (self.every > 0 and step % self.every == 0):
            return
        parts = [logs["epoch_loss_sum"].double().view(1), logs["epoch_correct"].double().view(1)]
        stats = optimizer_stats(trainer.opt_state)
        if stats is not None:  # the optimizer records its own norms (--record-norms)
            parts += [stats[k].double().view(1) for k in ("update_norm", "clipped", "clipped_steps")]
        if self._norms is not None:
            parts.append(self._norms.double())
        values = torch.cat([p.to("cpu") for p in parts]).tolist()
        if stats is not None:
            opt_values, values = values[2:5], values[:2] + values[5:]
        loss_sum, correct = values[0], values[1]
        seen = logs["epoch_seen"]
        m_epoch, m_loss, m_correct, m_seen = self._mark
        if m_epoch != logs["epoch"] or m_seen > seen:
            m_loss, m_correct, m_seen = 0.0, 0.0, 0
        n = seen - m_seen
        record = {"type": "step", "step": step, "epoch": logs["epoch"], "batch": logs["batch"],
                  "loss": (loss_sum - m_loss) / n if n else math.nan,
                  "acc": (correct - m_correct) / n if n else math.nan,
                  "lr": trainer.current_lr(), "time": time.perf_counter() - self._t0}
        if stats is not None:
            record["update_norm"] = opt_values[0]
            record["clipped"] = bool(opt_values[1])
            record["clipped_steps"] = int(opt_values[2])
        if self._norms is not None:
            norms = values[2:]
            record["grad_norm"] = math.sqrt(sum(v * v for v in norms))
            per_layer: dict[str, float] = {}
            for name, v in zip(self._names, norms):
                key = layer_of(name)
                per_layer[key] = per_layer.get(key, 0.0) + v * v
            record["layer_grad_norms"] = {k: math.sqrt(v) for k, v in per_layer.items()}
            self._norms = None
        self._mark = (logs["epoch"], loss_sum, correct, seen)
        self.write(record)

    def on_epoch_end(self, trainer, epoch, logs):
        rec = {"type": "epoch", **{k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool))}}
        rec["elapsed"] = time.perf_counter() - self._t0
        self.write(rec)
        if self._f is not None:
            try:  # at least once an epoch the records are on the disk itself, not only handed to the system
                os.fsync(self._f.fileno())
            except OSError as e:
                raise write_failure(self.path, e, self.path.parent, None,
                                    self.path.parent / "checkpoints" / "last.pt", None) from None

    def on_event(self, trainer, event):
        self.write({"type": "event", **event})

    def on_train_end(self, trainer):
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError as e:
                raise write_failure(self.path, e, self.path.parent, None,
                                    self.path.parent / "checkpoints" / "last.pt", None) from None


def truncate_metrics(path: str | Path, step: int, epochs_done: int) -> None:
    """Drop records written after a checkpoint (step > ``step`` or epoch > ``epochs_done``), so a resumed
    run does not repeat them; the file is rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(rec, dict):
            continue
        kind = rec.get("type")
        if kind == "epoch" and int(rec.get("epoch", 0)) > epochs_done and int(rec.get("step", 0)) > step:
            continue
        if kind != "epoch" and int(rec.get("step", 0) or 0) > step:
            continue  # step, event, and the health monitor's health / health_warning records
        keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------------------------- model selection

def resolve_monitor(monitor: str, has_val: bool) -> tuple[str, str]:
    """(key, mode) for a monitor name; ``auto`` is val_acc with validation data, else the training loss."""
    if monitor == "auto":
        monitor = "val_acc" if has_val else "loss"
    if monitor not in ("val_acc", "val_loss", "acc", "loss"):
        raise ValueError(f"monitor must be auto, val_acc, val_loss, acc or loss, got {monitor!r}")
    if monitor.startswith("val") and not has_val:
        raise ValueError(f"monitor {monitor!r} needs a validation split; set val_split > 0 or monitor 'loss'")
    return monitor, ("max" if monitor.endswith("acc") else "min")


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class EarlyStopping(Callback):
    """Stop when the monitored value has not improved by ``min_delta`` for ``patience`` epochs.

    Args:
        monitor: "val_acc", "val_loss", "acc" or "loss".
        patience: epochs without improvement before stopping (>= 1).
        min_delta: the smallest change that counts as an improvement.
        restore_best: at the end of training, put back the weights of the best epoch.
    """

    state_key = "early_stopping"

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 restore_best: bool = True):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.mode = resolve_monitor(monitor, has_val=True) if monitor.startswith("val") \
            else resolve_monitor(monitor, has_val=False)
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.best: float | None = None
        self.best_epoch = 0
        self.wait = 0
        self.best_weights: dict | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = float(logs.get(self.monitor, math.nan))
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.stop = True
            trainer.stop_reason = "early_stopping"
            trainer.emit({"event": "early_stopping", "step": trainer.step, "epoch": epoch, "monitor": self.monitor,
                          "patience": self.patience, "best": self.best, "best_epoch": self.best_epoch})

    def on_train_end(self, trainer):
        if not self.restore_best or self.best_weights is None:
            return
        if trainer.stop_reason not in ("early_stopping", "completed"):
            return
        if trainer.history.epoch and trainer.history.epoch[-1] == self.best_epoch:
            return
        trainer.model.load_state_dict(self.best_weights)
        trainer.emit({"event": "restored_best", "step": trainer.step, "epoch": self.best_epoch,
                      "monitor": self.monitor, "value": self.best})

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "best_weights": self.best_weights}

    def load_state_dict(self, state):
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", 0))
        self.wait = int(state.get("wait", 0))
        self.best_weights = state.get("best_weights")


class Checkpointer(Callback):
    """Writes ``last.pt`` at every epoch end (and every ``every_steps`` steps, and on interruption) and
    ``best.pt`` when the monitored value improves. Each file is written atomically.

    Args:
        folder: the checkpoints folder.
        monitor: "val_acc", "val_loss", "acc" or "loss".
        every_steps: also write last.pt every this many steps (0: only at epoch ends).
        write: False on the ranks of a data-parallel run other than 0: they write nothing, but keep the
            checkpoint points (where a sharded optimizer gathers its state, on every rank at once).
    """

    state_key = "checkpointer"

    def __init__(self, folder: str | Path, monitor: str = "val_acc", every_steps: int = 0, write: bool = True):
        self.write = bool(write)
        self.folder = Path(folder)
        self.monitor, self.mode = resolve_monitor(monitor, has_val=monitor.startswith("val"))
        self.every_steps = every_steps
        self.best: float | None = None
        self.best_epoch = 0
        self.saved_step: int | None = None
        self.checkpoint_bytes: int | None = None
        self._best_written = False

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    def _save(self, trainer, best: bool) -> None:
        if not self.write:
            parallel = getattr(trainer, "parallel", None)
            if parallel is not None and parallel.sharded is not None:
                trainer.checkpoint_payload()  # the collective gather of the optimizer state, as rank 0 does
            return
        blob = encode_checkpoint(trainer.checkpoint_payload())
        self.checkpoint_bytes = len(blob)
        # best.pt first: if last.pt then fails, best.pt is a complete checkpoint of this very state
        self._best_written = False
        for path in (self.best_path, self.last_path) if best else (self.last_path,):
            try:
                if path == self.last_path and self._best_written:
                    atomic_copy_of(path, self.best_path, blob)  # the same bytes: a link where the disk allows
                else:
                    atomic_write_bytes(path, blob)
            except OSError as e:
                # the file at path is still the previous complete one (atomic write): name what is kept
                good = self.last_path if self.saved_step is not None or self.last_path.exists() else None
                raise write_failure(path, e, self.folder.parent, len(blob), good, self.saved_step) from None
            if path == self.last_path:
                self.saved_step = trainer.step
            else:
                self._best_written = True

    def on_step_end(self, trainer, step, logs):
        if self.every_steps and step % self.every_steps == 0 and logs["batch"] != logs["batches"]:
            finite = trainer.all_finite() if hasattr(trainer, "all_finite") else trainer.check_finite()
            if finite:  # agreed by every rank of a data-parallel run
                self._save(trainer, best=False)

    def on_epoch_end(self, trainer, epoch, logs):
        value = float(logs.get(self.monitor, math.nan))
        best = _improved(value, self.best, self.mode, 0.0)
        previous = (self.best, self.best_epoch)
        if best:
            self.best, self.best_epoch = value, epoch  # before saving: the checkpoint records its own best
        try:
            self._save(trainer, best=best)
        except OutputWriteError:
            if best and self.saved_step != trainer.step and not self._best_written:
                self.best, self.best_epoch = previous  # best.pt was not written: claim nothing about it
            raise

    def on_event(self, trainer, event):
        if event.get("event") == "interrupted":
            self._save(trainer, best=False)

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", 0))


class TensorBoardLogger(Callback):
    """TensorBoard event files: scalars per epoch and every ``every`` steps (loss, accuracy, learning rate,
    the gradient norm overall and per layer, each layer's update-to-weight ratio), per-layer histograms of
    weights and gradients every ``every`` steps, a grid of the first training inputs, and the test figures
    (``add_test``).

    Args:
        logdir: folder for the event files.
        every: steps between step scalars and histograms.

    Raises:
        ImportError: with the install command, when the tensorboard package is missing.
    """

    def __init__(self, logdir: str | Path, every: int = 50):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self._SummaryWriter = SummaryWriter
        self.logdir = Path(logdir)
        self.every = max(int(every), 1)
        self.writer = None
        self._grads = None
        self._ratios = None

    def on_train_begin(self, trainer):
        self.writer = self._SummaryWriter(log_dir=str(self.logdir), purge_step=trainer.step + 1 if trainer.step
                                          else None)
        x = getattr(trainer.loader, "x", None)
        if trainer.step == 0 and isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 4:
            # what the network is fed, before normalization: the first images, as a grid
            sample = x[:16].float().div(255.0)
            if sample.shape[1] not in (1, 3):
                sample = sample[:, :1]
            self.writer.add_images("inputs/train", sample, 0, dataformats="NCHW")

    def wants_grads(self, step):
        return step % self.every == 0

    def on_gradients(self, trainer, step, grads, params):
        self._grads = {k: g.detach().float().cpu().clone() for k, g in grads.items()}

    def on_update(self, trainer, step, updates, params):
        # |update| / |weights| per layer: around 1e-3 is the usual healthy size of a step
        sums: dict[str, list[float]] = {}
        for name, u in updates.items():
            p = params.get(name)
            if p is None:
                continue
            acc = sums.setdefault(layer_of(name), [0.0, 0.0])
            acc[0] += float(u.detach().double().pow(2).sum())
            acc[1] += float(p.detach().double().pow(2).sum())
        self._ratios = {layer: math.sqrt(a) / math.sqrt(b) for layer, (a, b) in sums.items() if b > 0}

    def on_step_end(self, trainer, step, logs):
        if step % self.every:
            return
        seen = logs["batch_size"]
        self.writer.add_scalar("step/loss", float(logs["loss"]), step)
        self.writer.add_scalar("step/acc", float(logs["correct"]) / seen, step)
        self.writer.add_scalar("step/lr", trainer.current_lr(), step)
        for name, p in trainer.model.params().items():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
        if self._grads is not None:
            total = 0.0
            layers: dict[str, float] = {}
            for name, g in self._grads.items():
                self.writer.add_histogram(f"grads/{name}", g, step)
                sq = float(g.double().pow(2).sum())
                total += sq
                layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + sq
            self.writer.add_scalar("step/grad_norm", math.sqrt(total), step)
            for layer, sq in layers.items():
                self.writer.add_scalar(f"grad_norm/{layer}", math.sqrt(sq), step)
            self._grads = None
        if self._ratios is not None:
            for layer, ratio in self._ratios.items():
                self.writer.add_scalar(f"update_ratio/{layer}", ratio, step)
            self._ratios = None

    def on_epoch_end(self, trainer, epoch, logs):
        for key in ("loss", "acc", "val_loss", "val_acc", "lr", "time"):
            v = logs.get(key)
            if isinstance(v, float) and not math.isnan(v):
                self.writer.add_scalar(f"epoch/{key}", v, epoch)
        self.writer.flush()

    def on_train_end(self, trainer):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def add_test(self, acc: float, loss: float, step: int) -> None:
        """Write the test accuracy and loss (after training, when the run evaluates its test split)."""
        writer = self.writer or self._SummaryWriter(log_dir=str(self.logdir))
        writer.add_scalar("test/acc", float(acc), step)
        writer.add_scalar("test/loss", float(loss), step)
        writer.close()
        self.writer = None
