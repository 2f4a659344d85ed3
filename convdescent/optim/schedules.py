"""Learning-rate schedules: callables ``step -> float`` (plain Python math, no tensors).

Each named schedule is declared once, in ``SCHEDULE_SPECS`` (its builder function, and each parameter's type,
range and meaning; the defaults are the function's). The registry ``SCHEDULES``, ``make_schedule``'s checks,
the configuration's checks of ``schedule_params`` and the schedule flags of ``convdescent train`` come
from it.

``step`` counts the updates already made, so update number ``t`` (0-based) uses ``schedule(t)``.
That is the value ``torch.optim.lr_scheduler`` gives after ``t`` calls to ``scheduler.step()``, and the
tests check each schedule against its torch counterpart step by step. Schedules are small objects
with a readable ``repr`` (used by ``describe``) and ``get_config()``; :class:`ReduceOnPlateau` is the one
whose value depends on a metric, and it saves and restores its state.
"""

from __future__ import annotations

import abc
import bisect
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from ..options import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, UNIT, Param, Range
from . import _checks as chk


class Schedule(abc.ABC):
    """Base class: a learning-rate schedule, called as ``schedule(step) -> float``.

    Subclasses set ``name`` (the builder shown by ``repr``) and ``_config`` (its arguments).
    """

    name = "schedule"
    _config: dict[str, Any] = {}

    @abc.abstractmethod
    def __call__(self, step: int) -> float:
        """The value for update number ``step`` (0-based)."""

    def get_config(self) -> dict[str, Any]:
        """The arguments that rebuild this schedule with its builder function."""
        return dict(self._config)

    def children(self) -> tuple["Schedule", ...]:
        """Schedules this one wraps."""
        return ()

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"{self.name}({parts})"


def _step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a schedule's step must be a non-negative integer, got {step!r}")
    return step


def _value(name: str, value: Any) -> float:
    return chk.non_negative(name, value, hint="learning rates are non-negative")


def as_schedule(value: Any, name: str = "lr") -> Callable[[int], float]:
    """Turn a number or a schedule into a schedule, checking it.

    Args:
        value: a non-negative number, a :class:`Schedule`, or any callable ``int -> float``.
        name: the argument's name for error messages.

    Returns:
        A callable ``step -> float``.
    """
    if isinstance(value, Schedule):
        return value
    if callable(value):
        probe = value(0)
        if isinstance(probe, bool) or not isinstance(probe, (int, float)):
            raise ValueError(f"{name} schedule must return a number, got {probe!r} at step 0")
        return value
    return constant_schedule(chk.non_negative(
        name, value, hint="pass a non-negative number such as 1e-3, or a schedule"))


# ----- step-driven schedules ---------------------------------------------------------------------------

class _Constant(Schedule):
    name = "constant_schedule"

    def __init__(self, value):
        self.value = _value("value", value)
        self._config = {"value": self.value}

    def __call__(self, step):
        _step(step)
        return self.value


def constant_schedule(value: float) -> Schedule:
    """A constant learning rate.

    Args:
        value: the learning rate.

    Returns:
        Schedule with ``schedule(t) = value``.
    """
    return _Constant(value)


