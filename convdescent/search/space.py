"""Search spaces: which configuration keys vary, over which values, and how they become Optuna distributions.

A dimension is a key of the run configuration (``lr``, ``momentum``, ``weight_decay``, ``batch_size``,
``schedule``, ``optimizer``, or any other key of ``convdescent train``) with either a range or a list of
values, written as on the command line:

- ``1e-4:1e-1``: a range. Keys the schema declares on a log scale (learning rate, weight decay, eps,
  clipping, batch size; see ``convdescent.options``) are sampled log-uniformly (``lr`` always is), others
  uniformly; add ``:log`` or ``:lin`` to choose (``0.5:0.99:lin``). Integer keys (``batch_size``,
  ``epochs``) give integer ranges.
- ``32,64,128``: a list of values (numbers, true/false, or names).
- ``0.9``: a single value: not a dimension, just a setting of every trial.

Optimizer hyperparameters apply only where the optimizer has them: with ``optimizer = sgd,adam`` and
``momentum = 0:0.99``, adam trials carry no momentum, and a grid holds each adam point once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable

from ..options import HYPERPARAMETER_BY_NAME, OPTIMIZER_SPECIFIC, takers
from ..train.config import OPTIONS

# Keys sampled log-uniformly by default: the options the schema declares on a log scale.
LOG_KEYS = {o.key for o in OPTIONS if o.scale == "log"}
INT_KEYS = {o.key for o in OPTIONS if o.kind in ("int", "batch")}
# Hyperparameters that only some optimizers take (``applies`` in convdescent.options.HYPERPARAMETERS).
OPTIMIZER_HPARAMS = set(OPTIMIZER_SPECIFIC)


class SearchSpaceError(ValueError):
    """A dimension is written wrongly; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class Dimension:
    """One varying configuration key.

    Attributes:
        key: the configuration key, e.g. "lr".
        low, high: the range's bounds (None for a list).
        log: sample the range log-uniformly (and space a grid geometrically).
        integer: the range holds integers.
        choices: the list of values (None for a range).
    """

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    @property
    def is_range(self) -> bool:
        return self.choices is None

    def distribution(self):
        """The matching Optuna distribution."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(self.choices)
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def grid(self, points: int) -> list:
        """The values a grid search takes: the list itself, or ``points`` values spread over the range."""
        if self.choices is not None:
            return list(self.choices)
        if points < 1:
            raise SearchSpaceError(f"grid_points must be at least 1, got {points}")
        if points == 1:
            values = [math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2]
        elif self.log:
            a, b = math.log(self.low), math.log(self.high)
            values = [math.exp(a + (b - a) * i / (points - 1)) for i in range(points)]
            values[0], values[-1] = float(self.low), float(self.high)  # exact ends despite exp(log(x))
        else:
            values = [self.low + (self.high - self.low) * i / (points - 1) for i in range(points)]
        if self.integer:
            out = []
            for v in values:
                v = int(round(v))
                if v not in out:
                    out.append(v)
            return out
        return [float(_round_sig(v)) for v in values]

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {{{', '.join(map(_fmt, self.choices))}}}"
        scale = "log-uniform" if self.log else "uniform"
        kind = " integers" if self.integer else ""
        return f"{self.key} {scale}{kind} in [{_fmt(self.low)}, {_fmt(self.high)}]"

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this dimension's value (a queued trial returns its fixed value)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"key": self.key, "choices": list(self.choices)}
        return {"key": self.key, "low": self.low, "high": self.high, "log": self.log, "integer": self.integer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Dimension":
        if "choices" in d:
            return cls(d["key"], choices=tuple(d["choices"]))
        return cls(d["key"], d["low"], d["high"], bool(d.get("log")), bool(d.get("integer")))


def _round_sig(v: float, digits: int = 6) -> float:
    """Round to a few significant digits so grid values print and compare cleanly (1e-3, not 0.0010000000002)."""
    if v == 0 or not math.isfinite(v):
        return v
    return round(v, digits - 1 - int(math.floor(math.log10(abs(v)))))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def parse_value(text: str) -> Any:
    """One command-line value: int, float, true/false, none, or the string itself."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        v = float(t)
    except ValueError:
        return t
    if not math.isfinite(v):
        raise SearchSpaceError(f"values must be finite, got {text!r}")
    return v


