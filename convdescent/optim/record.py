"""A recording wrapper: keeps gradient and update norms and whether clipping fired, for diagnostics.

It changes nothing: ``record_norms(tx)`` returns exactly the updates ``tx`` returns. Everything it keeps
is a fresh 0-d tensor each step (never mutated later), so a monitor may collect them every step and read
them all at the end of an epoch with a single sync.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .base import GradientTransformation, TransformInfo, _check_transform
from .clipping import ClipState, global_norm
from .updates import LazyUpdates, tensors


class RecordState(NamedTuple):
    """State of record_norms.

    Fields:
        inner: the wrapped transform's state.
        grad_norm: global norm of the gradients received, before any clipping (0-d tensor).
        update_norm: global norm of the updates returned (0-d tensor).
        clipped: whether any clipping transform inside changed the gradients (0-d bool tensor).
        clipped_steps: how many steps clipping fired, since init (0-d int64 tensor).
        steps: steps recorded since init (Python int).
    """

    inner: Any
    grad_norm: Tensor
    update_norm: Tensor
    clipped: Tensor
    clipped_steps: Tensor
    steps: int


def _clip_flags(state: Any) -> list[Tensor]:
    if isinstance(state, ClipState):
        return [state.fired]
    if isinstance(state, RecordState):
        return _clip_flags(state.inner)
    if isinstance(state, tuple):
        return [f for s in state for f in _clip_flags(s)]
    return []


def _update_norm(updates: dict) -> Tensor:
    if isinstance(updates, LazyUpdates) and updates.pending:
        term = updates.single_term()
        if term is not None and term.den is None:
            # c * num has norm |c| * ||num||: no need to evaluate the update.
            return global_norm(term.num) * abs(term.cn / term.cd)
    _, values = tensors(updates)
    return global_norm(values)


def record_norms(inner: GradientTransformation) -> GradientTransformation:
    """Wrap a transform (typically the whole optimizer, clipping included) and record, at every step,
    the gradient norm before clipping, whether clipping fired, and the norm of the final update.

    Read the values with :func:`optimizer_stats`. Recording costs one read pass over the gradients and,
    for most optimizers, evaluating the deferred update (one to three extra passes); the updates applied
    are bit for bit the same as without recording. Leave it out of runs that do not need it.

    Args:
        inner: the transform to observe.

    Returns:
        GradientTransformation with a :class:`RecordState`.
    """
    inner = _check_transform(inner, "record_norms argument")

    def init(params):
        p = next(iter(params.values()), None)
        dev = p.device if p is not None else torch.device("cpu")
        zero = torch.zeros((), dtype=p.dtype if p is not None else None, device=dev)
        no = torch.zeros((), dtype=torch.bool, device=dev)
        return RecordState(inner.init(params), zero, zero.clone(), no, torch.zeros((), dtype=torch.int64, device=dev), 0)

    def update(grads, state, params=None):
        _, g = tensors(grads)
        grad_norm = global_norm(g)
        updates, inner_state = inner.update(grads, state.inner, params)
        update_norm = _update_norm(updates)
        flags = _clip_flags(inner_state)
        clipped = torch.stack(flags).any() if flags else state.clipped.new_zeros(())
        new = RecordState(inner_state, grad_norm, update_norm, clipped, state.clipped_steps + clipped,
                          state.steps + 1)
        return updates, new

    return GradientTransformation(init, update, TransformInfo("record_norms", kind="record", children=(inner,)))


def optimizer_stats(state: Any) -> dict[str, Any] | None:
    """The latest recorded values from a state that contains a :func:`record_norms` wrapper.

    Args:
        state: an optimizer state.

    Returns:
        ``{"grad_norm", "update_norm", "clipped", "clipped_steps"}`` as 0-d tensors plus ``"steps"`` (int),
        or None when the optimizer was built without recording.
    """
    if isinstance(state, RecordState):
        return {"grad_norm": state.grad_norm, "update_norm": state.update_norm, "clipped": state.clipped,
                "clipped_steps": state.clipped_steps, "steps": state.steps}
    if isinstance(state, tuple):
        for s in state:
            found = optimizer_stats(s)
            if found is not None:
                return found
    return None
