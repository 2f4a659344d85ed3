"""Inverted dropout (Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from
Overfitting") with its own random generator, so a run is reproducible and resumable bit for bit.

In training, with drop rate p and a fresh mask m of independent Bernoulli(1 - p) draws:

    y = x * m / (1 - p)              dL/dx = delta * m / (1 - p)

At evaluation y = x: scaling the kept units by 1/(1 - p) during training keeps the expected activation
equal to the evaluation activation, so nothing needs rescaling at test time.

The mask comes from a ``torch.Generator`` the layer owns, on the layer's device, seeded when the layer is
built (from ``seed`` when given, else drawn from the build generator, so a model seed fixes it). Its state
is read and restored with ``get_rng_state()`` / ``set_rng_state()``; ``rng_states(model)`` and
``set_rng_states(model, states)`` do the same for every such layer of a model, for checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Layer


class Dropout(Layer):
    """Inverted dropout: zero each element with probability ``rate`` in training, scale the rest by 1/(1-rate).

    Args:
        rate: drop probability p in [0, 1).
        seed: optional seed of the layer's mask generator; by default one is drawn from the build generator.

    Shapes: any (N, ...) -> the same shape. No parameters.
    """

    kind = "dropout"

    def __init__(self, rate: float = 0.5, seed: int | None = None, name: str | None = None):
        super().__init__(name)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.rate = float(rate)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def build(self, input_shape, generator=None, dtype=torch.float32, device="cpu"):
        out = super().build(input_shape)
        if self.seed is not None:
            seed = self.seed
        else:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
        self._generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
        return out

    # -- randomness ----------------------------------------------------------------------------
    def _require_generator(self) -> torch.Generator:
        if self._generator is None:
            raise RuntimeError(f"Dropout '{self.name}' is not built: build the model before using it")
        return self._generator

    def get_rng_state(self) -> torch.Tensor:
        """The mask generator's state (a uint8 CPU tensor), for checkpoints."""
        return self._require_generator().get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore the mask generator's state saved by ``get_rng_state``."""
        gen = self._require_generator()
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise ValueError(f"Dropout '{self.name}': rng state must be a uint8 tensor from get_rng_state(), "
                             f"got {type(state).__name__}")
        gen.set_state(state.cpu())

    def to(self, device=None, dtype=None):
        super().to(device=device, dtype=dtype)
        if device is not None and self._generator is not None:
            device = torch.device(device)
            if device != self._generator.device and not (device.index is None
                                                         and device.type == self._generator.device.type):
                # Generator states are device-specific, so the new generator is seeded from the old stream:
                # the run stays reproducible across the move.
                seed = int(torch.randint(0, 2**62, (), generator=self._generator, device=self._generator.device))
                self._generator = torch.Generator(device=device).manual_seed(seed)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Generators are saved as (device, state) so pickling and deepcopy work on every device.
        state = self.__dict__.copy()
        gen = state.pop("_generator")
        state["_generator_saved"] = None if gen is None else (str(gen.device), gen.get_state())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_generator_saved")
        self.__dict__.update(state)
        self._generator = None
        if saved is not None:
            device, gen_state = saved
            self._generator = torch.Generator(device=torch.device(device))
            self._generator.set_state(gen_state)

    # -- computation -------------------------------------------------------------------------
    def forward(self, x, train=False):
        if not train or self.rate == 0.0:
            self._cache = (None,)
            return x
        gen = self._require_generator()
        if gen.device.type != x.device.type:
            raise ValueError(f"Dropout '{self.name}' has its generator on {gen.device} but got input on "
                             f"{x.device}; move the model with model.to(device)")
        u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        # The scaled mask m / (1 - p) serves forward and backward alike.
        mask = (u >= self.rate).to(x.dtype).mul_(1.0 / (1.0 - self.rate))
        self._cache = (mask,)
        return x * mask

    def backward(self, dy):
        (mask,) = self._cache
        self._cache = None
        return dy if mask is None else dy * mask

    # -- description -------------------------------------------------------------------------
    def get_config(self):
        return {"rate": self.rate, "seed": self.seed, "name": self.name}

    def to_torch(self):
        return torch.nn.Dropout(self.rate)


def _walk(model) -> list[tuple[str, Layer]]:
    if isinstance(model, Layer):
        found = [(model.name or type(model).__name__, model)]
        for sub in model.sublayers():
            found.extend((f"{found[0][0]}.{name}", layer) for name, layer in _walk(sub))
        return found
    return model.all_layers()


def rng_states(model) -> dict[str, torch.Tensor]:
    """States of every layer's own random generator, by qualified layer name.

    Args:
        model: a ``Sequential`` or a single layer (containers are searched).

    Returns:
        {layer name: uint8 state tensor}, empty when no layer draws random numbers.
    """
    return {name: layer.get_rng_state().clone() for name, layer in _walk(model) if hasattr(layer, "get_rng_state")}


def set_rng_states(model, states: dict[str, torch.Tensor]) -> None:
    """Restore generator states saved by ``rng_states``; every random layer must have an entry."""
    own = {name: layer for name, layer in _walk(model) if hasattr(layer, "set_rng_state")}
    missing = sorted(set(own) - set(states))
    unexpected = sorted(set(states) - set(own))
    if missing or unexpected:
        raise ValueError(f"rng states do not match the model: missing {missing}, unexpected {unexpected}")
    for name, layer in own.items():
        layer.set_rng_state(states[name])
