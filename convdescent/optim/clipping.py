"""Gradient clipping: by value, by global norm, by per-tensor norm, and adaptive (unit-wise) clipping.

Each clipper works in place on the gradients it receives (allowed by the contract) and keeps in its
state a 0-d bool tensor ``fired`` saying whether it changed anything at the last step, computed on the
device without a host sync; :func:`~convdescent.optim.record.record_norms` reads it. Global values (the
norm, the flags) are over all shards when the parameters are split across processes
(:mod:`convdescent.optim.sharding`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import _checks as chk
from .base import GradientTransformation, TransformInfo
from .sharding import shard_any, shard_sum, sharded, tensor_norms
from .updates import tensors


class ClipState(NamedTuple):
    """State of a clipping transform: whether it clipped at the last step (0-d bool tensor)."""

    fired: Tensor


def _device(params: dict[str, Tensor]) -> torch.device:
    for p in params.values():
        return p.device
    return torch.device("cpu")


def _init_clip(params) -> ClipState:
    return ClipState(torch.zeros((), dtype=torch.bool, device=_device(params)))


def peak_magnitudes(values: Sequence[Tensor]) -> list[Tensor]:
    """The largest magnitude of each tensor, max |x| (NaN where it holds a NaN, 0 for an empty one), as 0-d
    tensors (no host sync): what ``torch._foreach_norm(values, ord=inf)`` gives, computed as the larger of the
    maximum and minus the minimum, which on the CPU is about ten times faster (the tutorial CNN's
    parameters: 0.12 against 1.4 ms on 2 cores).

    Args:
        values: tensors of any shapes and floating dtypes.
    """
    return [torch.maximum(t.amax(), t.amin().neg()) if t.numel() else t.new_zeros(()) for t in values]


def global_norm(values: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of all tensors taken together, as a 0-d tensor (no host sync).

    Inside :func:`~convdescent.optim.sharding.across_shards` the tensors are this process's shard and the
    norm is over all shards: ``sqrt(shard_sum(sum of squares))``.

    Args:
        values: tensors of any shapes, on one device.

    Returns:
        0-d tensor ``sqrt(sum of squares of every element)``.
    """
    if not values:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(list(values)))
    if sharded():
        return shard_sum((norms * norms).sum().reshape(1))[0].sqrt()
    return torch.linalg.vector_norm(norms)


def clip_by_value(clip_value: float) -> GradientTransformation:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (torch ``clip_grad_value_``).

    Args:
        clip_value: the bound (> 0).

    Returns:
        GradientTransformation with a :class:`ClipState`.
    """
    c = chk.positive("clip_value", clip_value, hint="use e.g. clip_value=1.0")

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        if not g:
            return grads, state
        fired = shard_any(torch.stack(peak_magnitudes(g)).max() > c)
        torch._foreach_clamp_min_(g, -c)
        torch._foreach_clamp_max_(g, c)
        return dict(zip(keys, g)), ClipState(fired)

    return GradientTransformation(_init_clip, update, TransformInfo("clip_by_value", kwargs={"clip_value": c}))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale all gradients together so their global norm is at most ``max_norm``
    (Pascanu, Mikolov & Bengio 2013): ``g <- g * min(1, max_norm / ||g||)``.

    Args:
        max_norm: the largest allowed global norm (> 0).

    Returns:
        GradientTransformation with a :class:`ClipState`.
    """
    c = chk.positive("max_norm", max_norm, hint="use e.g. max_norm=1.0")

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        if not g:
            return grads, state
        norm = global_norm(g)
        # c / 0 is inf and clamps to 1; a NaN norm stays NaN so the trainer's NaN guard still sees it.
        coef = (c / norm).clamp(max=1.0)
        torch._foreach_mul_(g, coef)
        return dict(zip(keys, g)), ClipState(norm > c)

    return GradientTransformation(_init_clip, update, TransformInfo("clip_by_global_norm", kwargs={"max_norm": c}))


def clip_by_norm(max_norm: float) -> GradientTransformation:
    """Rescale each gradient tensor separately so its own norm is at most ``max_norm``.

    Inside :func:`~convdescent.optim.sharding.across_shards` a tensor split by rows over processes is
    rescaled by the norm of the whole tensor (:func:`~convdescent.optim.sharding.tensor_norms`).

    Args:
        max_norm: the largest allowed norm per tensor (> 0).

    Returns:
        GradientTransformation with a :class:`ClipState`.
    """
    c = chk.positive("max_norm", max_norm, hint="use e.g. max_norm=1.0")

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        if not g:
            return grads, state
        # A tensor whose rows are spread over several processes gets the norm of all its rows.
        norms = tensor_norms(keys, torch.stack(torch._foreach_norm(g)))
        coefs = (c / norms).clamp(max=1.0)
        torch._foreach_mul_(g, list(coefs.unbind()))
        return dict(zip(keys, g)), ClipState(shard_any((norms > c).any()))

    return GradientTransformation(_init_clip, update, TransformInfo("clip_by_norm", kwargs={"max_norm": c}))


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm of each output unit: over all dims but the first for weights, over everything for biases.

    Args:
        x: a parameter or gradient, e.g. conv ``(F, C, kh, kw)``, dense ``(out, in)`` or bias ``(F,)``.

    Returns:
        Tensor broadcastable to ``x``: ``(F, 1, 1, 1)``, ``(out, 1)``, or a 0-d/1-element tensor.
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def adaptive_grad_clip(clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ()) -> GradientTransformation:
    """Adaptive gradient clipping, AGC (Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale
    Image Recognition Without Normalization"): clip each unit's gradient so that
    ``||G_i|| / max(||W_i||, eps) <= clipping``, units being output rows/filters.

    Args:
        clipping: the largest allowed ratio of gradient norm to weight norm (> 0).
        eps: floor on the weight norm, so zero-initialised units can still move (> 0).
        exclude: parameter names left unclipped (the paper leaves the final classifier out).

    Units are rows of dim 0, so the clip is exact on a block of rows of a tensor (a shard of the sharded
    optimizer), with the tensor's name; a tensor of fewer than 2 dims is one unit and must stay whole.

    Returns:
        GradientTransformation with a :class:`ClipState`; its update needs ``params``.
    """
    clipping = chk.positive("clipping", clipping, hint="use e.g. clipping=0.01")
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-3")
    if isinstance(exclude, str) or not all(isinstance(k, str) for k in exclude):
        raise ValueError(f"exclude must be a list of parameter names, got {exclude!r}")
    excluded = frozenset(exclude)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("adaptive_grad_clip needs the parameters: call update(grads, state, params)")
        keys, g = tensors(grads)
        fired = []
        for k, gk in zip(keys, g):
            if k in excluded:
                continue
            max_norm = unitwise_norm(params[k]).clamp(min=eps) * clipping
            g_norm = unitwise_norm(gk)
            trigger = g_norm > max_norm
            coef = torch.where(trigger, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
            gk.mul_(coef)
            fired.append(trigger.any())
        any_fired = torch.stack(fired).any() if fired else torch.zeros((), dtype=torch.bool, device=state.fired.device)
        return dict(zip(keys, g)), ClipState(shard_any(any_fired))

    kwargs = {"clipping": clipping, "eps": eps}
    if excluded:
        kwargs["exclude"] = tuple(sorted(excluded))
    return GradientTransformation(_init_clip, update, TransformInfo("adaptive_grad_clip", kwargs=kwargs))
