"""Weight initializers.

Fans follow the usual convention: for a weight of shape ``(out, in)`` fan_in = in, fan_out = out; for a
conv weight ``(F, C, kh, kw)`` fan_in = C*kh*kw and fan_out = F*kh*kw (the receptive field counts in both,
as in Keras and torch).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Initializer = Callable[[tuple[int, ...], torch.Generator | None, torch.dtype, object], torch.Tensor]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Return (fan_in, fan_out) for a dense ``(out, in)`` or conv ``(F, C, kh, kw)`` weight shape."""
    if len(shape) < 2:
        raise ValueError(f"fans need a weight of at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _uniform(shape, limit, generator, dtype, device):
    t = torch.empty(shape, dtype=dtype)
    t.uniform_(-limit, limit, generator=generator)
    return t.to(device)


def _normal(shape, std, generator, dtype, device):
    t = torch.empty(shape, dtype=dtype)
    t.normal_(0.0, std, generator=generator)
    return t.to(device)


def glorot_uniform(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Glorot/Xavier uniform, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010).

    Keras' default kernel initializer, and so the one the tutorial's network uses.
    """
    fan_in, fan_out = fans(tuple(shape))
    return _uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)), generator, dtype, device)


def glorot_normal(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Glorot/Xavier normal, N(0, 2 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(tuple(shape))
    return _normal(shape, math.sqrt(2.0 / (fan_in + fan_out)), generator, dtype, device)


def he_uniform(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """He/Kaiming uniform for ReLU nets, U(-a, a) with a = sqrt(6 / fan_in) (He et al. 2015)."""
    fan_in, _ = fans(tuple(shape))
    return _uniform(shape, math.sqrt(6.0 / fan_in), generator, dtype, device)


def he_normal(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """He/Kaiming normal, N(0, 2 / fan_in) (He et al. 2015)."""
    fan_in, _ = fans(tuple(shape))
    return _normal(shape, math.sqrt(2.0 / fan_in), generator, dtype, device)


def zeros(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """All zeros (the default for biases)."""
    return torch.zeros(shape, dtype=dtype, device=device)


def ones(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """All ones (the default for batch-norm scales)."""
    return torch.ones(shape, dtype=dtype, device=device)


# What a layer's configuration says for an initializer that is a callable without a registered name.
CUSTOM = "custom"

INITIALIZERS: dict[str, Initializer] = {
    "glorot_uniform": glorot_uniform,
    "xavier_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "xavier_normal": glorot_normal,
    "he_uniform": he_uniform,
    "kaiming_uniform": he_uniform,
    "he_normal": he_normal,
    "kaiming_normal": he_normal,
    "zeros": zeros,
    "ones": ones,
}


def saved_weights(shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Zeros standing in for an initializer that cannot be named: the layer's saved weights replace them.

    A layer built with an unregistered callable writes ``"custom"`` in its configuration; rebuilding it from
    that configuration (``load_run``, ``load_model``) gets this placeholder and then the trained weights.
    """
    return torch.zeros(shape, dtype=dtype, device=device)


def register_initializer(name: str, fn: Initializer) -> Initializer:
    """Make ``fn`` known by ``name``, so layers built with it write that name in their configuration."""
    if not isinstance(name, str) or not name or name == CUSTOM:
        raise ValueError(f"an initializer name must be a non-empty string other than {CUSTOM!r}, got {name!r}")
    if not callable(fn):
        raise ValueError(f"initializer {name!r} must be callable(shape, generator, dtype, device), got {fn!r}")
    INITIALIZERS[name] = fn
    return fn


def initializer_name(init: str | Initializer) -> str:
    """The name a layer writes in its configuration for ``init``: the name itself, the registered name of a
    callable, else ``"custom"`` (rebuilt as :func:`saved_weights`)."""
    if isinstance(init, str):
        return init
    for name, fn in INITIALIZERS.items():
        if fn is init:
            return name
    return CUSTOM


def get_initializer(name: str | Initializer) -> Initializer:
    """Look up an initializer by name (or pass a callable through)."""
    if callable(name):
        return name
    if name == CUSTOM:
        return saved_weights
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown initializer {name!r}; choose one of {sorted(INITIALIZERS)}") from None
