"""Scaling building blocks: learning rate, momentum, weight decay, RMSprop, Adagrad, Adadelta, Adam, NAdam,
RAdam, Adamax, Lion.

Each function returns a :class:`~convdescent.optim.base.GradientTransformation` with its own NamedTuple
state. The arithmetic follows ``torch.optim``'s single-tensor code operation for operation, except where a
rearrangement saves a pass over the parameters (noted in place), so the named optimizers built from these
blocks reproduce torch's trajectories to rounding, and every step is a fixed handful of
``torch._foreach_*`` calls. Outputs are :class:`~convdescent.optim.updates.LazyUpdates` where
that saves passes over the parameters (see that module).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from . import _checks as chk
from .base import EmptyState, GradientTransformation, TransformInfo
from .schedules import as_schedule, stateful_parts
from .updates import LazyUpdates, Term, as_lazy, tensors

Tensors = dict[str, Tensor]


def _zeros(params: Tensors, fill: float = 0.0) -> Tensors:
    if fill == 0.0:
        return {k: torch.zeros_like(p) for k, p in params.items()}
    return {k: torch.full_like(p, fill) for k, p in params.items()}


def _listed(buffers: Tensors, keys: list[str], name: str) -> list[Tensor]:
    try:
        return [buffers[k] for k in keys]
    except KeyError:
        raise ValueError(
            f"{name}: the gradients have keys {keys} but the state was built for {list(buffers)}; "
            "build the state with init(params) for the same parameters") from None


def _need_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(f"{name} needs the parameters: call update(grads, state, params)")


def _single(updates: dict) -> tuple[list[str], list[Tensor], list[Tensor] | None, float]:
    """Updates as one term ``c * num / den`` (den may be None), evaluating anything more complex."""
    keys = list(updates)
    if isinstance(updates, LazyUpdates) and updates.pending:
        term = updates.single_term()
        if term is not None:
            return keys, term.num, term.den, term.cn / term.cd
    keys, values = tensors(updates)
    return keys, values, None, 1.0


def _value_or_schedule(name: str, value: Any, check: Callable[[str, Any], float]):
    """A float hyperparameter that may also be a schedule (e.g. momentum cycled by one_cycle)."""
    if callable(value):
        return as_schedule(value, name)
    return check(name, value)


def _at(value, count: int) -> float:
    return float(value(count)) if callable(value) else value


# ----- scalar scaling ----------------------------------------------------------------------------------

def scale(factor: float) -> GradientTransformation:
    """Multiply the updates by a constant.

    Args:
        factor: the multiplier (``-1.0`` turns descent into ascent, torch's ``maximize=True``).

    Returns:
        GradientTransformation with an empty state.
    """
    factor = chk.number("factor", factor)

    def init(params):
        return EmptyState()

    def update(grads, state, params=None):
        return as_lazy(grads).scaled(factor), state

    return GradientTransformation(init, update, TransformInfo("scale", args=(factor,)))


class ScaleByLearningRateState(NamedTuple):
    """State of scale_by_learning_rate: ``count`` updates made; the schedule's metric-driven parts."""

    count: int
    schedule_state: tuple


def scale_by_learning_rate(learning_rate) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate``: the only place where the descent's minus sign lives.

    Args:
        learning_rate: a non-negative number, or a schedule ``step -> float`` (see
            :mod:`convdescent.optim.schedules`); update ``t`` (0-based) uses ``learning_rate(t)``.

    Returns:
        GradientTransformation; its state counts the steps (a Python int) and holds any
        :class:`~convdescent.optim.schedules.ReduceOnPlateau` inside the schedule so it saves with the state.
    """
    sched = as_schedule(learning_rate, "lr")
    parts = tuple(stateful_parts(sched))
    shown = learning_rate if not callable(learning_rate) else sched

    def lr_at(count: int) -> float:
        lr = float(sched(count))
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(
                f"the learning-rate schedule {sched!r} gave {lr!r} at step {count}; "
                "learning rates must be finite and non-negative")
        return lr

    def init(params):
        return ScaleByLearningRateState(0, parts)

    def update(grads, state, params=None):
        lr = lr_at(state.count)
        return as_lazy(grads).scaled(-lr), ScaleByLearningRateState(state.count + 1, state.schedule_state)

    info = TransformInfo("scale_by_learning_rate", args=(float(shown) if not callable(shown) else shown,),
                         kind="lr", lr_of=lambda s: lr_at(s.count), schedule=sched)
    return GradientTransformation(init, update, info)


# ----- momentum ----------------------------------------------------------------------------------------

class TraceState(NamedTuple):
    """State of trace: ``count`` updates made and the momentum buffers (one per parameter)."""

    count: int
    momentum: dict


def trace(decay, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Momentum: heavy-ball (Polyak 1964) or Nesterov (Sutskever et al. 2013), as torch.optim.SGD does it.

    ``buf = g`` at the first step, then ``buf = decay * buf + (1 - dampening) * g``; the output is
    ``buf``, or ``g + decay * buf`` with Nesterov.

    Args:
        decay: the momentum factor (>= 0), or a schedule of it (e.g. from ``one_cycle_momentum``).
        dampening: fraction of the gradient withheld from the buffer, in [0, 1].
        nesterov: use Nesterov momentum (needs ``decay > 0`` and ``dampening == 0``).

    Returns:
        GradientTransformation with a :class:`TraceState`.
    """
    decay = _value_or_schedule("momentum", decay, chk.non_negative)
    dampening = chk.number("dampening", dampening, low=0.0, high=1.0)
    nesterov = chk.boolean("nesterov", nesterov)
    if nesterov and ((not callable(decay) and decay <= 0.0) or dampening != 0.0):
        raise ValueError(
            f"nesterov=True needs momentum > 0 and dampening == 0, got momentum={decay!r}, "
            f"dampening={dampening!r}")

    def init(params):
        return TraceState(0, _zeros(params))

    def update(grads, state, params=None):
        m = _at(decay, state.count)
        if nesterov:
            # The output is written into the evaluated input, which must therefore be scratch memory.
            keys, num = tensors(grads)
            den, c = None, 1.0
        else:
            keys, num, den, c = _single(grads)
        buf = _listed(state.momentum, keys, "trace")
        # The buffers are zero before the first step, so adding the input sets buf = input exactly
        # (torch.optim.SGD's clone), without dampening.
        if state.count == 0:
            alpha = c
        else:
            torch._foreach_mul_(buf, m)
            alpha = c * (1.0 - dampening)
        if den is None:
            torch._foreach_add_(buf, num, alpha=alpha)
        else:
            torch._foreach_addcdiv_(buf, num, den, value=alpha)
        new_state = TraceState(state.count + 1, state.momentum)
        if nesterov:
            torch._foreach_add_(num, buf, alpha=m)
            return dict(zip(keys, num)), new_state
        return LazyUpdates(keys, [Term(buf, None, 1.0, 1.0)], owned=False), new_state

    kwargs = {"decay": decay, "dampening": dampening, "nesterov": nesterov}
    return GradientTransformation(init, update, TransformInfo("trace", kwargs=kwargs))


# ----- weight decay ------------------------------------------------------------------------------------

def add_decayed_weights(weight_decay: float, name: str = "add_decayed_weights") -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates.

    Where it sits in a chain decides which weight decay it is: before the scaling transform (e.g.
    ``scale_by_adam``) it is the coupled L2 penalty of SGD and Adam; after it, just before
    ``scale_by_learning_rate``, it is the decoupled weight decay of AdamW (Loshchilov & Hutter 2019),
    ``p <- p - lr * (u + wd * p)``. See :func:`coupled_weight_decay`, :func:`decoupled_weight_decay`.

    Args:
        weight_decay: the coefficient (>= 0).
        name: the name describe() shows.

    Returns:
        GradientTransformation with an empty state; its update needs ``params``.
    """
    wd = chk.non_negative("weight_decay", weight_decay)

    def init(params):
        return EmptyState()

    def update(grads, state, params=None):
        _need_params(params, name)
        keys = list(grads)
        plist = [params[k] for k in keys]
        if isinstance(grads, LazyUpdates) and grads.pending:
            return grads.plus_decay(wd, plist), state
        _, g = tensors(grads)
        torch._foreach_add_(g, plist, alpha=wd)
        return dict(zip(keys, g)), state

    return GradientTransformation(init, update, TransformInfo(name, kwargs={"weight_decay": wd}))


def coupled_weight_decay(weight_decay: float) -> GradientTransformation:
    """L2 weight decay added to the gradient (``g + wd * p``), SGD/Adam ``weight_decay``; put it first.

    Args:
        weight_decay: the coefficient (>= 0).

    Returns:
        :func:`add_decayed_weights` named ``coupled_weight_decay``.
    """
    return add_decayed_weights(weight_decay, name="coupled_weight_decay")


def decoupled_weight_decay(weight_decay: float) -> GradientTransformation:
    """Decoupled weight decay (AdamW, Loshchilov & Hutter 2019); put it just before the learning rate.

    Args:
        weight_decay: the coefficient (>= 0); the step shrinks the weights by ``lr * weight_decay``.

    Returns:
        :func:`add_decayed_weights` named ``decoupled_weight_decay``.
    """
    return add_decayed_weights(weight_decay, name="decoupled_weight_decay")


# ----- adaptive scalings -------------------------------------------------------------------------------

class ScaleByRmsState(NamedTuple):
    """State of scale_by_rms: step count, mean of squared gradients, mean gradient (centered only)."""

    count: int
    nu: dict
    mu: dict


def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, centered: bool = False) -> GradientTransformation:
    """RMSprop's scaling (Hinton 2012, lecture 6e): ``g / (sqrt(E[g^2] - [centered] E[g]^2) + eps)``.

    Args:
        alpha: smoothing constant of the running averages, in [0, 1).
        eps: added to the denominator (> 0).
        centered: subtract the squared running mean (Graves 2013), estimating the variance.

    Returns:
        GradientTransformation with a :class:`ScaleByRmsState`.
    """
    alpha = chk.unit_interval("alpha", alpha, hint="use e.g. alpha=0.99")
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-8")
    centered = chk.boolean("centered", centered)

    def init(params):
        return ScaleByRmsState(0, _zeros(params), _zeros(params) if centered else {})

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        nu = _listed(state.nu, keys, "scale_by_rms")
        torch._foreach_mul_(nu, alpha)
        torch._foreach_addcmul_(nu, g, g, value=1 - alpha)
        if centered:
            mu = _listed(state.mu, keys, "scale_by_rms")
            torch._foreach_lerp_(mu, g, 1 - alpha)
            avg = torch._foreach_addcmul(nu, mu, mu, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(nu)
        torch._foreach_add_(avg, eps)
        out = LazyUpdates(keys, [Term(g, avg, 1.0, 1.0)], owned=True)
        return out, ScaleByRmsState(state.count + 1, state.nu, state.mu)

    kwargs = {"alpha": alpha, "eps": eps, "centered": centered}
    return GradientTransformation(init, update, TransformInfo("scale_by_rms", kwargs=kwargs))


class ScaleByAdagradState(NamedTuple):
    """State of scale_by_adagrad: step count and the running sum of squared gradients."""

    count: int
    sum_of_squares: dict


def scale_by_adagrad(eps: float = 1e-10, initial_accumulator_value: float = 0.0) -> GradientTransformation:
    """Adagrad's scaling (Duchi, Hazan & Singer 2011): ``g / (sqrt(sum of g^2) + eps)``.

    Args:
        eps: added to the denominator (> 0).
        initial_accumulator_value: starting value of the sum (>= 0).

    Returns:
        GradientTransformation with a :class:`ScaleByAdagradState`.
    """
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-10")
    initial = chk.non_negative("initial_accumulator_value", initial_accumulator_value)

    def init(params):
        return ScaleByAdagradState(0, _zeros(params, initial))

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        acc = _listed(state.sum_of_squares, keys, "scale_by_adagrad")
        torch._foreach_addcmul_(acc, g, g, value=1)
        std = torch._foreach_sqrt(acc)
        torch._foreach_add_(std, eps)
        out = LazyUpdates(keys, [Term(g, std, 1.0, 1.0)], owned=True)
        return out, ScaleByAdagradState(state.count + 1, state.sum_of_squares)

    kwargs = {"eps": eps, "initial_accumulator_value": initial}
    return GradientTransformation(init, update, TransformInfo("scale_by_adagrad", kwargs=kwargs))


class ScaleByAdadeltaState(NamedTuple):
    """State of scale_by_adadelta: step count, mean squared gradient, mean squared step."""

    count: int
    nu: dict
    delta_acc: dict


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """Adadelta's scaling (Zeiler 2012): ``g * sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps)``.

    Args:
        rho: decay of the running averages, in [0, 1].
        eps: added inside both square roots (> 0).

    Returns:
        GradientTransformation with a :class:`ScaleByAdadeltaState`.
    """
    rho = chk.unit_interval("rho", rho, closed_high=True, hint="use e.g. rho=0.9")
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-6")

    def init(params):
        return ScaleByAdadeltaState(0, _zeros(params), _zeros(params))

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        nu = _listed(state.nu, keys, "scale_by_adadelta")
        acc = _listed(state.delta_acc, keys, "scale_by_adadelta")
        torch._foreach_mul_(nu, rho)
        torch._foreach_addcmul_(nu, g, g, value=1 - rho)
        # sqrt(acc + eps) / sqrt(nu + eps) taken as one square root of the ratio: a pass fewer than torch.
        delta = torch._foreach_add(acc, eps)
        std_sq = torch._foreach_add(nu, eps)
        torch._foreach_div_(delta, std_sq)
        del std_sq
        torch._foreach_sqrt_(delta)
        torch._foreach_mul_(delta, g)
        torch._foreach_mul_(acc, rho)
        torch._foreach_addcmul_(acc, delta, delta, value=1 - rho)
        out = LazyUpdates(keys, [Term(delta, None, 1.0, 1.0)], owned=True)
        return out, ScaleByAdadeltaState(state.count + 1, state.nu, state.delta_acc)

    kwargs = {"rho": rho, "eps": eps}
    return GradientTransformation(init, update, TransformInfo("scale_by_adadelta", kwargs=kwargs))


class ScaleByAdamState(NamedTuple):
    """State of scale_by_adam: step count, first and second moments, running max of the second (AMSGrad)."""

    count: int
    mu: dict
    nu: dict
    nu_max: dict


def scale_by_adam(b1=0.9, b2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False) -> GradientTransformation:
    """Adam's scaling (Kingma & Ba 2015) with bias correction, and AMSGrad (Reddi, Kale & Kumar 2018).

    ``m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``;
    AMSGrad uses the running maximum of ``v``.

    Args:
        b1: decay of the first moment, in [0, 1) (or a schedule of it, e.g. cycled by one_cycle_momentum).
        b2: decay of the second moment, in [0, 1).
        eps: added to the denominator (> 0).
        amsgrad: use the maximum of past second moments.

    Returns:
        GradientTransformation with a :class:`ScaleByAdamState`.
    """
    b1 = _value_or_schedule("b1", b1, lambda n, v: chk.unit_interval(n, v, hint="use e.g. betas=(0.9, 0.999)"))
    b2 = chk.unit_interval("b2", b2, hint="use e.g. betas=(0.9, 0.999)")
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-8")
    amsgrad = chk.boolean("amsgrad", amsgrad)

    def init(params):
        return ScaleByAdamState(0, _zeros(params), _zeros(params), _zeros(params) if amsgrad else {})

    def update(grads, state, params=None):
        beta1 = _at(b1, state.count)
        keys, g = tensors(grads)
        mu = _listed(state.mu, keys, "scale_by_adam")
        nu = _listed(state.nu, keys, "scale_by_adam")
        step = state.count + 1
        torch._foreach_lerp_(mu, g, 1 - beta1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - b2 ** step) ** 0.5
        if amsgrad:
            nu_max = _listed(state.nu_max, keys, "scale_by_adam")
            torch._foreach_maximum_(nu_max, nu)
            denom = torch._foreach_sqrt(nu_max)
        else:
            denom = torch._foreach_sqrt(nu)
        # sqrt(v) / s + eps == (sqrt(v) + eps * s) / s: moving s = sqrt(1 - b2^t) into the term's
        # coefficient saves torch's division pass over every parameter.
        torch._foreach_add_(denom, eps * bias_correction2_sqrt)
        out = LazyUpdates(keys, [Term(mu, denom, bias_correction2_sqrt, bias_correction1)], owned=False)
        return out, ScaleByAdamState(step, state.mu, state.nu, state.nu_max)

    kwargs = {"b1": b1, "b2": b2, "eps": eps}
    if amsgrad:
        kwargs["amsgrad"] = True
    return GradientTransformation(init, update, TransformInfo("scale_by_adam", kwargs=kwargs))


class ScaleByNadamState(NamedTuple):
    """State of scale_by_nadam: step count, moments, and the product of the momentum schedule."""

    count: int
    mu: dict
    nu: dict
    mu_product: float


def scale_by_nadam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   momentum_decay: float = 4e-3) -> GradientTransformation:
    """NAdam's scaling (Dozat 2016): Adam with Nesterov momentum and torch's momentum-decay schedule
    ``mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))``.

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to the denominator (> 0).
        momentum_decay: speed of the momentum schedule (>= 0).

    Returns:
        GradientTransformation with a :class:`ScaleByNadamState`.
    """
    b1 = chk.unit_interval("b1", b1, hint="use e.g. betas=(0.9, 0.999)")
    b2 = chk.unit_interval("b2", b2, hint="use e.g. betas=(0.9, 0.999)")
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-8")
    momentum_decay = chk.non_negative("momentum_decay", momentum_decay)

    def init(params):
        return ScaleByNadamState(0, _zeros(params), _zeros(params), 1.0)

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        mu = _listed(state.mu, keys, "scale_by_nadam")
        nu = _listed(state.nu, keys, "scale_by_nadam")
        step = state.count + 1
        bias_correction2 = 1 - b2 ** step
        mu_t = b1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        mu_product = state.mu_product * mu_t
        mu_product_next = mu_product * mu_next
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        # sqrt(v / bc2) + eps == (sqrt(v) + eps * s) / s with s = sqrt(bc2): s moves into the terms'
        # coefficients, saving torch's division pass over every parameter.
        s = bias_correction2 ** 0.5
        denom = torch._foreach_sqrt(nu)
        torch._foreach_add_(denom, eps * s)
        out = LazyUpdates(keys, [Term(g, denom, (1.0 - mu_t) * s, 1.0 - mu_product),
                                 Term(mu, denom, mu_next * s, 1.0 - mu_product_next)], owned=True)
        return out, ScaleByNadamState(step, state.mu, state.nu, mu_product)

    kwargs = {"b1": b1, "b2": b2, "eps": eps, "momentum_decay": momentum_decay}
    return GradientTransformation(init, update, TransformInfo("scale_by_nadam", kwargs=kwargs))


class ScaleByRadamState(NamedTuple):
    """State of scale_by_radam: step count, first and second moments."""

    count: int
    mu: dict
    nu: dict


def scale_by_radam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """RAdam's scaling (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond").

    With ``rho_inf = 2 / (1 - b2) - 1`` and ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)`` (the length of the
    approximated simple moving average), the step is the bias-corrected momentum ``m_hat`` alone while
    ``rho_t <= 5`` (the adaptive term's variance is not yet bounded), and afterwards Adam's
    ``m_hat * sqrt(1 - b2^t) / (sqrt(v) + eps)`` times the rectification
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``, as torch ``RAdam``.

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to sqrt(v) (> 0).

    Returns:
        GradientTransformation with a :class:`ScaleByRadamState`.
    """
    b1 = chk.unit_interval("b1", b1, hint="use e.g. betas=(0.9, 0.999)")
    b2 = chk.unit_interval("b2", b2, hint="use e.g. betas=(0.9, 0.999)")
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-8")
    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def init(params):
        return ScaleByRadamState(0, _zeros(params), _zeros(params))

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        mu = _listed(state.mu, keys, "scale_by_radam")
        nu = _listed(state.nu, keys, "scale_by_radam")
        step = state.count + 1
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        bias_correction1 = 1 - b1 ** step
        bias_correction2 = 1 - b2 ** step
        rho_t = rho_inf - 2 * step * (b2 ** step) / bias_correction2
        if rho_t > 5.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            denom = torch._foreach_sqrt(nu)
            torch._foreach_add_(denom, eps)
            term = Term(mu, denom, rect * bias_correction2 ** 0.5, bias_correction1)
        else:
            term = Term(mu, None, 1.0, bias_correction1)
        out = LazyUpdates(keys, [term], owned=False)
        return out, ScaleByRadamState(step, state.mu, state.nu)

    kwargs = {"b1": b1, "b2": b2, "eps": eps}
    return GradientTransformation(init, update, TransformInfo("scale_by_radam", kwargs=kwargs))


class ScaleByAdamaxState(NamedTuple):
    """State of scale_by_adamax: step count, first moment, and the exponentially weighted infinity norm."""

    count: int
    mu: dict
    inf_norm: dict


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adamax's scaling (Kingma & Ba 2015, section 7.1): Adam with the infinity norm in place of the second
    moment, ``u <- max(b2 * u, |g| + eps)`` and the step ``m / ((1 - b1^t) u)``, as torch ``Adamax``.

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the infinity norm, in [0, 1).
        eps: added to |g| (> 0), which keeps u positive.

    Returns:
        GradientTransformation with a :class:`ScaleByAdamaxState`.
    """
    b1 = chk.unit_interval("b1", b1, hint="use e.g. betas=(0.9, 0.999)")
    b2 = chk.unit_interval("b2", b2, hint="use e.g. betas=(0.9, 0.999)")
    eps = chk.positive("eps", eps, hint="use e.g. eps=1e-8")

    def init(params):
        return ScaleByAdamaxState(0, _zeros(params), _zeros(params))

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        mu = _listed(state.mu, keys, "scale_by_adamax")
        u = _listed(state.inf_norm, keys, "scale_by_adamax")
        step = state.count + 1
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_mul_(u, b2)
        magnitude = torch._foreach_abs(g)
        torch._foreach_add_(magnitude, eps)
        torch._foreach_maximum_(u, magnitude)
        out = LazyUpdates(keys, [Term(mu, u, 1.0, 1 - b1 ** step)], owned=False)
        return out, ScaleByAdamaxState(step, state.mu, state.inf_norm)

    kwargs = {"b1": b1, "b2": b2, "eps": eps}
    return GradientTransformation(init, update, TransformInfo("scale_by_adamax", kwargs=kwargs))


class ScaleByLionState(NamedTuple):
    """State of scale_by_lion: step count and the momentum."""

    count: int
    mu: dict


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's update direction (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    ``sign(b1 * m + (1 - b1) * g)``, then ``m <- b2 * m + (1 - b2) * g``.

    Args:
        b1: interpolation used for the update, in [0, 1).
        b2: decay of the momentum, in [0, 1).

    Returns:
        GradientTransformation with a :class:`ScaleByLionState`.
    """
    b1 = chk.unit_interval("b1", b1, hint="use e.g. betas=(0.9, 0.99)")
    b2 = chk.unit_interval("b2", b2, hint="use e.g. betas=(0.9, 0.99)")

    def init(params):
        return ScaleByLionState(0, _zeros(params))

    def update(grads, state, params=None):
        keys, g = tensors(grads)
        mu = _listed(state.mu, keys, "scale_by_lion")
        direction = torch._foreach_lerp(mu, g, 1 - b1)
        torch._foreach_sign_(direction)
        torch._foreach_lerp_(mu, g, 1 - b2)
        out = LazyUpdates(keys, [Term(direction, None, 1.0, 1.0)], owned=True)
        return out, ScaleByLionState(state.count + 1, state.mu)

    kwargs = {"b1": b1, "b2": b2}
    return GradientTransformation(init, update, TransformInfo("scale_by_lion", kwargs=kwargs))
