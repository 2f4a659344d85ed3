"""Named networks: the tutorial's CNN, its batch-norm/dropout variant, and DeepOBS test networks."""

from __future__ import annotations

from typing import Callable

import torch

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from .model import Sequential


def seed_cnn(input_shape=(1, 28, 28), num_classes: int = 10, seed: int | None = None,
             dtype=torch.float32, device="cpu") -> Sequential:
    """The tutorial's network: Conv2D(32, 3x3, ReLU) -> MaxPool 2x2 -> Flatten -> Dense(128, ReLU) -> Dense(K).

    The softmax of the tutorial's last layer is fused into the cross-entropy loss (logits out).
    Input (N, 1, 28, 28) for MNIST-style data or (N, 3, 32, 32) for CIFAR-style data.
    """
    return Sequential([Conv2D(32, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(128), ReLU(), Dense(num_classes)],
                      input_shape=input_shape, seed=seed, dtype=dtype, device=device, name="seed_cnn")


MODELS: dict[str, Callable[..., Sequential]] = {"seed_cnn": seed_cnn}


def register_model(name: str):
    """Decorator adding a model builder ``f(input_shape, num_classes, seed, dtype, device)`` by name."""
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def make_model(name: str, input_shape, num_classes: int = 10, seed: int | None = None,
               dtype=torch.float32, device="cpu") -> Sequential:
    """Build a named model for inputs of ``input_shape`` (C, H, W)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return builder(input_shape=tuple(input_shape), num_classes=num_classes, seed=seed, dtype=dtype, device=device)