class _StepDecay(Schedule):
    name = "step_decay"

    def __init__(self, init_value, step_size, gamma):
        self.init_value = _value("init_value", init_value)
        self.step_size = chk.integer("step_size", step_size, low=1)
        self.gamma = chk.non_negative("gamma", gamma)
        self._config = {"init_value": self.init_value, "step_size": self.step_size, "gamma": self.gamma}

    def __call__(self, step):
        return self.init_value * self.gamma ** (_step(step) // self.step_size)


def step_decay(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps (torch ``StepLR``).

    Args:
        init_value: the learning rate at step 0.
        step_size: steps between decays.
        gamma: the decay factor.

    Returns:
        Schedule with ``schedule(t) = init_value * gamma ** (t // step_size)``.
    """
    return _StepDecay(init_value, step_size, gamma)


class _MultiStepDecay(Schedule):
    name = "multistep_decay"

    def __init__(self, init_value, milestones, gamma):
        self.init_value = _value("init_value", init_value)
        if not isinstance(milestones, (list, tuple)) or not milestones:
            raise ValueError(f"milestones must be a non-empty list of step numbers, got {milestones!r}")
        ms = [chk.integer("milestones", m, low=1) for m in milestones]
        if ms != sorted(ms):
            raise ValueError(f"milestones must be increasing, got {list(milestones)!r}")
        self.milestones = tuple(ms)
        self.gamma = chk.non_negative("gamma", gamma)
        self._config = {"init_value": self.init_value, "milestones": self.milestones, "gamma": self.gamma}

    def __call__(self, step):
        return self.init_value * self.gamma ** bisect.bisect_right(self.milestones, _step(step))


def multistep_decay(init_value: float, milestones, gamma: float = 0.1) -> Schedule:
    """Multiply the learning rate by ``gamma`` at each milestone step (torch ``MultiStepLR``).

    Args:
        init_value: the learning rate at step 0.
        milestones: increasing step numbers.
        gamma: the decay factor.

    Returns:
        Schedule with ``schedule(t) = init_value * gamma ** (number of milestones <= t)``.
    """
    return _MultiStepDecay(init_value, milestones, gamma)


class _ExponentialDecay(Schedule):
    name = "exponential_decay"

    def __init__(self, init_value, gamma, every):
        self.init_value = _value("init_value", init_value)
        self.gamma = chk.non_negative("gamma", gamma)
        self.every = chk.integer("every", every, low=1)
        self._config = {"init_value": self.init_value, "gamma": self.gamma, "every": self.every}

    def __call__(self, step):
        return self.init_value * self.gamma ** (_step(step) / self.every)


def exponential_decay(init_value: float, gamma: float, every: int = 1) -> Schedule:
    """Decay smoothly by ``gamma`` per ``every`` steps (torch ``ExponentialLR`` when ``every=1``).

    Args:
        init_value: the learning rate at step 0.
        gamma: the factor per ``every`` steps.
        every: steps over which the rate shrinks by ``gamma`` (e.g. the steps in one epoch).

    Returns:
        Schedule with ``schedule(t) = init_value * gamma ** (t / every)``.
    """
    return _ExponentialDecay(init_value, gamma, every)


class _InverseTimeDecay(Schedule):
    name = "inverse_time_decay"

    def __init__(self, init_value, decay_rate, decay_steps, staircase):
        self.inner = init_value if callable(init_value) else None
        self.init_value = init_value if self.inner is not None else _value("init_value", init_value)
        self.decay_rate = chk.non_negative("decay_rate", decay_rate)
        self.decay_steps = chk.integer("decay_steps", decay_steps, low=1)
        self.staircase = chk.boolean("staircase", staircase)
        self._config = {"init_value": self.init_value, "decay_rate": self.decay_rate,
                        "decay_steps": self.decay_steps, "staircase": self.staircase}

    def children(self):
        return (self.inner,) if isinstance(self.inner, Schedule) else ()

    def __call__(self, step):
        t = _step(step)
        base = self.inner(t) if self.inner is not None else self.init_value
        if self.decay_steps == 1:
            ratio = t
        else:
            ratio = t // self.decay_steps if self.staircase else t / self.decay_steps
        return base / (1 + ratio * self.decay_rate)


def inverse_time_decay(init_value, decay_rate: float, decay_steps: int = 1, staircase: bool = False) -> Schedule:
    """Inverse-time decay ``init / (1 + decay_rate * t / decay_steps)`` (Adagrad's ``lr_decay``).

    Args:
        init_value: the learning rate at step 0, or a schedule to divide.
        decay_rate: how fast the rate falls.
        decay_steps: steps per unit of decay.
        staircase: use ``t // decay_steps`` (whole units) instead of ``t / decay_steps``.

    Returns:
        The schedule.
    """
    return _InverseTimeDecay(init_value, decay_rate, decay_steps, staircase)


class _PolynomialDecay(Schedule):
    name = "polynomial_decay"

    def __init__(self, init_value, total_steps, power, end_value):
        self.init_value = _value("init_value", init_value)
        self.total_steps = chk.integer("total_steps", total_steps, low=1)
        self.power = chk.non_negative("power", power)
        self.end_value = _value("end_value", end_value)
        self._config = {"init_value": self.init_value, "total_steps": self.total_steps,
                        "power": self.power, "end_value": self.end_value}

    def __call__(self, step):
        t = min(_step(step), self.total_steps)
        frac = (1.0 - t / self.total_steps) ** self.power
        if self.end_value == 0.0:
            return self.init_value * frac
        return (self.init_value - self.end_value) * frac + self.end_value


def polynomial_decay(init_value: float, total_steps: int, power: float = 1.0, end_value: float = 0.0) -> Schedule:
    """Polynomial decay from ``init_value`` to ``end_value`` over ``total_steps`` (torch ``PolynomialLR``).

    Args:
        init_value: the learning rate at step 0.
        total_steps: steps until ``end_value`` is reached (held afterwards).
        power: the polynomial's power (1 is linear).
        end_value: the final learning rate.

    Returns:
        Schedule with ``(init - end) * (1 - min(t, T) / T) ** power + end``.
    """
    return _PolynomialDecay(init_value, total_steps, power, end_value)


class _CosineDecay(Schedule):
    name = "cosine_decay"

    def __init__(self, init_value, decay_steps, alpha):
        self.init_value = _value("init_value", init_value)
        self.decay_steps = chk.integer("decay_steps", decay_steps, low=1)
        self.alpha = chk.unit_interval("alpha", alpha, closed_high=True)
        self._config = {"init_value": self.init_value, "decay_steps": self.decay_steps, "alpha": self.alpha}

    def __call__(self, step):
        t = min(_step(step), self.decay_steps)
        eta_min = self.alpha * self.init_value
        return eta_min + (self.init_value - eta_min) * (1 + math.cos(math.pi * t / self.decay_steps)) / 2


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine annealing (Loshchilov & Hutter 2017) from ``init_value`` to ``alpha * init_value``.

    Matches torch ``CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * init_value)`` up to
    ``decay_steps``; after that it holds the final value (torch's curve would rise again).

    Args:
        init_value: the learning rate at step 0.
        decay_steps: steps of the half cosine.
        alpha: the final value as a fraction of ``init_value``.

    Returns:
        The schedule.
    """
    return _CosineDecay(init_value, decay_steps, alpha)


class _CosineRestarts(Schedule):
    name = "cosine_restarts"

    def __init__(self, init_value, first_period, period_mult, alpha):
        self.init_value = _value("init_value", init_value)
        self.first_period = chk.integer("first_period", first_period, low=1)
        self.period_mult = chk.integer("period_mult", period_mult, low=1)
        self.alpha = chk.unit_interval("alpha", alpha, closed_high=True)
        self._config = {"init_value": self.init_value, "first_period": self.first_period,
                        "period_mult": self.period_mult, "alpha": self.alpha}

    def __call__(self, step):
        t = _step(step)
        period = self.first_period
        if self.period_mult == 1:
            t_cur = t % period
        else:
            # Whole periods are skipped with integer arithmetic so long runs stay O(log t).
            while t >= period:
                t -= period
                period *= self.period_mult
            t_cur = t
        eta_min = self.alpha * self.init_value
        return eta_min + (self.init_value - eta_min) * (1 + math.cos(math.pi * t_cur / period)) / 2


def cosine_restarts(init_value: float, first_period: int, period_mult: int = 1, alpha: float = 0.0) -> Schedule:
    """Cosine annealing with warm restarts, SGDR (Loshchilov & Hutter 2017); torch
    ``CosineAnnealingWarmRestarts(T_0=first_period, T_mult=period_mult, eta_min=alpha * init_value)``.

    Args:
        init_value: the learning rate at each restart.
        first_period: steps in the first cycle.
        period_mult: each cycle is this many times longer than the previous.
        alpha: the minimum as a fraction of ``init_value``.

    Returns:
        The schedule.
    """
    return _CosineRestarts(init_value, first_period, period_mult, alpha)


class _Warmup(Schedule):
    name = "warmup"

    def __init__(self, schedule, warmup_steps, kind, start_factor):
        self.schedule = as_schedule(schedule, "schedule")
        self.warmup_steps = chk.integer("warmup_steps", warmup_steps, low=1)
        self.kind = chk.choice("kind", kind, ("linear", "cosine"))
        self.start_factor = chk.unit_interval("start_factor", start_factor, closed_high=True)
        self._config = {"schedule": self.schedule, "warmup_steps": self.warmup_steps,
                        "kind": self.kind, "start_factor": self.start_factor}

    def children(self):
        return (self.schedule,) if isinstance(self.schedule, Schedule) else ()

    def __call__(self, step):
        t = _step(step)
        if t >= self.warmup_steps:
            return self.schedule(t - self.warmup_steps)
        s = self.start_factor
        if self.kind == "linear":
            factor = s + (1.0 - s) * t / self.warmup_steps
        else:
            factor = s + (1.0 - s) * (1.0 - math.cos(math.pi * t / self.warmup_steps)) / 2
        return self.schedule(0) * factor


def warmup(schedule, warmup_steps: int, kind: str = "linear", start_factor: float = 0.0) -> Schedule:
    """Warm up into another schedule: ramp from ``start_factor * schedule(0)`` to ``schedule(0)`` over
    ``warmup_steps``, then follow ``schedule`` from its step 0 (torch ``LinearLR`` + ``SequentialLR``).

    Args:
        schedule: the schedule (or constant) to warm up into.
        warmup_steps: length of the ramp.
        kind: ``"linear"`` or ``"cosine"`` (half-cosine ramp).
        start_factor: the fraction of ``schedule(0)`` used at step 0.

    Returns:
        The schedule.
    """
    return _Warmup(schedule, warmup_steps, kind, start_factor)


class _OneCycle(Schedule):
    name = "one_cycle"

    def __init__(self, max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor,
                 three_phase):
        self.max_lr = _value("max_lr", max_lr)
        self.div_factor = chk.positive("div_factor", div_factor)
        self.final_div_factor = chk.positive("final_div_factor", final_div_factor)
        self._setup(total_steps, pct_start, anneal_strategy, three_phase)
        self._config = {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                        "anneal_strategy": self.anneal_strategy, "div_factor": self.div_factor,
                        "final_div_factor": self.final_div_factor, "three_phase": self.three_phase}
        initial = self.max_lr / self.div_factor
        self._build_phases(initial, self.max_lr, initial / self.final_div_factor)

    def _setup(self, total_steps, pct_start, anneal_strategy, three_phase):
        self.total_steps = chk.integer("total_steps", total_steps, low=2)
        self.pct_start = chk.number("pct_start", pct_start, low=0.0, high=1.0, low_open=True, high_open=True)
        self.anneal_strategy = chk.choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        self.three_phase = chk.boolean("three_phase", three_phase)

    def _build_phases(self, start, peak, last):
        # Phase ends are torch.optim.lr_scheduler.OneCycleLR's, float for all but the last.
        n = self.total_steps
        if self.three_phase:
            self._phases = [(float(self.pct_start * n) - 1, start, peak),
                            (float(2 * self.pct_start * n) - 2, peak, start),
                            (n - 1, start, last)]
        else:
            self._phases = [(float(self.pct_start * n) - 1, start, peak),
                            (n - 1, peak, last)]
        starts = [0.0] + [p[0] for p in self._phases[:-1]]
        for (end, _, _), begin in zip(self._phases, starts):
            if not end > begin:
                raise ValueError(
                    f"{self.name}: pct_start={self.pct_start} with total_steps={n} leaves an empty phase; "
                    "use more total_steps or a pct_start further from 0 and 1")

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def __call__(self, step):
        t = min(_step(step), self.total_steps - 1)
        start_step = 0.0
        for i, (end_step, lo, hi) in enumerate(self._phases):
            if t <= end_step or i == len(self._phases) - 1:
                return self._anneal(lo, hi, (t - start_step) / (end_step - start_step))
            start_step = end_step
        raise AssertionError("unreachable: the last phase always matches")


class _OneCycleMomentum(_OneCycle):
    name = "one_cycle_momentum"

    def __init__(self, total_steps, pct_start, anneal_strategy, base_momentum, max_momentum, three_phase):
        self.base_momentum = chk.unit_interval("base_momentum", base_momentum, closed_high=True)
        self.max_momentum = chk.unit_interval("max_momentum", max_momentum, closed_high=True)
        self._setup(total_steps, pct_start, anneal_strategy, three_phase)
        self._config = {"total_steps": self.total_steps, "pct_start": self.pct_start,
                        "anneal_strategy": self.anneal_strategy, "base_momentum": self.base_momentum,
                        "max_momentum": self.max_momentum, "three_phase": self.three_phase}
        self._build_phases(self.max_momentum, self.base_momentum, self.max_momentum)


def one_cycle(max_lr: float, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
              div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False) -> Schedule:
    """The 1cycle policy (Smith & Topin 2019, "Super-convergence"); torch ``OneCycleLR``.

    Rises from ``max_lr / div_factor`` to ``max_lr`` over ``pct_start`` of the run, then anneals to
    ``max_lr / div_factor / final_div_factor``; steps past ``total_steps`` hold the final value. Pair it
    with :func:`one_cycle_momentum` for the momentum half of the policy.

    Args:
        max_lr: the peak learning rate.
        total_steps: the number of updates in the run.
        pct_start: fraction of the run spent rising.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: initial = max_lr / div_factor.
        final_div_factor: final = initial / final_div_factor.
        three_phase: fall back to the initial value before the final annealing (fast.ai style).

    Returns:
        The schedule.
    """
    return _OneCycle(max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor, three_phase)


def one_cycle_momentum(total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
                       base_momentum: float = 0.85, max_momentum: float = 0.95,
                       three_phase: bool = False) -> Schedule:
    """The momentum half of the 1cycle policy (Smith & Topin 2019): momentum falls from
    ``max_momentum`` to ``base_momentum`` while the rate rises, then climbs back (torch ``OneCycleLR``
    with ``cycle_momentum=True``). Use it as SGD's ``momentum`` or Adam's ``betas[0]``.

    Args:
        total_steps: the number of updates in the run (as for :func:`one_cycle`).
        pct_start: fraction of the run spent with falling momentum.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        base_momentum: the lowest momentum, reached at the learning-rate peak.
        max_momentum: the momentum at the start and end.
        three_phase: follow one_cycle's three-phase shape.

    Returns:
        The schedule of the momentum factor.
    """
    return _OneCycleMomentum(total_steps, pct_start, anneal_strategy, base_momentum, max_momentum, three_phase)


# ----- metric-driven ------------------------------------------------------------------------------------

class ReduceOnPlateau(Schedule):
    """Cut the learning rate by ``factor`` when a metric stops improving (torch ``ReduceLROnPlateau``).

    Call :meth:`step` with the metric once per epoch; the value at any update step is
    ``base_lr * scale``. The state (best metric, counters, current rate) saves with the optimizer state.

    Args:
        mode: ``"min"`` (lower metric is better, e.g. a loss) or ``"max"`` (e.g. accuracy).
        factor: multiplier applied on a plateau, in (0, 1).
        patience: epochs without improvement tolerated before cutting.
        threshold: minimum change that counts as an improvement.
        cooldown: epochs to wait after a cut before counting again.
        min_lr: the learning rate never goes below this.
        threshold_mode: ``"rel"`` (relative to the best) or ``"abs"``.
        eps: cuts smaller than this are skipped.
        base_lr: the starting learning rate (needed; ``make_schedule`` fills it in).
    """

    name = "ReduceOnPlateau"

    def __init__(self, mode: str = "min", factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
                 cooldown: int = 0, min_lr: float = 0.0, threshold_mode: str = "rel", eps: float = 1e-8,
                 base_lr: float | None = None):
        self.mode = chk.choice("mode", mode, ("min", "max"))
        self.factor = chk.number("factor", factor, low=0.0, high=1.0, low_open=True, high_open=True,
                                 hint="use e.g. factor=0.1")
        self.patience = chk.integer("patience", patience, low=0)
        self.threshold = chk.non_negative("threshold", threshold)
        self.cooldown = chk.integer("cooldown", cooldown, low=0)
        self.min_lr = chk.non_negative("min_lr", min_lr)
        self.threshold_mode = chk.choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.eps = chk.non_negative("eps", eps)
        if base_lr is None:
            raise ValueError(
                "ReduceOnPlateau needs base_lr, got None; pass base_lr=1e-3 (or build it with "
                "make_schedule('reduce_on_plateau', base_lr, ...))")
        self.base_lr = chk.non_negative("base_lr", base_lr)
        self._config = {"mode": self.mode, "factor": self.factor, "patience": self.patience,
                        "threshold": self.threshold, "cooldown": self.cooldown, "min_lr": self.min_lr,
                        "threshold_mode": self.threshold_mode, "eps": self.eps, "base_lr": self.base_lr}
        self.reset()

    def reset(self) -> None:
        """Forget the history: best metric, counters and the current rate."""
        self.lr = self.base_lr
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0

    @property
    def scale(self) -> float:
        """The current multiplier of ``base_lr``."""
        return self.lr / self.base_lr if self.base_lr else 0.0

    def __call__(self, step):
        _step(step)
        return self.lr

    def _is_better(self, a: float) -> bool:
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return a < self.best * (1.0 - self.threshold)
            return a < self.best - self.threshold
        if self.threshold_mode == "rel":
            return a > self.best * (self.threshold + 1.0)
        return a > self.best + self.threshold

    def step(self, metric) -> float:
        """Record one epoch's metric and cut the rate if it has plateaued.

        Args:
            metric: a number or a 0-d tensor (read once; this syncs a GPU, once per epoch).

        Returns:
            The learning rate from now on.
        """
        try:
            current = float(metric)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"ReduceOnPlateau.step needs a number (e.g. the validation loss), got {metric!r}") from None
        self.last_epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        """The mutable state (numbers only)."""
        return {"lr": self.lr, "best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        expected = {"lr", "best", "num_bad_epochs", "cooldown_counter", "last_epoch"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"ReduceOnPlateau.load_state_dict needs keys {sorted(expected)}, got {got}")
        self.lr = float(state["lr"])
        self.best = float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.last_epoch = int(state["last_epoch"])


def stateful_parts(schedule: Any) -> list[ReduceOnPlateau]:
    """The metric-driven pieces inside a schedule (searching wrapped schedules).

    Args:
        schedule: a schedule, number or callable.

    Returns:
        List of the ReduceOnPlateau objects found, outermost first.
    """
    if isinstance(schedule, ReduceOnPlateau):
        return [schedule]
    found: list[ReduceOnPlateau] = []
    if isinstance(schedule, Schedule):
        for child in schedule.children():
            found.extend(stateful_parts(child))
    return found


# ----- registry -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule as the configuration, the command line and ``make_schedule`` know it, declared once.

    Attributes:
        name: the schedule's name (``schedule = "cosine"``).
        function: the builder; it takes the base learning rate first (or as ``lr_keyword``) and the
            parameters by keyword. The parameters' defaults are the function's (none: required).
        params: each parameter's type, range and meaning.
        description: one line for ``convdescent optimizers``.
        lr_keyword: the keyword the base learning rate is passed as (None: first positional argument).
    """

    name: str
    function: Callable[..., Schedule]
    params: tuple[Param, ...]
    description: str
    lr_keyword: str | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Each parameter's default, None for a required one (read from the function's signature)."""
        sig = inspect.signature(self.function).parameters
        out = {}
        for p in self.params:
            default = sig[p.name].default
            out[p.name] = None if default is inspect.Parameter.empty else default
        return out

    def build(self, base_lr: float, **params) -> Schedule:
        """The schedule with base (peak) learning rate ``base_lr``."""
        if self.lr_keyword is None:
            return self.function(base_lr, **params)
        return self.function(**{self.lr_keyword: base_lr}, **params)


_STEPS = Range(1, integer=True)
# Parameters every schedule takes: a warm-up in front of it.
WARMUP_PARAMS: tuple[Param, ...] = (
    Param("warmup_steps", "int", COUNT, "steps of a warm-up ramp before the schedule (0: none)"),
    Param("warmup_kind", "str", None, "shape of the warm-up ramp", ("linear", "cosine")),
    Param("warmup_start_factor", "float", UNIT, "the warm-up's first value as a fraction of the schedule's"),
)

SCHEDULE_SPECS: tuple[ScheduleSpec, ...] = (
    ScheduleSpec("constant", constant_schedule, (), "the same learning rate at every step"),
    ScheduleSpec("step", step_decay, (
        Param("step_size", "int", _STEPS, "steps between decays"),
        Param("gamma", "float", NON_NEGATIVE, "the decay factor"),
    ), "multiply by gamma every step_size steps (StepLR)"),
    ScheduleSpec("multistep", multistep_decay, (
        Param("milestones", "ints", _STEPS, "increasing step numbers"),
        Param("gamma", "float", NON_NEGATIVE, "the decay factor"),
    ), "multiply by gamma at each milestone step (MultiStepLR)"),
    ScheduleSpec("exponential", exponential_decay, (
        Param("gamma", "float", NON_NEGATIVE, "the factor per `every` steps"),
        Param("every", "int", _STEPS, "steps over which the rate shrinks by gamma"),
    ), "multiply by gamma per `every` steps, smoothly (ExponentialLR)"),
    ScheduleSpec("inverse_time", inverse_time_decay, (
        Param("decay_rate", "float", NON_NEGATIVE, "how fast the rate falls"),
        Param("decay_steps", "int", _STEPS, "steps per unit of decay"),
        Param("staircase", "bool", None, "whole units of decay only"),
    ), "base / (1 + decay_rate * step / decay_steps)"),
    ScheduleSpec("polynomial", polynomial_decay, (
        Param("total_steps", "int", _STEPS, "steps until end_value"),
        Param("power", "float", NON_NEGATIVE, "the polynomial's power"),
        Param("end_value", "float", NON_NEGATIVE, "the final learning rate"),
    ), "polynomial decay to end_value over total_steps (PolynomialLR)"),
    ScheduleSpec("cosine", cosine_decay, (
        Param("decay_steps", "int", _STEPS, "steps of the half cosine"),
        Param("alpha", "float", UNIT, "the final value as a fraction of the base"),
    ), "half-cosine decay to alpha * base over decay_steps (CosineAnnealingLR)"),
    ScheduleSpec("cosine_restarts", cosine_restarts, (
        Param("first_period", "int", _STEPS, "steps in the first cycle"),
        Param("period_mult", "int", _STEPS, "each cycle is this many times longer than the previous"),
        Param("alpha", "float", UNIT, "the minimum as a fraction of the base"),
    ), "cosine cycles with warm restarts, SGDR (CosineAnnealingWarmRestarts)"),
    ScheduleSpec("one_cycle", one_cycle, (
        Param("total_steps", "int", Range(2, integer=True), "the number of updates in the run"),
        Param("pct_start", "float", FRACTION, "fraction of the run spent rising"),
        Param("anneal_strategy", "str", None, "shape of the curve", ("cos", "linear")),
        Param("div_factor", "float", POSITIVE, "initial = peak / div_factor"),
        Param("final_div_factor", "float", POSITIVE, "final = initial / final_div_factor"),
        Param("three_phase", "bool", None, "fall back to the initial value before the final annealing"),
    ), "rise to base then anneal far below it, Smith & Topin (OneCycleLR)"),
    ScheduleSpec("reduce_on_plateau", ReduceOnPlateau, (
        Param("mode", "str", None, "min: lower is better; max: higher is better", ("min", "max")),
        Param("factor", "float", FRACTION, "multiplier applied on a plateau"),
        Param("patience", "int", COUNT, "epochs without improvement tolerated before cutting"),
        Param("threshold", "float", NON_NEGATIVE, "smallest change that counts as an improvement"),
        Param("cooldown", "int", COUNT, "epochs to wait after a cut"),
        Param("min_lr", "float", NON_NEGATIVE, "the rate never goes below this"),
        Param("threshold_mode", "str", None, "rel (relative to the best) or abs", ("rel", "abs")),
        Param("eps", "float", NON_NEGATIVE, "cuts smaller than this are skipped"),
    ), "cut by factor when a metric stops improving (ReduceLROnPlateau)", lr_keyword="base_lr"),
)
SCHEDULE_SPEC_BY_NAME: dict[str, ScheduleSpec] = {spec.name: spec for spec in SCHEDULE_SPECS}


class ScheduleEntry(NamedTuple):
    """Registry row: the builder ``(base_lr, **params) -> Schedule``, its parameters' defaults (None marks
    a required one), and a one-line description."""

    builder: Callable[..., Schedule]
    defaults: dict[str, Any]
    description: str


SCHEDULES: dict[str, ScheduleEntry] = {
    spec.name: ScheduleEntry(spec.build, spec.defaults, spec.description) for spec in SCHEDULE_SPECS}

_WARMUP_KEYS = tuple(p.name for p in WARMUP_PARAMS)


def schedule_param(name: str, schedule: str | None = None) -> Param | None:
    """The declaration of parameter ``name`` of ``schedule`` (any schedule's, first declared, when None)."""
    specs = [SCHEDULE_SPEC_BY_NAME[schedule]] if schedule in SCHEDULE_SPEC_BY_NAME else SCHEDULE_SPECS
    for p in WARMUP_PARAMS:
        if p.name == name:
            return p
    for spec in specs:
        for p in spec.params:
            if p.name == name:
                return p
    return None


def check_schedule_params(schedule: str, params: dict[str, Any], source: str | None = None) -> None:
    """Check the values of ``schedule``'s parameters that it declares (type and range); other keys are left
    to :func:`make_schedule`, which names what a schedule takes. ``X_epochs`` (X or X_steps in epochs) must be
    a non-negative number, or a list of them; ``cycle_momentum`` (one_cycle) true or false.

    Raises:
        ValueError: the first bad value, naming the parameter, the value and ``source``.
    """
    for key, value in params.items():
        if key.endswith("_epochs"):
            Param(key, "floats" if isinstance(value, (list, tuple)) else "float", NON_NEGATIVE).check(value, source)
            continue
        if key == "cycle_momentum":
            Param(key, "bool").check(value, source)
            continue
        p = schedule_param(key, schedule) if schedule in SCHEDULE_SPEC_BY_NAME else None
        if p is not None and (p in WARMUP_PARAMS or p in SCHEDULE_SPEC_BY_NAME[schedule].params):
            p.check(value, source)


def make_schedule(name: str, base_lr: float, **params) -> Schedule:
    """Build a schedule by name, optionally warmed up.

    Args:
        name: one of ``SCHEDULES`` (constant, step, multistep, exponential, inverse_time, polynomial,
            cosine, cosine_restarts, one_cycle, reduce_on_plateau).
        base_lr: the schedule's base (peak for one_cycle) learning rate.
        **params: the schedule's parameters (see ``SCHEDULE_SPECS``), plus ``warmup_steps``
            (wrap in :func:`warmup`), ``warmup_kind`` and ``warmup_start_factor``.

    Returns:
        The schedule.

    Raises:
        ValueError: an unknown schedule or parameter, a missing one, or a value of the wrong type or out
            of its declared range (``OptionRangeError``).
    """
    if name not in SCHEDULE_SPEC_BY_NAME:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    spec = SCHEDULE_SPEC_BY_NAME[name]
    defaults = spec.defaults
    warm = {k: params.pop(k) for k in _WARMUP_KEYS if k in params}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = ", ".join(list(defaults) + list(_WARMUP_KEYS))
        raise ValueError(f"schedule {name!r} does not take {', '.join(unknown)}; its parameters are: {allowed}")
    missing = [k for k, v in defaults.items() if v is None and k not in params]
    if missing:
        raise ValueError(f"schedule {name!r} needs {', '.join(missing)}; e.g. make_schedule({name!r}, "
                         f"{base_lr!r}, {missing[0]}=...)")
    check_schedule_params(name, {**params, **warm})
    schedule = spec.build(base_lr, **params)
    steps = warm.get("warmup_steps", 0)
    if steps:
        schedule = warmup(schedule, steps, warm.get("warmup_kind", "linear"), warm.get("warmup_start_factor", 0.0))
    elif set(warm) - {"warmup_steps"}:
        raise ValueError(f"warmup_kind/warmup_start_factor need warmup_steps > 0, got warmup_steps={steps!r}")
    return schedule
