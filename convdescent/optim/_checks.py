"""Argument checks shared by the optimizer family; each raises one ValueError naming the argument."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """Check that ``value`` is a finite real number inside the given interval and return it as a float.

    Args:
        name: the argument's name, used in the message.
        value: what the caller passed.
        low, high: interval ends (None for unbounded).
        low_open, high_open: whether the ends are excluded.
        hint: an example of a valid setting, appended to the message.

    Returns:
        ``float(value)``.
    """
    tail = f"; {hint}" if hint else ""
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}{tail}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {_interval(low, high, low_open, high_open)}, got {value!r}{tail}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {_interval(low, high, low_open, high_open)}, got {value!r}{tail}")
    return v


def _interval(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def non_negative(name: str, value: Any, hint: str = "") -> float:
    """Check ``value >= 0``."""
    return number(name, value, low=0.0, hint=hint)


def positive(name: str, value: Any, hint: str = "") -> float:
    """Check ``value > 0``."""
    return number(name, value, low=0.0, low_open=True, hint=hint)


def unit_interval(name: str, value: Any, *, closed_high: bool = False, hint: str = "") -> float:
    """Check ``0 <= value < 1`` (or ``<= 1`` when ``closed_high``)."""
    return number(name, value, low=0.0, high=1.0, high_open=not closed_high, hint=hint)


def integer(name: str, value: Any, *, low: int | None = None, hint: str = "") -> int:
    """Check that ``value`` is an int (bools refused) not below ``low``."""
    tail = f"; {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}{tail}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}{tail}")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    """Check that ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def betas(value: Any, *, name: str = "betas", hint: str = "use e.g. betas=(0.9, 0.999)") -> tuple[float, float]:
    """Check a pair of decay rates, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers in [0, 1), got {value!r}; {hint}")
    b1, b2 = value
    for v in (b1, b2):
        if not _is_number(v) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{name} must be a pair of numbers in [0, 1), got {value!r}; {hint}")
    return float(b1), float(b2)


def choice(name: str, value: Any, options) -> Any:
    """Check that ``value`` is one of ``options``."""
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value
