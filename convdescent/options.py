"""The hyperparameter schema: every optimizer hyperparameter declared once, and the ranges of every number.

A :class:`Hyperparameter` says what one optimizer setting is: its name (the ``convdescent train`` flag with
underscores, the TOML key, the keyword of ``optimizer_from_args``), its type, its :class:`Range`, the scale a
search samples it on, the optimizers it applies to and its help text. What is derived from
``HYPERPARAMETERS``:

- the configuration options of the optimizer group (``convdescent.train.config.OPTIONS``), hence the
  ``train``, ``search``, ``lr-find`` and ``compare`` flags, the TOML keys and their range checks;
- ``optimizer_from_args`` (which settings exist, which optimizer takes which, their ranges);
- search spaces (``convdescent.search.space``: log or linear sampling, which optimizer has which
  dimension) and the settings a comparison accepts (``convdescent.search.compare``).

Learning-rate schedules declare their parameters the same way, with :class:`Param` rows, in
``convdescent.optim.schedules.SCHEDULE_SPECS``.

A :class:`Range` is an interval with open or closed ends; :func:`check` refuses a value outside it with a
message that names where the value came from (``--momentum 1.5 is out of range: momentum must be in [0, 1)``),
and :func:`number_type` is the argparse type of a ranged flag.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any


class OptionRangeError(ValueError):
    """A number outside its option's range; the message names the flag or key, the value and the range."""


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in: ``low``/``high`` (None: unbounded), each end open or closed.

    ``integer`` ranges hold whole numbers only.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` is a finite number in the interval (NaN and infinity never are)."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def text(self) -> str:
        """``in [0, 1)``, ``>= 0``, ``> 0``, ``an integer >= 1``, ..."""
        kind = "an integer " if self.integer else ""
        if self.low is None and self.high is None:
            return "an integer" if self.integer else "a finite number"
        if self.high is None:
            return f"{kind}{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{kind}{'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"{kind}in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")

    def outside(self) -> list[float]:
        """A value just outside each bound (what tests feed to check that the bound is enforced)."""
        out = []
        for end, is_open, below in ((self.low, self.low_open, True), (self.high, self.high_open, False)):
            if end is None:
                continue
            if is_open:
                out.append(end)
            elif self.integer:
                out.append(end - 1 if below else end + 1)
            else:
                step = max(abs(end), 1.0) * 1e-6
                out.append(end - step if below else end + step)
        return out

    def inside(self) -> float:
        """A value well inside the interval."""
        if self.low is not None and self.high is not None:
            mid = (self.low + self.high) / 2
            return float(round(mid)) if self.integer and self.low <= round(mid) <= self.high else mid
        if self.low is not None:
            return self.low + 1
        if self.high is not None:
            return self.high - 1
        return 0.0


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


# Ranges used across the program.
ANY = Range()
NON_NEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)
UNIT = Range(0.0, 1.0)                         # [0, 1]
UNIT_OPEN = Range(0.0, 1.0, high_open=True)    # [0, 1)
FRACTION = Range(0.0, 1.0, True, True)         # (0, 1)
COUNT = Range(0, integer=True)                 # 0, 1, 2, ...
POSITIVE_COUNT = Range(1, integer=True)        # 1, 2, ...
SEED = Range(0, 2 ** 63 - 1, integer=True)


def given(name: str, value: Any, source: str | None = None) -> str:
    """How the user gave a value, for messages: ``--momentum 1.5`` (a flag), ``run.toml: momentum = 1.5``
    (a file or another named source), ``momentum=1.5`` (Python arguments: ``source`` None or "arguments")."""
    if source and source.startswith("--"):
        return f"{source} {value!r}"
    if source and source != "arguments":
        return f"{source}: {name} = {value!r}"
    return f"{name}={value!r}"


def label(name: str, source: str | None = None) -> str:
    """The option as a message names it: ``--momentum``, ``momentum (in run.toml)`` or ``momentum``."""
    if source and source.startswith("--"):
        return source
    if source and source != "arguments":
        return f"{name} (in {source})"
    return name


def check(name: str, value: Any, rng: Range, source: str | None = None) -> Any:
    """Refuse a number outside ``rng``; return it unchanged.

    Args:
        name: the option's name, as the range is stated (``momentum``).
        value: a number (an int or float; bools and other types are the caller's to refuse).
        rng: the range.
        source: where the value came from: a flag (``--momentum``), a file or other context
            (``run.toml``), or None / "arguments" for Python arguments (see :func:`given`).

    Raises:
        OptionRangeError: ``<how it was given> is out of range: <name> must be <range>``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if not rng.contains(value) or (rng.integer and isinstance(value, float) and not value.is_integer()):
        raise OptionRangeError(f"{given(name, value, source)} is out of range: {name} must be {rng.text()}")
    return value


def number_type(name: str, rng: Range, integer: bool | None = None):
    """The argparse ``type`` of a numeric flag: parse the text, then check ``rng``.

    Args:
        name: the option's name in the message (``momentum`` for ``--momentum``).
        rng: the range.
        integer: parse as an integer (default: ``rng.integer``).
    """
    as_int = rng.integer if integer is None else integer

    def parse(text: str):
        try:
            value = int(text) if as_int else float(text)
        except ValueError:
            kind = "an integer" if as_int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if not rng.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {name} must be {rng.text()}")
        return value

    parse.__name__ = f"{name}_number"
    parse.range = rng  # read by tests that walk every flag
    parse.option = name
    return parse


@dataclass(frozen=True)
class Param:
    """One declared numeric or other setting of a schedule, an augmentation or a command.

    Attributes:
        name: the keyword.
        kind: "float", "int", "bool", "str", "ints" (a list of integers) or "floats".
        range: the range of a number (of each item for ``ints``/``floats``), or None.
        help: what it means.
        choices: the allowed values of a ``str``.
    """

    name: str
    kind: str
    range: Range | None = None
    help: str = ""
    choices: tuple = ()

    def check(self, value: Any, source: str | None = None) -> Any:
        """Check ``value``'s type and range; return it (ints for ``int``, floats for ``float``).

        Args:
            value: the value.
            source: where it came from, for the message (see :func:`check`).

        Raises:
            OptionRangeError: out of range; ValueError: the wrong type (both name the option and the source).
        """
        w = label(self.name, source)
        if self.kind in ("ints", "floats"):
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{w} must be a non-empty list of numbers, got {value!r}")
            item = Param(self.name, self.kind[:-1], self.range)
            return [item.check(v, source) for v in value]
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{w} must be true or false, got {value!r}")
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                allowed = f"one of {', '.join(map(repr, self.choices))}" if self.choices else "a string"
                raise ValueError(f"{w} must be {allowed}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{w} must be a number, got {value!r}")
        if self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{w} must be an integer, got {value!r}")
            value = int(value)
        elif not math.isfinite(value):
            raise ValueError(f"{w} must be a finite number, got {value!r}")
        if self.range is not None:
            check(self.name, value, self.range, source)
        return float(value) if self.kind == "float" else value


# ----------------------------------------------------------------------------------------------- optimizers

ADAPTIVE = ("rmsprop", "adagrad", "adadelta", "adam", "adamw", "nadam", "radam", "adamax")
WITH_BETAS = ("adam", "adamw", "nadam", "radam", "adamax", "lion")
ALL = ()  # applies to every optimizer


@dataclass(frozen=True)
class Hyperparameter:
    """One optimizer setting, declared once (see the module doc).

    Attributes:
        name: flag, TOML key and keyword (``weight_decay`` is ``--weight-decay``).
        kind: "float", "bool" or "floats" (a fixed-length list, e.g. betas).
        range: the range of the value (of each item of a list).
        help: the help text of the flag and the comment of the TOML key.
        applies: the optimizers that take it (empty: every one; clipping and the learning rate).
        scale: "log" or "linear": how a search samples a range of it (None: not a number).
        default: the configuration default (None: the optimizer's own default applies).
        length: the number of items of a list.
        example: a search specification shown in ``convdescent search --help``.
    """

    name: str
    kind: str
    range: Range | None
    help: str
    applies: tuple[str, ...] = ALL
    scale: str | None = None
    default: Any = None
    length: int = 0
    example: str = ""

    def applies_to(self, optimizer: str) -> bool:
        """Whether a run with ``optimizer`` takes this setting."""
        return not self.applies or optimizer in self.applies

    def check(self, value: Any, source: str | None = None) -> Any:
        """Check a value of this setting (type, length, range); returns it as the configuration keeps it.

        Args:
            value: the value.
            source: where it came from, for the message (see :func:`check`).
        """
        if self.kind == "floats":
            if not isinstance(value, (list, tuple)) or len(value) != self.length or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{label(self.name, source)} must be a list of {self.length} numbers such as "
                                 f"[0.9, 0.999], got {value!r}")
            for v in value:
                if not self.range.contains(float(v)):
                    raise OptionRangeError(f"{given(self.name, list(value), source)} is out of range: each of "
                                           f"{self.name} must be {self.range.text()}")
            return [float(v) for v in value]
        return Param(self.name, self.kind, self.range).check(value, source)


HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("lr", "float", NON_NEGATIVE, "learning rate (peak for one_cycle)", scale="log", default=1e-3,
                   example="1e-4:1e-1"),
    Hyperparameter("momentum", "float", UNIT_OPEN, "momentum (sgd, rmsprop)", ("sgd", "rmsprop"), "linear",
                   example="0.5:0.99"),
    Hyperparameter("nesterov", "bool", None, "Nesterov momentum (sgd)", ("sgd",), example="true,false"),
    Hyperparameter("weight_decay", "float", NON_NEGATIVE, "weight decay (coupled or decoupled as the optimizer "
                   "defines)", ("sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw", "nadam", "radam",
                                "adamax", "lion"), "log", example="0,1e-4,1e-3"),
    Hyperparameter("betas", "floats", UNIT_OPEN, "Adam-style moment decays, e.g. [0.9, 0.999]", WITH_BETAS,
                   length=2, example="0.9:0.999"),
    Hyperparameter("eps", "float", POSITIVE, "denominator term of adaptive optimizers", ADAPTIVE, "log",
                   example="1e-8:1e-6"),
    Hyperparameter("clip_norm", "float", POSITIVE, "clip the global gradient norm to this value", scale="log",
                   example="0.5:5"),
    Hyperparameter("clip_value", "float", POSITIVE, "clip each gradient element to [-v, v]", scale="log",
                   example="0.1:1"),
    Hyperparameter("agc", "float", POSITIVE, "adaptive gradient clipping factor (Brock et al. 2021)", scale="log",
                   example="0.01:0.1"),
)
HYPERPARAMETER_BY_NAME: dict[str, Hyperparameter] = {h.name: h for h in HYPERPARAMETERS}
# Settings some optimizers lack (a search drops them from the trials of the others).
OPTIMIZER_SPECIFIC = tuple(h.name for h in HYPERPARAMETERS if h.applies)


def takers(name: str, optimizers) -> list[str]:
    """The optimizers among ``optimizers`` that take hyperparameter ``name``."""
    h = HYPERPARAMETER_BY_NAME[name]
    return [o for o in optimizers if h.applies_to(o)]


__all__ = ["ANY", "COUNT", "FRACTION", "HYPERPARAMETERS", "HYPERPARAMETER_BY_NAME", "Hyperparameter",
           "NON_NEGATIVE", "OPTIMIZER_SPECIFIC", "OptionRangeError", "POSITIVE", "POSITIVE_COUNT", "Param",
           "Range", "SEED", "UNIT", "UNIT_OPEN", "check", "given", "label", "number_type", "takers"]


def seconds_from_env(name: str, default: float) -> float | None:
    """A positive number of seconds from the environment variable ``name`` (``default`` when it is unset or
    empty); None when it is set but is not a positive number, for the caller to refuse in its own words."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 else None
