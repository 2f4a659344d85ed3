"""Named optimizers as short chains of building blocks, their registry, and builders from settings.

Hyperparameter names and defaults follow ``torch.optim``; each optimizer is a chain such as
``scale_by_adam -> decoupled_weight_decay -> scale_by_learning_rate``, and variants (momentum, Nesterov,
AMSGrad, centered, ...) are settings of the blocks, not copies. ``lr`` is a number or a schedule.

Clipping is added by :func:`make_optimizer` / :func:`optimizer_from_args` (``clip_norm``, ``clip_value``,
``agc``) or by hand: ``chain(clip_by_global_norm(1.0), adam(lr=1e-3))``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

from . import _checks as chk
from .base import GradientTransformation, chain
from .clipping import adaptive_grad_clip, clip_by_global_norm, clip_by_value
from .record import record_norms
from ..options import HYPERPARAMETER_BY_NAME, HYPERPARAMETERS, takers
from .schedules import (SCHEDULES, WARMUP_PARAMS, as_schedule, check_schedule_params, inverse_time_decay,
                        make_schedule, one_cycle_momentum)
from .transforms import (
    coupled_weight_decay,
    decoupled_weight_decay,
    scale,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    trace,
)


def _ascent(maximize: bool) -> list[GradientTransformation]:
    return [scale(-1.0)] if chk.boolean("maximize", maximize) else []


def _coupled(weight_decay: float) -> list[GradientTransformation]:
    wd = chk.non_negative("weight_decay", weight_decay, hint="use e.g. weight_decay=1e-4")
    return [coupled_weight_decay(wd)] if wd else []


def _decoupled(weight_decay: float) -> list[GradientTransformation]:
    wd = chk.non_negative("weight_decay", weight_decay, hint="use e.g. weight_decay=1e-2")
    return [decoupled_weight_decay(wd)] if wd else []


def _check_lr(lr: Any) -> Any:
    return as_schedule(lr, "lr") if callable(lr) else chk.non_negative(
        "lr", lr, hint="pass a non-negative number such as 1e-3, or a schedule")


def _betas(betas: Any, hint: str) -> tuple[Any, float]:
    """Check ``(b1, b2)``; b1 may be a schedule (one_cycle_momentum)."""
    if isinstance(betas, (tuple, list)) and len(betas) == 2 and callable(betas[0]):
        return as_schedule(betas[0], "betas[0]"), chk.betas((0.0, betas[1]), hint=hint)[1]
    return chk.betas(betas, hint=hint)


def _momentum(momentum: Any) -> Any:
    if callable(momentum):
        return as_schedule(momentum, "momentum")
    r = HYPERPARAMETER_BY_NAME["momentum"].range  # [0, 1), as the schema declares it
    return chk.number("momentum", momentum, low=r.low, high=r.high, low_open=r.low_open, high_open=r.high_open,
                      hint="use e.g. momentum=0.9")


def _has_momentum(momentum: Any) -> bool:
    return callable(momentum) or momentum > 0.0


def gd(lr=1e-3, maximize: bool = False) -> GradientTransformation:
    """Plain gradient descent, the tutorial's ``theta <- theta - alpha * grad J`` (torch ``SGD()`` with no momentum).

    Args:
        lr: learning rate ``alpha`` (number or schedule).
        maximize: ascend instead of descend.

    Returns:
        ``chain(scale_by_learning_rate(lr))``.
    """
    return chain(*_ascent(maximize), scale_by_learning_rate(_check_lr(lr)))


def sgd(lr=1e-3, momentum=0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        maximize: bool = False) -> GradientTransformation:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum (torch ``SGD``).

    Args:
        lr: learning rate (number or schedule).
        momentum: momentum factor (0 disables; may be a schedule such as one_cycle_momentum).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], [trace], scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    momentum = _momentum(momentum)
    dampening = chk.number("dampening", dampening, low=0.0, high=1.0)
    nesterov = chk.boolean("nesterov", nesterov)
    if nesterov and (not _has_momentum(momentum) or dampening != 0.0):
        raise ValueError(f"nesterov=True needs momentum > 0 and dampening == 0, got momentum={momentum!r}, "
                         f"dampening={dampening!r}")
    parts = _ascent(maximize) + _coupled(weight_decay)
    if _has_momentum(momentum):
        parts.append(trace(momentum, dampening, nesterov))
    return chain(*parts, scale_by_learning_rate(lr))


def rmsprop(lr=1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0, momentum=0.0,
            centered: bool = False, maximize: bool = False) -> GradientTransformation:
    """RMSprop (Hinton 2012), optionally centered (Graves 2013) and with momentum (torch ``RMSprop``).

    Args:
        lr: learning rate (number or schedule).
        alpha: smoothing constant.
        eps: denominator term.
        weight_decay: L2 penalty added to the gradient.
        momentum: momentum on the scaled gradient (0 disables).
        centered: normalise by the estimated variance instead of the second moment.
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], scale_by_rms, [trace], scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    momentum = _momentum(momentum)
    parts = _ascent(maximize) + _coupled(weight_decay) + [scale_by_rms(alpha, eps, centered)]
    if _has_momentum(momentum):
        parts.append(trace(momentum))
    return chain(*parts, scale_by_learning_rate(lr))


