"""``Learner``: a model, its data and an optimizer in one object, with Keras/fastai-style methods.

Every method runs on the parts ``convdescent train`` uses: ``fit`` and ``fit_one_cycle`` build a ``Trainer``
(the same loop, step engine, NaN guard and callbacks), ``lr_find`` is the range test of ``convdescent
lr-find``, ``evaluate`` is the evaluation of a run directory, and ``save`` writes a ``save_model`` file.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from . import optim
from .model import Sequential
from .serialization import load_model, model_payload
from .train.callbacks import Callback
from .train.checkpoint import atomic_write_bytes
from .train.evaluation import evaluate_model
from .train.history import History
from .train.trainer import Trainer, display_callbacks


def _dataset(data, val_split, seed: int):
    from .data import load_dataset

    if isinstance(data, str):
        return load_dataset(data, val_split=val_split, seed=seed)
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data
    raise ValueError(f"data must be a dataset name such as 'fashion-mnist' or a Dataset from load_dataset, "
                     f"got {type(data).__name__}")


class Learner:
    """Train, inspect, evaluate and save one model on one dataset.

    Args:
        model: a ``Sequential``, a named model ("resnet8"), or a model file path ("net.toml"); names and files
            are built for the data's image shape and class count.
        data: a ``Dataset`` (``load_dataset``) or a dataset name.
        optimizer: optimizer name (``convdescent optimizers`` lists them).
        lr: learning rate of ``fit``.
        loss: "cross_entropy" or "mse".
        batch_size: images per step.
        normalize: "unit" (x / 255) or "dataset" (per-channel mean and std of the training split).
        augment: augmentation spec such as "crop:4,flip", or None.
        seed: initial weights (for names and files), batch order and augmentation.
        val_split: images held out for validation when ``data`` is a name.
        device: "cpu", "cuda", ...
        verbose: "auto", "lines", "bar", "json" or "quiet".
        callbacks: extra ``Callback`` objects for every fit.
        **optimizer_args: momentum, weight_decay, betas, eps, clip_norm, ... as for ``convdescent train``.

    Attributes:
        model, data, normalizer; history: every fit's epochs, in order.
    """

    def __init__(self, model, data, optimizer: str = "adam", lr: float = 1e-3, *, loss: str = "cross_entropy",
                 batch_size: int = 128, normalize: str = "unit", augment: str | None = None, seed: int = 0,
                 val_split=5000, device="cpu", verbose="auto", callbacks: Iterable[Callback] = (),
                 **optimizer_args):
        from .data import Normalizer
        from .losses import make_loss
        from .models import make_model

        if optimizer not in optim.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(sorted(optim.OPTIMIZERS))}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if normalize not in ("unit", "dataset"):
            raise ValueError(f"normalize must be 'unit' or 'dataset', got {normalize!r}")
        self.data = _dataset(data, val_split, seed)
        self.device = torch.device(device)
        if isinstance(model, (str, Path)):
            name = str(model)
            if name.endswith(".toml"):
                name = f"file:{name}"
            model = make_model(name, self.data.input_shape, self.data.num_classes, seed=seed, device=self.device)
        if not isinstance(model, Sequential):
            raise ValueError(f"model must be a Sequential, a model name or a .toml model file, got "
                             f"{type(model).__name__}")
        if model.input_shape is None:
            model.build(self.data.input_shape, seed=seed)
        if tuple(model.input_shape) != tuple(self.data.input_shape):
            raise ValueError(f"the model takes inputs {tuple(model.input_shape)}, the data's images are "
                             f"{tuple(self.data.input_shape)}")
        if model.device != self.device:
            model.to(device=self.device)
        self.model = model
        self.loss_fn = make_loss(loss)
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.optimizer_args = {k: v for k, v in optimizer_args.items() if v is not None}
        self.batch_size = batch_size
        self.normalizer = (Normalizer.from_data(self.data.x_train) if normalize == "dataset" else Normalizer.unit())
        self.augment = augment
        self.seed = seed
        self.verbose = verbose
        self.callbacks = list(callbacks)
        self.history = History()
        self._opt_key = None  # (optimizer, lr) whose state continues into the next fit
        self._opt_state = None

    # ------------------------------------------------------------------------------------------ training
    def _loader(self):
        from .data import BatchLoader, make_augment
        from .data.loader import derive_seed

        augment = make_augment(self.augment, dataset=self.data.name) if self.augment else None
        # Each fit draws a new batch order (the same for the same seed and fit count).
        seed = derive_seed(self.seed, len(self.history)) if len(self.history) else self.seed
        return BatchLoader(self.data.x_train, self.data.y_train, self.batch_size, shuffle=True, seed=seed,
                           normalizer=self.normalizer, augment=augment, device=self.device, dtype=self.model.dtype)

    def _val(self):
        if len(self.data.x_val) == 0:
            return None
        return self.data.x_val.to(self.device), self.data.y_val.to(self.device)

    def _run(self, epochs: int, lr: float, schedule: str | None, schedule_params: dict, stream=None) -> History:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        loader = self._loader()
        total = epochs * loader.steps_per_epoch
        optimizer = optim.optimizer_from_args(self.optimizer_name, lr, schedule=schedule,
                                              schedule_params=schedule_params, total_steps=total,
                                              steps_per_epoch=loader.steps_per_epoch, record=False,
                                              **self.optimizer_args)
        cbs = self.callbacks + display_callbacks(self.verbose, stream)
        trainer = Trainer(self.model, self.loss_fn, optimizer, loader, self._val(), epochs=epochs, callbacks=cbs,
                          notice_stream=None if self.verbose in (0, "quiet") else sys.stderr)
        key = (self.optimizer_name, lr) if schedule is None else None
        if key is not None and key == self._opt_key:
            # A second fit() with the same constant rate goes on from the moments the first one left.
            trainer.opt_state = optim.load_state_dict(trainer.opt_state, optim.state_dict(self._opt_state))
        history = trainer.run()
        self._opt_key, self._opt_state = key, trainer.opt_state
        offset = len(self.history)
        for i in range(len(history)):
            row = {k: history.to_dict()[k][i] for k in history.to_dict() if k != "events"}
            row["epoch"] = offset + i + 1
            self.history.append(row)
        self.history.events.extend(history.events)
        return history

    def fit(self, epochs: int, lr: float | None = None, stream=None) -> History:
        """Train for ``epochs`` passes at a constant learning rate (``lr``, default the Learner's).

        Returns:
            The History of these epochs (``self.history`` holds every fit's).
        """
        return self._run(epochs, self.lr if lr is None else lr, None, {}, stream)

    def fit_one_cycle(self, epochs: int, max_lr: float | None = None, stream=None, **schedule_params) -> History:
        """Train with the one-cycle schedule (Smith & Topin 2018) peaking at ``max_lr`` (default the
        Learner's lr); ``schedule_params`` are one_cycle's (pct_start, div_factor, final_div_factor, ...)."""
        return self._run(epochs, self.lr if max_lr is None else max_lr, "one_cycle", dict(schedule_params), stream)

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, **kwargs):
        """The learning-rate range test (Smith 2017) with this Learner's optimizer; the model is left as it was.

        Returns:
            ``LRFindResult``: ``.recommended_lr``, the curve and every rule's suggestion.
        """
        from .search.lr_find import lr_find

        args = {k: v for k, v in self.optimizer_args.items() if k not in ("schedule", "schedule_params")}
        return lr_find(self.model, self.loss_fn, self._loader(), self.optimizer_name, start_lr=start_lr,
                       end_lr=end_lr, num_steps=num_steps, **args, **kwargs)

    # ------------------------------------------------------------------------------------------ using
    def evaluate(self, split: str = "test") -> dict[str, Any]:
        """Loss, accuracy, per-class accuracy and confusion matrix on a split ("test", "val" or "train")."""
        x, y = self.data.split(split)
        if len(x) == 0:
            raise ValueError(f"the data has no {split} images")
        return evaluate_model(self.model, self.loss_fn, x.to(self.device), y.to(self.device), self.normalizer,
                              self.data.num_classes)

    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Class probabilities of images given as pixel values 0..255.

        Args:
            images: uint8 or float tensor (N, C, H, W) or one image (C, H, W).

        Returns:
            (N, K) probabilities (softmax of the logits).
        """
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a tensor (N, C, H, W) of pixel values 0..255, got "
                             f"{type(images).__name__}")
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.model.input_shape):
            raise ValueError(f"images must have shape (N, {', '.join(map(str, self.model.input_shape))}), got "
                             f"{tuple(images.shape)}")
        x = x.to(self.device)
        mean = torch.tensor(self.normalizer.mean, dtype=self.model.dtype, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.normalizer.std, dtype=self.model.dtype, device=self.device).view(1, -1, 1, 1)
        x = (x.to(self.model.dtype) / 255.0 - mean) / std
        return torch.softmax(self.model.predict(x, batch_size=batch_size), dim=1)

    def save(self, path) -> Path:
        """Write the model as a ``save_model`` file (``load_model`` reads it), with the normalizer and the
        class names beside it (``Learner.load`` restores them)."""
        payload = model_payload(self.model)
        payload["normalizer"] = self.normalizer.to_dict()
        payload["classes"] = list(self.data.classes)
        buf = io.BytesIO()
        torch.save(payload, buf)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path, data, **kwargs) -> "Learner":
        """A Learner around the model saved at ``path`` (by ``save`` or ``save_model``) on ``data``."""
        from .data import Normalizer

        learner = cls(load_model(path), data, **kwargs)
        extra = torch.load(Path(path), map_location="cpu", weights_only=True)
        if extra.get("normalizer"):
            learner.normalizer = Normalizer.from_dict(extra["normalizer"])
        return learner

    def summary(self) -> str:
        """The model's layer table, then the data and the optimizer."""
        lines = [self.model.summary(),
                 f"Data {self.data.name}: {len(self.data.x_train)} train / {len(self.data.x_val)} val / "
                 f"{len(self.data.x_test)} test images, {self.data.num_classes} classes",
                 f"Optimizer {self.optimizer_name} lr {self.lr:g}, batch size {self.batch_size}"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Learner({self.model.name}, {self.data.name}, optimizer={self.optimizer_name!r}, lr={self.lr:g}, "
                f"epochs trained {len(self.history)})")
