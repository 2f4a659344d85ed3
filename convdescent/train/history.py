"""History: what a training run measured, epoch by epoch."""

from __future__ import annotations

import math
from typing import Any

KEYS = ("epoch", "step", "loss", "acc", "val_loss", "val_acc", "lr", "time")


class History:
    """Per-epoch lists of the training measurements, as ``fit`` returns them.

    Attributes:
        epoch: epoch number (1-based) of each record.
        step: optimizer steps made by the end of each epoch.
        loss, acc: mean training loss and accuracy over the epoch's batches.
        val_loss, val_acc: validation loss and accuracy after the epoch (nan without validation data).
        lr: learning rate in use at the end of the epoch.
        time: seconds the epoch took (training and validation).
        events: notable events (rollbacks, early stop, interruption) as dicts with a ``"event"`` key.
    """

    def __init__(self):
        for key in KEYS:
            setattr(self, key, [])
        self.events: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        """Add one epoch record (keys of ``KEYS``; missing ones become nan)."""
        for key in KEYS:
            value = record.get(key, math.nan)
            getattr(self, key).append(int(value) if key in ("epoch", "step") else float(value))

    def __len__(self) -> int:
        return len(self.epoch)

    def record(self, i: int) -> dict[str, Any]:
        """The i-th epoch record as a dict."""
        return {key: getattr(self, key)[i] for key in KEYS}

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record (empty dict before the first epoch ends)."""
        return self.record(-1) if len(self) else {}

    @property
    def best_val_acc(self) -> float:
        """Highest validation accuracy over the epochs (nan without validation)."""
        vals = [v for v in self.val_acc if not math.isnan(v)]
        return max(vals) if vals else math.nan

    @property
    def best_epoch(self) -> int | None:
        """Epoch number with the highest validation accuracy (None without validation)."""
        best, where = -math.inf, None
        for e, v in zip(self.epoch, self.val_acc):
            if not math.isnan(v) and v > best:
                best, where = v, e
        return where

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (for checkpoints and JSON)."""
        out: dict[str, Any] = {key: list(getattr(self, key)) for key in KEYS}
        out["events"] = [dict(e) for e in self.events]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        """Rebuild from ``to_dict`` output."""
        h = cls()
        for key in KEYS:
            values = d.get(key, [])
            setattr(h, key, [int(v) if key in ("epoch", "step") else float(v) for v in values])
        h.events = [dict(e) for e in d.get("events", [])]
        lengths = {len(getattr(h, key)) for key in KEYS}
        if len(lengths) != 1:
            raise ValueError(f"history lists have different lengths {sorted(lengths)}; the saved history is damaged")
        return h

    def __repr__(self) -> str:
        if not len(self):
            return "History(no epochs)"
        f = self.final
        return (f"History({len(self)} epochs, final loss {f['loss']:.4f}, acc {f['acc']:.4f}, "
                f"val_acc {f['val_acc']:.4f}, best val_acc {self.best_val_acc:.4f})")