def adagrad(lr=1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
            eps: float = 1e-10, maximize: bool = False) -> GradientTransformation:
    """Adagrad (Duchi, Hazan & Singer 2011), torch ``Adagrad``.

    Args:
        lr: learning rate (number or schedule).
        lr_decay: inverse-time decay of the rate, ``lr / (1 + t * lr_decay)``.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: starting sum of squares.
        eps: denominator term.
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], scale_by_adagrad, scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    lr_decay = chk.non_negative("lr_decay", lr_decay)
    rate = inverse_time_decay(lr, lr_decay) if lr_decay else lr
    parts = _ascent(maximize) + _coupled(weight_decay) + [scale_by_adagrad(eps, initial_accumulator_value)]
    return chain(*parts, scale_by_learning_rate(rate))


def adadelta(lr=1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0,
             maximize: bool = False) -> GradientTransformation:
    """Adadelta (Zeiler 2012), torch ``Adadelta``.

    Args:
        lr: coefficient that scales the step (number or schedule).
        rho: decay of the running averages.
        eps: term inside the square roots.
        weight_decay: L2 penalty added to the gradient.
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], scale_by_adadelta, scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    parts = _ascent(maximize) + _coupled(weight_decay) + [scale_by_adadelta(rho, eps)]
    return chain(*parts, scale_by_learning_rate(lr))


def adam(lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
         maximize: bool = False) -> GradientTransformation:
    """Adam (Kingma & Ba 2015) with optional AMSGrad, torch ``Adam`` (``weight_decay`` is the coupled L2).

    Args:
        lr: learning rate (number or schedule).
        betas: decays of the first and second moments (betas[0] may be a schedule).
        eps: denominator term.
        weight_decay: L2 penalty added to the gradient.
        amsgrad: use the running maximum of the second moment.
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], scale_by_adam, scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    b1, b2 = _betas(betas, "use e.g. betas=(0.9, 0.999)")
    parts = _ascent(maximize) + _coupled(weight_decay) + [scale_by_adam(b1, b2, eps, amsgrad)]
    return chain(*parts, scale_by_learning_rate(lr))


def adamw(lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
          maximize: bool = False) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019), torch ``AdamW``.

    Args:
        lr: learning rate (number or schedule).
        betas: decays of the first and second moments (betas[0] may be a schedule).
        eps: denominator term.
        weight_decay: decoupled decay; each step multiplies the weights by ``1 - lr * weight_decay``.
        amsgrad: use the running maximum of the second moment.
        maximize: ascend instead of descend.

    Returns:
        ``chain(scale_by_adam, [decoupled_weight_decay], scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    b1, b2 = _betas(betas, "use e.g. betas=(0.9, 0.999)")
    parts = _ascent(maximize) + [scale_by_adam(b1, b2, eps, amsgrad)] + _decoupled(weight_decay)
    return chain(*parts, scale_by_learning_rate(lr))


def nadam(lr=2e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
          decoupled_weight_decay: bool = False, maximize: bool = False) -> GradientTransformation:
    """NAdam (Dozat 2016), torch ``NAdam``.

    Args:
        lr: learning rate (number or schedule).
        betas: decays of the first and second moments.
        eps: denominator term.
        weight_decay: weight decay, coupled (L2) unless ``decoupled_weight_decay``.
        momentum_decay: speed of the momentum schedule.
        decoupled_weight_decay: decay the weights AdamW-style.
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], scale_by_nadam, [decoupled_weight_decay], scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    b1, b2 = chk.betas(betas, hint="use e.g. betas=(0.9, 0.999)")
    decoupled = chk.boolean("decoupled_weight_decay", decoupled_weight_decay)
    parts = _ascent(maximize) + ([] if decoupled else _coupled(weight_decay))
    parts += [scale_by_nadam(b1, b2, eps, momentum_decay)] + (_decoupled(weight_decay) if decoupled else [])
    return chain(*parts, scale_by_learning_rate(lr))


