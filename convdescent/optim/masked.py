"""Frozen parameters: an optimizer that updates only some of a model's parameters.

``freeze(inner, frozen)`` runs ``inner`` on the parameters not in ``frozen`` (so they keep their own state,
Adam moments included, and their own global-norm clipping) and gives the frozen ones zero updates. The
frozen parameters have no optimizer state at all, so weight decay or momentum cannot move them either.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

from .base import GradientTransformation, TransformInfo
from .fused import update_and_apply


class FreezeState(NamedTuple):
    """The inner optimizer's state, over the trainable parameters only."""

    inner: object


def freeze(inner: GradientTransformation, frozen: Iterable[str]) -> GradientTransformation:
    """Wrap ``inner`` so the parameters named in ``frozen`` never change.

    Args:
        inner: the optimizer of the trainable parameters.
        frozen: qualified parameter names (``conv1.weight``) to keep fixed.

    Returns:
        GradientTransformation whose updates are ``inner``'s for trainable names and zeros for frozen ones.
    """
    frozen = frozenset(frozen)
    zeros: dict[str, torch.Tensor] = {}

    def split(tree: dict | None) -> dict | None:
        if tree is None:
            return None
        return {k: v for k, v in tree.items() if k not in frozen}

    def zero_like(key: str, ref: torch.Tensor) -> torch.Tensor:
        z = zeros.get(key)
        if z is None or z.shape != ref.shape or z.dtype != ref.dtype or z.device != ref.device:
            z = zeros[key] = torch.zeros_like(ref)
        return z

    def init(params):
        return FreezeState(inner.init(split(params)))

    def update(grads, state, params=None):
        updates, inner_state = inner.update(split(grads), state.inner, split(params))
        out = {}
        for key, g in grads.items():
            out[key] = zero_like(key, g) if key in frozen else updates[key]
        return out, FreezeState(inner_state)

    def fused(params, grads, state):
        # Only the trainable tensors are touched, through the inner optimizer's own fused kernel if it has one.
        keep = split(params)
        if not keep:
            return state
        return FreezeState(update_and_apply(inner, keep, split(grads), state.inner))

    return GradientTransformation(init, update, TransformInfo("freeze", kwargs={"frozen": len(frozen)},
                                                              kind="record", children=(inner,), fused=fused))


__all__ = ["FreezeState", "freeze"]
