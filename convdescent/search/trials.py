"""Training one trial of a search or a comparison: a ``train_from_config`` run with pruning and a subset.

The dataset is loaded once per process and shared by the trials it trains; with ``train_subset`` every
trial trains on the same seeded random subset of the training split (the validation and test splits stay
whole, so the trials are judged on the same images as full runs).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..train import Callback


@dataclass
class TrialOutcome:
    """What one training trial gave: the objective and the figures kept with the trial."""

    value: float | None
    pruned: bool
    attrs: dict[str, Any] = field(default_factory=dict)


class PruningCallback(Callback):
    """Report each epoch's validation accuracy to an Optuna trial and stop the run when it should be pruned.

    Reports use the epoch number (1, 2, ...) as the step, so pruners count epochs. The last epoch is
    reported but never pruned: the run has finished, and its result counts.

    Args:
        trial: the ``optuna.trial.Trial``.
    """

    def __init__(self, trial):
        self.trial = trial
        self.pruned = False
        self.pruned_at: int | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = logs.get("val_acc")
        if value is None or not math.isfinite(value):
            return
        step = int(logs.get("epoch", epoch + 1 if isinstance(epoch, int) else len(trainer.history)))
        self.trial.report(float(value), step)
        if trainer.step >= trainer.total_steps:
            return  # the run is over: pruning now would save nothing and only hide a finished result
        if self.trial.should_prune():
            self.pruned = True
            self.pruned_at = step
            trainer.stop = True
            trainer.stop_reason = "pruned"


def subset_dataset(dataset, n: int | None, seed: int = 0):
    """The dataset with a seeded random subset of ``n`` training images (validation and test untouched).

    Args:
        dataset: a ``Dataset``.
        n: training images to keep; None or at least the training set's size keeps everything.
        seed: seed of the choice.

    Returns:
        A ``Dataset`` (the same object when nothing is cut).
    """
    from dataclasses import replace

    if n is None or n >= len(dataset.x_train):
        return dataset
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(dataset.x_train), generator=g)[:n].sort().values
    return replace(dataset, x_train=dataset.x_train[idx], y_train=dataset.y_train[idx],
                   source=f"{dataset.source}; random subset of {n} training images (seed {seed})")


class TrialRunner:
    """Trains one configuration as a run directory and returns its figures as a ``TrialOutcome``.

    Args:
        base: the shared configuration (its dataset keys choose the data, loaded once on first use).
        train_subset: training images per trial (None: all).
        out: folder of the trials' run directories (default: the configuration's ``out``).
        report: write each trial's report.html (off by default to save time; ``convdescent report
            RUN_DIR`` builds it later).
    """

    def __init__(self, base: dict[str, Any], train_subset: int | None = None, out=None, report: bool = False):
        self.base = dict(base)
        self.train_subset = train_subset
        self.out = Path(out) if out is not None else None
        self.report = report
        self._dataset = None
        self._data_key = None

    def dataset_for(self, config: dict[str, Any]):
        """The (subset) dataset for a configuration, loaded once per distinct data setting."""
        from ..data import load_dataset
        from ..train import resolve_config

        cfg = resolve_config(config, source="search")
        key = (cfg["dataset"], cfg["data_dir"], cfg["val_split"], cfg["split_seed"])
        if self._dataset is None or key != self._data_key:
            ds = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], val_split=cfg["val_split"],
                              seed=cfg["split_seed"], progress=False)
            self._dataset = subset_dataset(ds, self.train_subset, seed=cfg["split_seed"])
            self._data_key = key
        return self._dataset

    def __call__(self, config: dict[str, Any], trial=None):
        from ..train import NonFiniteError
        from ..train.run import train_from_config

        config = dict(config)
        if self.out is not None:
            config["out"] = str(self.out)
        dataset = self.dataset_for(config)
        pruning = PruningCallback(trial) if trial is not None else None
        callbacks = [pruning] if pruning is not None else []
        try:
            result = train_from_config(config, callbacks=callbacks, display="quiet", dataset=dataset,
                                       handle_signals=False, stream=io.StringIO())
        except NonFiniteError as e:
            return TrialOutcome(None, False, {"error": f"non-finite values: {e}", "diverged": "non-finite values"})
        if self.report:
            from ..report import build_report

            build_report(result.run_dir)
        h = result.history
        s = result.summary
        attrs = {
            "val_acc_curve": list(h.val_acc), "loss_curve": list(h.loss), "epoch_times": list(h.time),
            "best_val_acc": _num(h.best_val_acc), "final_val_acc": _num(s.get("final_val_acc")),
            "test_acc": _num(s.get("test_acc")), "epochs_run": len(h), "run_dir": str(result.run_dir),
            "train_seconds": _num(s.get("train_time_s")), "status": result.status,
        }
        why = diverged(list(h.loss))
        if why:
            attrs["diverged"] = why
        pruned = pruning is not None and pruning.pruned
        value = attrs["best_val_acc"] if not pruned else (_num(h.val_acc[-1]) if len(h) else None)
        return TrialOutcome(value, pruned, attrs)


def diverged(losses: list[float]) -> str | None:
    """Why a trial's training loss per epoch counts as diverged (non-finite, or ending far above where it
    started), or None."""
    if any(not math.isfinite(v) for v in losses):
        return "non-finite training loss"
    if len(losses) >= 2 and losses[-1] > 1.5 * losses[0]:
        return f"training loss rose from {losses[0]:.3g} to {losses[-1]:.3g}"
    return None


def _num(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