def radam(lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
          decoupled_weight_decay: bool = False, maximize: bool = False) -> GradientTransformation:
    """RAdam (Liu et al. 2020): Adam whose adaptive term is switched on, and rectified, only once its
    variance is bounded; torch ``RAdam``.

    Args:
        lr: learning rate (number or schedule).
        betas: decays of the first and second moments.
        eps: denominator term.
        weight_decay: weight decay, coupled (L2) unless ``decoupled_weight_decay``.
        decoupled_weight_decay: decay the weights AdamW-style.
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], scale_by_radam, [decoupled_weight_decay], scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    b1, b2 = chk.betas(betas, hint="use e.g. betas=(0.9, 0.999)")
    decoupled = chk.boolean("decoupled_weight_decay", decoupled_weight_decay)
    parts = _ascent(maximize) + ([] if decoupled else _coupled(weight_decay))
    parts += [scale_by_radam(b1, b2, eps)] + (_decoupled(weight_decay) if decoupled else [])
    return chain(*parts, scale_by_learning_rate(lr))


def adamax(lr=2e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
           maximize: bool = False) -> GradientTransformation:
    """Adamax (Kingma & Ba 2015, section 7.1): Adam with an infinity-norm second moment; torch ``Adamax``.

    Args:
        lr: learning rate (number or schedule).
        betas: decays of the first moment and of the infinity norm.
        eps: added to |grad| before the maximum.
        weight_decay: L2 penalty added to the gradient.
        maximize: ascend instead of descend.

    Returns:
        ``chain([coupled_weight_decay], scale_by_adamax, scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    b1, b2 = chk.betas(betas, hint="use e.g. betas=(0.9, 0.999)")
    parts = _ascent(maximize) + _coupled(weight_decay) + [scale_by_adamax(b1, b2, eps)]
    return chain(*parts, scale_by_learning_rate(lr))


def lion(lr=1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, maximize: bool = False) -> GradientTransformation:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
    interpolated momentum, with decoupled weight decay. torch.optim has no Lion.

    Args:
        lr: learning rate (number or schedule); typically 3-10x smaller than AdamW's.
        betas: ``(b1, b2)``: interpolation for the update, decay of the momentum.
        weight_decay: decoupled decay (typically 3-10x larger than AdamW's).
        maximize: ascend instead of descend.

    Returns:
        ``chain(scale_by_lion, [decoupled_weight_decay], scale_by_learning_rate)``.
    """
    lr = _check_lr(lr)
    b1, b2 = chk.betas(betas, hint="use e.g. betas=(0.9, 0.99)")
    parts = _ascent(maximize) + [scale_by_lion(b1, b2)] + _decoupled(weight_decay)
    return chain(*parts, scale_by_learning_rate(lr))


# ----- registry ----------------------------------------------------------------------------------------

class OptimizerEntry(NamedTuple):
    """Registry row: the builder, its default hyperparameters, and a one-line description."""

    builder: Callable[..., GradientTransformation]
    defaults: dict[str, Any]
    description: str


def _defaults(fn: Callable) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


_DESCRIPTIONS = {
    "gd": (gd, "plain gradient descent: theta <- theta - lr * grad"),
    "sgd": (sgd, "SGD with heavy-ball/Nesterov momentum, dampening, L2 weight decay"),
    "rmsprop": (rmsprop, "divide by a running RMS of gradients; centered and momentum variants"),
    "adagrad": (adagrad, "divide by the root of the sum of all squared gradients"),
    "adadelta": (adadelta, "Adagrad's successor with unit-consistent steps and no decay schedule"),
    "adam": (adam, "bias-corrected first/second moments; AMSGrad variant; L2 weight decay"),
    "adamw": (adamw, "Adam with decoupled weight decay"),
    "nadam": (nadam, "Adam with Nesterov momentum and a momentum-decay schedule"),
    "radam": (radam, "Adam with the adaptive term rectified, and off while its variance is unbounded"),
    "adamax": (adamax, "Adam with an infinity-norm second moment"),
    "lion": (lion, "sign of interpolated momentum (Chen et al. 2023); decoupled weight decay"),
}

OPTIMIZERS: dict[str, OptimizerEntry] = {
    name: OptimizerEntry(fn, _defaults(fn), text) for name, (fn, text) in _DESCRIPTIONS.items()
}

_CLIP_KEYS = ("clip_norm", "clip_value", "agc", "agc_exclude", "record")


def _unknown_name(name: Any) -> ValueError:
    return ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def _clipping(clip_norm=None, clip_value=None, agc=None, agc_exclude=()) -> list[GradientTransformation]:
    parts = []
    if clip_value is not None:
        parts.append(clip_by_value(chk.positive("clip_value", clip_value, hint="use e.g. clip_value=1.0")))
    if agc is not None:
        parts.append(adaptive_grad_clip(chk.positive("agc", agc, hint="use e.g. agc=0.01"), exclude=agc_exclude))
    if clip_norm is not None:
        parts.append(clip_by_global_norm(chk.positive("clip_norm", clip_norm, hint="use e.g. clip_norm=1.0")))
    return parts


def make_optimizer(name: str, *, clip_norm: float | None = None, clip_value: float | None = None,
                   agc: float | None = None, agc_exclude=(), record: bool = False,
                   **hyperparams) -> GradientTransformation:
    """Build a named optimizer, with optional clipping in front and optional recording around it.

    Clipping runs in this order: ``clip_by_value`` (``clip_value``), ``adaptive_grad_clip`` (``agc``), then
    ``clip_by_global_norm`` (``clip_norm``), so the global bound holds for the gradients the optimizer sees.

    Args:
        name: one of ``OPTIMIZERS``: gd, sgd, rmsprop, adagrad, adadelta, adam, adamw, nadam, radam, adamax, lion.
        clip_norm: global-norm bound, or None.
        clip_value: element bound, or None.
        agc: AGC ratio (Brock et al. 2021), or None.
        agc_exclude: parameter names AGC leaves alone.
        record: wrap in :func:`record_norms` (gradient norm before clipping, clip flag, update norm).
        **hyperparams: the optimizer's hyperparameters, named as in torch.optim (``lr``, ``betas``, ...).

    Returns:
        The GradientTransformation.
    """
    if name not in OPTIMIZERS:
        raise _unknown_name(name)
    entry = OPTIMIZERS[name]
    unknown = sorted(set(hyperparams) - set(entry.defaults))
    if unknown:
        raise ValueError(f"{name} does not take {', '.join(unknown)}; its hyperparameters are "
                         f"{', '.join(entry.defaults)} (plus {', '.join(_CLIP_KEYS)})")
    tx = chain(*_clipping(clip_norm, clip_value, agc, agc_exclude), entry.builder(**hyperparams))
    return record_norms(tx) if chk.boolean("record", record) else tx


def _resolve_epochs(params: dict, allowed: dict, steps_per_epoch: int | None, schedule: str) -> dict:
    out = {}
    for key, value in params.items():
        if not key.endswith("_epochs"):
            out[key] = value
            continue
        base = key[: -len("_epochs")]
        target = base if base in allowed else f"{base}_steps"
        if target not in allowed:
            raise ValueError(f"schedule {schedule!r} has no parameter matching {key!r}; its parameters are: "
                             f"{', '.join(allowed)}")
        if steps_per_epoch is None:
            raise ValueError(f"{key} is given in epochs, so steps_per_epoch is needed, got None")
        if isinstance(value, (list, tuple)):
            out[target] = [int(round(v * steps_per_epoch)) for v in value]
        else:
            out[target] = int(round(value * steps_per_epoch))
    return out


def optimizer_from_args(name: str, lr, *, schedule=None, schedule_params=None, total_steps=None,
                        steps_per_epoch=None, record: bool = True, source: str | None = None,
                        **hyperparams) -> GradientTransformation:
    """Build the full optimizer from command-line style settings: clipping, recording, optimizer, schedule.

    The result is ``record_norms(chain(clip_by_value, adaptive_grad_clip, clip_by_global_norm, <optimizer>))``
    with the parts whose settings are None left out and the schedule as the optimizer's ``lr``.
    The settings are those of the schema, ``convdescent.options.HYPERPARAMETERS`` (momentum, nesterov,
    weight_decay, betas, eps, clip_norm, clip_value, agc), each checked against its declared range there.
    Settings left None take the optimizer's torch default; giving one the optimizer does not have
    (e.g. ``momentum`` for adam) is an error.

    Args:
        name: optimizer name (see ``OPTIMIZERS``).
        lr: base learning rate (peak for one_cycle).
        schedule: schedule name (see ``SCHEDULES``) or None for a constant rate.
        schedule_params: the schedule's parameters; a key ``X_epochs`` gives ``X`` (or ``X_steps``) in epochs,
            converted with ``steps_per_epoch``; ``warmup_steps``/``warmup_epochs`` add a warm-up;
            for one_cycle, ``cycle_momentum=True`` also cycles momentum / betas[0] (torch's default).
        total_steps: the run's number of updates; the default length of cosine, polynomial and one_cycle.
        steps_per_epoch: updates per epoch, for ``*_epochs`` parameters.
        record: wrap in :func:`record_norms`.
        source: where the settings came from, named in range errors (a file; None: arguments).
        **hyperparams: the schema's settings by name (None: not given).

    Returns:
        The GradientTransformation.

    Raises:
        ValueError: an unknown optimizer, schedule or setting, a setting the optimizer lacks, or a value out
            of its range (``OptionRangeError``, naming the setting and the value).
    """
    unknown = sorted(set(hyperparams) - set(HYPERPARAMETER_BY_NAME))
    if unknown:
        raise ValueError(f"optimizer_from_args does not take {', '.join(unknown)}; its settings are "
                         f"{', '.join(HYPERPARAMETER_BY_NAME)}")
    if name not in OPTIMIZERS:
        raise _unknown_name(name)
    entry = OPTIMIZERS[name]
    if total_steps is not None:
        total_steps = chk.integer("total_steps", total_steps, low=1)
    if steps_per_epoch is not None:
        steps_per_epoch = chk.integer("steps_per_epoch", steps_per_epoch, low=1)
    hp: dict[str, Any] = {}
    clipping: dict[str, Any] = {}
    lr_value = HYPERPARAMETER_BY_NAME["lr"].check(lr, source)
    for h in HYPERPARAMETERS:
        value = hyperparams.get(h.name)
        if h.name == "lr" or value is None:
            continue
        value = h.check(value, source)
        if not h.applies:
            clipping[h.name] = value
        elif not h.applies_to(name):
            raise ValueError(f"{h.name}={value!r} does not apply to {name}; it applies to "
                             f"{', '.join(takers(h.name, OPTIMIZERS))}")
        else:
            hp[h.name] = tuple(value) if isinstance(value, list) else value
    if schedule is None or schedule == "constant":
        if schedule_params and any(k not in ("warmup_steps", "warmup_epochs", "warmup_kind", "warmup_start_factor")
                                   for k in schedule_params):
            raise ValueError(f"schedule_params {schedule_params!r} given without a schedule; pass schedule=...")
    params = dict(schedule_params or {})
    sched_name = schedule or "constant"
    if sched_name not in SCHEDULES:
        raise ValueError(f"unknown schedule {sched_name!r}; choose one of: {', '.join(SCHEDULES)}")
    check_schedule_params(sched_name, params, source)
    cycle = chk.boolean("cycle_momentum", params.pop("cycle_momentum", False))
    if cycle and sched_name != "one_cycle":
        raise ValueError(f"cycle_momentum applies to the one_cycle schedule, got schedule={sched_name!r}")
    allowed = dict(SCHEDULES[sched_name].defaults)
    allowed.update({p.name: None for p in WARMUP_PARAMS})
    params = _resolve_epochs(params, allowed, steps_per_epoch, sched_name)
    for length_key in ("decay_steps", "total_steps"):
        if length_key in SCHEDULES[sched_name].defaults and length_key not in params and total_steps is not None:
            params[length_key] = total_steps - params.get("warmup_steps", 0)
    if sched_name == "constant" and not params.get("warmup_steps"):
        lr_sched: Any = lr_value
    else:
        lr_sched = make_schedule(sched_name, lr_value, **params)
    if cycle:
        mom = one_cycle_momentum(params["total_steps"], params.get("pct_start", 0.3),
                                 params.get("anneal_strategy", "cos"), three_phase=params.get("three_phase", False))
        if "momentum" in entry.defaults and name != "gd":
            if hyperparams.get("momentum") is not None:
                raise ValueError("cycle_momentum=True sets the momentum itself; leave momentum unset")
            hp["momentum"] = mom
        elif name in ("adam", "adamw"):
            b2 = (hp.get("betas") or entry.defaults["betas"])[1]
            hp["betas"] = (mom, b2)
        else:
            raise ValueError(f"cycle_momentum=True needs an optimizer with momentum or betas[0] to cycle "
                             f"(sgd, rmsprop, adam, adamw), got {name!r}")
    tx = chain(*_clipping(**clipping), entry.builder(lr=lr_sched, **hp))
    return record_norms(tx) if chk.boolean("record", record) else tx


def _fmt_defaults(defaults: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" if v is not None else f"{k}=<required>" for k, v in defaults.items())


def list_optimizers_text() -> str:
    """A plain-text table of the named optimizers and schedules: name, defaults, description.

    Returns:
        The table, lines joined with newlines.
    """
    lines = ["Optimizers (make_optimizer(name, **hyperparams); clipping: clip_norm, clip_value, agc)", ""]
    rows = [(n, _fmt_defaults(e.defaults), e.description) for n, e in OPTIMIZERS.items()]
    lines += _table(("name", "defaults", "description"), rows)
    lines += ["", "Settings (flags of convdescent train, TOML keys; checked against these ranges)", ""]
    rows = [(h.name, f"{h.range.text() if h.range else 'true or false'}; "
                     f"{', '.join(h.applies) if h.applies else 'every optimizer'}", h.help) for h in HYPERPARAMETERS]
    lines += _table(("name", "range; applies to", "meaning"), rows)
    lines += ["", "Schedules (make_schedule(name, base_lr, **params); any schedule takes warmup_steps)", ""]
    rows = [(n, _fmt_defaults(e.defaults), e.description) for n, e in SCHEDULES.items()]
    lines += _table(("name", "parameters", "description"), rows)
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], width: int = 100) -> list[str]:
    """Rows as columns within ``width`` characters; the last two columns wrap onto further lines."""
    import textwrap

    first = max(len(r[0]) for r in [header, *rows])
    room = width - first - 4
    natural = [max(len(r[i]) for r in [header, *rows]) for i in (1, 2)]
    if sum(natural) <= room:
        widths = natural
    else:  # share the room, giving the shorter column what it needs when it needs less than half
        second = min(natural[0], max(room // 2, room - natural[1]))
        widths = [second, room - second]
    out = [f"{header[0]:<{first}}  {header[1]:<{widths[0]}}  {header[2]}".rstrip(),
           f"{'-' * first}  {'-' * widths[0]}  {'-' * widths[1]}"]
    for r in rows:
        a = textwrap.wrap(r[1], widths[0], break_on_hyphens=False) or [""]
        b = textwrap.wrap(r[2], widths[1], break_on_hyphens=False) or [""]
        for i in range(max(len(a), len(b))):
            name = r[0] if i == 0 else ""
            left = a[i] if i < len(a) else ""
            right = b[i] if i < len(b) else ""
            out.append(f"{name:<{first}}  {left:<{widths[0]}}  {right}".rstrip())
    return out