def parse_dimension(key: str, spec: str) -> Dimension | Any:
    """Parse ``"1e-4:1e-1"``, ``"1e-4:1e-1:lin"``, ``"32,64"`` or ``"0.9"`` for configuration key ``key``.

    Args:
        key: the configuration key the values are for.
        spec: the text.

    Returns:
        A Dimension, or the plain value for a single value (a fixed setting).

    Raises:
        SearchSpaceError: a malformed range (naming the key and the text).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SearchSpaceError(f"{key} needs a range such as 1e-4:1e-1 or a list such as 32,64, got {spec!r}")
    text = spec.strip()
    if ":" in text:
        parts = text.split(":")
        scale = None
        if parts[-1].strip().lower() in ("log", "lin", "linear"):
            scale = parts.pop().strip().lower()
        if len(parts) != 2:
            raise SearchSpaceError(f"{key} range must be LOW:HIGH (optionally :log or :lin), got {spec!r}")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise SearchSpaceError(f"{key} range bounds must be numbers, got {spec!r}") from None
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise SearchSpaceError(f"{key} range needs LOW < HIGH, got {spec!r}")
        log = (key in LOG_KEYS) if scale is None else scale == "log"
        if key == "lr" and scale in ("lin", "linear"):
            raise SearchSpaceError(f"lr is always searched on a log scale; drop ':lin' from {spec!r}")
        if log and low <= 0:
            raise SearchSpaceError(f"{key} range {spec!r} is on a log scale, so LOW must be > 0; use a list "
                                   f"such as 0,1e-4,1e-3 to include 0, or add ':lin'")
        integer = key in INT_KEYS
        if integer:
            if not (low.is_integer() and high.is_integer()):
                raise SearchSpaceError(f"{key} takes integers, got the range {spec!r}")
            low, high = int(low), int(high)
        return Dimension(key, low, high, log=log, integer=integer)
    values = [parse_value(v) for v in text.split(",") if v.strip()]
    if not values:
        raise SearchSpaceError(f"{key} list is empty: {spec!r}")
    if len(values) == 1:
        return values[0]
    if len(set(map(repr, values))) != len(values):
        raise SearchSpaceError(f"{key} list repeats a value: {spec!r}")
    return Dimension(key, choices=tuple(values))


class SearchSpace:
    """The dimensions of a search and the rule that drops hyperparameters an optimizer does not take.

    Args:
        dimensions: the varying keys.
        fixed: settings shared by every trial (used to know the optimizer when it does not vary).
    """

    def __init__(self, dimensions: Iterable[Dimension], fixed: dict[str, Any] | None = None):
        self.dimensions = list(dimensions)
        keys = [d.key for d in self.dimensions]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise SearchSpaceError(f"each key may vary once, got {dupes} twice")
        if not self.dimensions:
            raise SearchSpaceError("the search space is empty: give at least one range or list, e.g. --lr 1e-4:1")
        self.fixed = dict(fixed or {})
        self._check_optimizer_hparams()

    def _optimizer_choices(self) -> list[str]:
        for d in self.dimensions:
            if d.key == "optimizer":
                return list(d.choices or ())
        return [self.fixed.get("optimizer", "adam")]

    def _check_optimizer_hparams(self) -> None:
        from ..optim import OPTIMIZERS

        opts = self._optimizer_choices()
        for name in opts:
            if name not in OPTIMIZERS:
                raise SearchSpaceError(f"unknown optimizer {name!r} in the search space; choose from "
                                       f"{', '.join(OPTIMIZERS)}")
        for d in self.dimensions:
            if d.key in OPTIMIZER_HPARAMS and not takers(d.key, opts):
                raise SearchSpaceError(f"{d.key} varies but no optimizer searched takes it ({', '.join(opts)}); "
                                       f"it applies to {', '.join(takers(d.key, OPTIMIZERS))}")
        for key, value in self.fixed.items():
            if key in OPTIMIZER_HPARAMS and value is not None and not takers(key, opts):
                raise SearchSpaceError(f"{key}={value!r} is set but no optimizer searched takes it "
                                       f"({', '.join(opts)}); it applies to {', '.join(takers(key, OPTIMIZERS))}")

    def applies(self, key: str, optimizer: str) -> bool:
        """Whether ``key`` is a setting of a trial that uses ``optimizer`` (the schema's ``applies``)."""
        if key not in OPTIMIZER_HPARAMS:
            return True
        return HYPERPARAMETER_BY_NAME[key].applies_to(optimizer)

    def active(self, optimizer: str) -> list[Dimension]:
        """The dimensions a trial with this optimizer has."""
        return [d for d in self.dimensions if d.key == "optimizer" or self.applies(d.key, optimizer)]

    def distributions(self, optimizer: str) -> dict:
        return {d.key: d.distribution() for d in self.active(optimizer)}

    def grid(self, points: int) -> list[dict[str, Any]]:
        """Every grid point once: the product of each dimension's values, without keys an optimizer lacks.

        Args:
            points: values per range.

        Returns:
            A list of parameter dicts in a fixed order (optimizer-major, as the dimensions were given).
        """
        seen = set()
        out = []
        for combo in itertools.product(*[d.grid(points) for d in self.dimensions]):
            point = dict(zip([d.key for d in self.dimensions], combo))
            opt = point.get("optimizer", self._optimizer_choices()[0])
            point = {k: v for k, v in point.items() if k == "optimizer" or self.applies(k, opt)}
            ident = point_key(point)
            if ident not in seen:
                seen.add(ident)
                out.append(point)
        return out

    def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` random points drawn by Optuna's RandomSampler (log-uniform where the dimension is log).

        The draw depends only on ``seed``, so every process that builds the same search draws the same
        points, and they can be queued once in a shared study.
        """
        import optuna

        sampler = optuna.samplers.RandomSampler(seed=seed)
        scratch = optuna.create_study(sampler=sampler, storage=optuna.storages.InMemoryStorage())
        out = []
        for _ in range(n):
            trial = scratch.ask()
            out.append(self.suggest(trial))
            scratch.tell(trial, 0.0)
        return out

    def suggest(self, trial) -> dict[str, Any]:
        """Ask an Optuna trial for a point: the optimizer first, then the dimensions it has."""
        point = {}
        opt_dim = next((d for d in self.dimensions if d.key == "optimizer"), None)
        if opt_dim is not None:
            point["optimizer"] = opt_dim.suggest(trial)
        opt = point.get("optimizer", self._optimizer_choices()[0])
        for d in self.active(opt):
            if d.key != "optimizer":
                point[d.key] = d.suggest(trial)
        return point

    def to_dict(self) -> dict[str, Any]:
        return {"dimensions": [d.to_dict() for d in self.dimensions], "fixed": dict(self.fixed)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        return cls([Dimension.from_dict(x) for x in d["dimensions"]], d.get("fixed"))

    def describe(self) -> str:
        return "; ".join(d.describe() for d in self.dimensions)


def point_key(point: dict[str, Any]) -> str:
    """A canonical text for a parameter dict (sorted keys, exact reprs), used to find a point again."""
    return ";".join(f"{k}={point[k]!r}" for k in sorted(point))
